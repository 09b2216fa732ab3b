"""The daemon: follow the logs, profile, lift blocks on time, make the kernel follow."""

import logging
import signal
import threading
import time

from appliance import service
from appliance.ingest import Pipeline
from appliance.ingest import Source
from appliance.models import Block
from appliance.profiler import Profiler
from appliance.scheduler import BlockExpiry

log = logging.getLogger(__name__)

IDLE_SLEEP = 0.05
RECONCILE_EVERY = 5.0
RULES_EVERY = 5.0


class Daemon:
    """One process: sources → profiler → database → kernel."""

    def __init__(self, settings, backend):
        self.settings = settings
        self.backend = backend
        self.profiler = Profiler(settings)
        self.pipeline = Pipeline(self.profiler)
        self.sources = [Source(path) for path in settings.log_files]
        self.expiry = BlockExpiry(on_lift=self._lifted)
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.last_change = 0.0
        self.last_reconcile = 0.0
        self.last_rules = 0.0

    def _lifted(self, targets):
        """A block was lifted by the scheduler: enforce soon."""
        self.wake.set()

    def run(self):
        """Run until SIGTERM or SIGINT."""
        signal.signal(signal.SIGTERM, lambda *_: self.stopping.set())
        signal.signal(signal.SIGINT, lambda *_: self.stopping.set())
        self.profiler.load()
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
                source.file.close()
        log.info("stopped")

    def tick(self):
        """Read what is new, then enforce if any block changed."""
        blocks_before = self.profiler.blocks_made
        read = sum(self.pipeline.step(source) for source in self.sources)
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
            self.wake.wait(IDLE_SLEEP)

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
