"""The daemon: follow the logs, profile, lift blocks on time, make the kernel follow."""

import logging
import os
import signal
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
from appliance.sources.jsonlines import spool_path
from appliance.sources.watch import Watcher

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
        # the mail logs, and the spool POST /api/v1/events writes to
        followed = [*settings.log_files, str(spool_path(settings))]
        self.followed = list(dict.fromkeys(os.path.realpath(p) for p in followed))
        self.watcher = Watcher(self.followed)
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
        self.sources = [Source(path) for path in self.followed]

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
        service.publish_state(enforcement=self.backend.name, heartbeat=now)
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
