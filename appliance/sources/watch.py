"""Wake the daemon as soon as a followed log changes (inotify, or polling)."""

import ctypes
import logging
import os
import select
import struct
import time

log = logging.getLogger(__name__)

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
