"""The daemon: follow the logs, profile, lift blocks on time, make the kernel follow."""

import ctypes
import logging
import os
import select
import signal
import struct
import threading
import time

from peewee import DatabaseError

from appliance import service
from appliance.ingest import Pipeline
from appliance.ingest import ReaderLock
from appliance.ingest import Source
from appliance.models import Block
from appliance.profiler import Profiler
from appliance.scheduler import BlockExpiry

log = logging.getLogger(__name__)

IDLE_SLEEP = 0.05
RECONCILE_EVERY = 5.0
RULES_EVERY = 5.0
RETRY_AFTER = 1.0


class Daemon:
    """One process: sources → profiler → database → kernel."""

    def __init__(self, settings, backend):
        self.settings = settings
        self.backend = backend
        self.lock = ReaderLock(settings, "sender-filter run")
        self.profiler = None
        self.pipeline = None
        self.sources = []
        self.watcher = Watcher(settings.log_files)
        self.expiry = BlockExpiry(on_lift=self._lifted)
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.last_change = 0.0
        self.last_reconcile = 0.0
        self.last_rules = 0.0

    def _lifted(self, targets):
        """A block was lifted by the scheduler: enforce soon."""
        self.wake.set()
        self.watcher.poke()

    def _stop(self, *_signal):
        """SIGTERM or SIGINT: finish the step in hand, then stop."""
        self.stopping.set()
        self.watcher.poke()

    def load(self):
        """(Re)build windows, episodes and read positions from the database."""
        for source in self.sources:
            source.close()
        self.profiler = Profiler(self.settings)
        self.profiler.load()
        self.pipeline = Pipeline(self.profiler)
        self.sources = [Source(path) for path in self.settings.log_files]

    def run(self):
        """Run until SIGTERM or SIGINT."""
        self.lock.acquire()
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        self.load()
        self.backend.setup()
        self.expiry.start()
        self.enforce(rebuild=True)
        log.info(
            "following %s; enforcement: %s",
            ", ".join(s.path for s in self.sources) or "no log files",
            self.backend.name,
        )

        try:
            while not self.stopping.is_set():
                self.tick()
        finally:
            self.expiry.stop()
            for source in self.sources:
                source.close()
            self.watcher.close()
            self.lock.release()
        log.info("stopped")

    def tick(self):
        """Read what is new, then enforce if any block changed."""
        blocks_before = self.profiler.blocks_made
        read = self._read()
        now = time.time()

        changed = self._blocks_changed()
        if self.profiler.blocks_made != blocks_before or changed or self.wake.is_set():
            self.wake.clear()
            self.expiry.refresh()
            self.enforce()
        elif now - self.last_reconcile >= RECONCILE_EVERY:
            self.enforce()
        if now - self.last_rules >= RULES_EVERY:
            self.profiler.reload_rules()
            self.last_rules = now
        if not read:
            self.watcher.wait(IDLE_SLEEP)

    def _read(self):
        """One step of every source; on a database failure, start again from it.

        A failed step rolled its transaction back, but the reader and the
        profiler had already moved on in memory: both are rebuilt from what
        the database holds, so nothing is lost or counted twice.
        """
        try:
            return sum(self.pipeline.step(source) for source in self.sources)
        except DatabaseError:
            log.exception(
                "reading the logs failed; reloading positions and windows in %.0f s",
                RETRY_AFTER,
            )
        self.stopping.wait(RETRY_AFTER)
        self.load()
        return 0

    def _blocks_changed(self):
        """Whether any block was added or lifted since we last looked."""
        latest = Block.select(Block.changed_at).order_by(Block.changed_at.desc())
        latest = latest.scalar() or 0.0
        if latest > self.last_change:
            self.last_change = latest
            self.profiler.refresh_blocks()
            return True
        return False

    def enforce(self, rebuild=False):
        """Make the kernel hold exactly the blocks in force now.

        On start the sets are rebuilt whole and swapped in; afterwards only the
        difference is applied. A failure is logged and retried on the next pass.
        """
        now = time.time()
        desired = {}
        for block in service.active_blocks(now):
            if block.expires_at is None:
                desired[block.target] = None
            else:
                desired[block.target] = block.expires_at - now
        self.last_reconcile = now
        try:
            if rebuild:
                change = self.backend.rebuild(desired)
            else:
                change = self.backend.sync(desired)
        except Exception:
            log.exception("enforcement failed; retrying in %.0f s", RECONCILE_EVERY)
            return
        for target in change.added:
            log.info("%s now enforced (%s backend)", target, self.backend.name)
        for target in change.removed:
            log.info("%s no longer enforced (%s backend)", target, self.backend.name)


IN_MODIFY = 0x002
IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
WATCHED = (
    IN_MODIFY
    | IN_ATTRIB
    | IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
)
INOTIFY_EVENT = struct.Struct("iIII")
REWATCH_EVERY = 1.0


class Watcher:
    """Wakes a waiting reader as soon as a followed log or a rotation of it changes.

    inotify (through libc) watches the logs' directories, so a file that does
    not exist yet, or a new one after a rotation, is seen at once; a directory
    missing now is watched once it appears. Without inotify, `wait` sleeps its
    whole timeout, which is then the polling interval.
    """

    def __init__(self, paths):
        self.names = {}
        for path in paths:
            directory, name = os.path.split(os.path.abspath(path))
            self.names.setdefault(directory, set()).add(name)
        self.wake_read, self.wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.watches = {}
        self.watched_at = 0.0
        self.libc = None
        self.fd = -1
        if self.names:
            self._start_inotify()

    def _start_inotify(self):
        """Open an inotify instance; on failure fall back to polling."""
        try:
            self.libc = ctypes.CDLL(None, use_errno=True)
            self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        except (OSError, AttributeError):
            self.fd = -1
        if self.fd < 0:
            log.info("inotify is not available; polling the logs instead")
            return
        self._watch()

    def _watch(self):
        """Watch each followed log's directory that is not watched yet."""
        self.watched_at = time.monotonic()
        watched = set(self.watches.values())
        for directory in self.names:
            if directory in watched:
                continue
            number = self.libc.inotify_add_watch(
                self.fd, os.fsencode(directory), WATCHED
            )
            if number >= 0:
                self.watches[number] = directory

    def wait(self, timeout):
        """Sleep up to `timeout` seconds; True when woken early by a change or poke."""
        deadline = time.monotonic() + timeout
        sources = [self.wake_read] + ([self.fd] if self.fd >= 0 else [])
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            ready, _, _ = select.select(sources, [], [], left)
            if self.wake_read in ready:
                _drain(self.wake_read)
                return True
            if self.fd in ready and self._relevant():
                return True
            if self.fd >= 0 and len(self.watches) < len(self.names):
                if time.monotonic() - self.watched_at >= REWATCH_EVERY:
                    self._watch()

    def _relevant(self):
        """Read pending inotify events; True if one concerns a followed log."""
        relevant = False
        for chunk in iter(lambda: _read_some(self.fd), b""):
            start = 0
            while start + INOTIFY_EVENT.size <= len(chunk):
                number, mask, _cookie, length = INOTIFY_EVENT.unpack_from(chunk, start)
                name_start = start + INOTIFY_EVENT.size
                name = chunk[name_start : name_start + length].rstrip(b"\0")
                start = name_start + length
                if mask & IN_Q_OVERFLOW:
                    relevant = True
                if mask & IN_IGNORED:
                    self.watches.pop(number, None)
                    continue
                followed = self.names.get(self.watches.get(number), ())
                name = os.fsdecode(name)
                if any(name.startswith(base) for base in followed):
                    relevant = True
        return relevant

    def poke(self):
        """Wake `wait` now (safe from another thread or a signal handler)."""
        try:
            os.write(self.wake_write, b"!")
        except BlockingIOError:
            pass

    def close(self):
        """Release the inotify instance and the wake-up pipe."""
        for fd in (self.fd, self.wake_read, self.wake_write):
            if fd >= 0:
                os.close(fd)
        self.fd = self.wake_read = self.wake_write = -1


def _read_some(fd):
    """What a non-blocking descriptor has to read now (b"" when nothing)."""
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return b""


def _drain(fd):
    """Empty a non-blocking pipe."""
    while _read_some(fd):
        pass
