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
from appliance.scheduler import schedule_reresolve
from appliance.sources.jsonlines import spool_path
from appliance.sources.watch import Watcher

log = logging.getLogger(__name__)

IDLE_SLEEP = 0.05
# how often the kernel is compared with the database when nothing changed
RECONCILE_EVERY = 2.0
# in between, a reconcile pass compares only counts unless this long has passed
FULL_RECONCILE_EVERY = 30.0
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
        # block id -> the kernel status last written to Block.enforced
        self.kernel_status = {}
        self.last_full = 0.0
        self.last_rules_check = 0.0

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
        # the kernel first: after a reboot blocks are back before logs are read
        self.enforce(rebuild=True)
        self.load()
        self.expiry.start()
        schedule_reresolve(self.expiry.scheduler, self.settings, self._lifted)
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
            self.enforce(reconcile=True)
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

    def enforce(self, rebuild=False, reconcile=False):
        """Make the kernel hold exactly the blocks in force now.

        On start the sets are rebuilt whole and swapped in; afterwards only the
        difference is applied. A reconcile pass (nothing changed in the
        database) that changes the kernel repaired drift, and says so. A
        failure is logged and retried on the next pass.
        """
        now = time.time()
        active = service.active_targets(now)
        desired = {
            target: None if expires_at is None else expires_at - now
            for _id, target, expires_at in active
        }
        self.last_reconcile = now
        service.publish_state(enforcement=self.backend.name, heartbeat=now)
        in_force = sum(1 for left in desired.values() if left is None or left >= 1)
        if reconcile and now - self.last_full < FULL_RECONCILE_EVERY:
            try:
                if self.backend.matches(in_force):
                    service.publish_state(kernel_checked_at=now)
                    return
            except Exception:
                log.exception("kernel check failed; syncing instead")
        self.last_full = now
        try:
            if rebuild:
                self.backend.setup()
                change = self.backend.rebuild(desired)
            else:
                # rules are read back at least every RECONCILE_EVERY, even
                # while a flood of blocks keeps reconcile passes away
                check = now - self.last_rules_check >= RECONCILE_EVERY
                if check:
                    self.last_rules_check = now
                change = self.backend.sync(desired, check_rules=check)
        except Exception as exc:
            log.exception("enforcement failed; retrying in %.0f s", RECONCILE_EVERY)
            service.publish_state(enforcement_error=f"enforcement failed: {exc}")
            return
        if reconcile and change:
            log.warning("kernel drift repaired: %s", drift_summary(change))
        for target in change.added:
            log.info("%s now enforced (%s backend)", target, self.backend.name)
        for target in change.removed:
            log.info("%s no longer enforced (%s backend)", target, self.backend.name)
        status = {block_id: target in change.enforced for block_id, target, _ in active}
        self.kernel_status = service.record_kernel_status(
            status, self.kernel_status, now
        )
        full = f"{len(change.overflow)} blocks NOT enforced: the kernel sets are full"
        service.publish_state(
            kernel_checked_at=now, enforcement_error=full if change.overflow else ""
        )


def drift_summary(change):
    """What a reconcile pass put right, in words, naming a few entries each."""

    def some(entries):
        shown = ", ".join(entries[:5])
        return shown + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")

    parts = []
    if change.added:
        parts.append(
            f"{len(change.added)} missing entries put back ({some(change.added)})"
        )
    if change.removed:
        parts.append(
            f"{len(change.removed)} extra entries removed ({some(change.removed)})"
        )
    if change.retimed:
        parts.append(f"{len(change.retimed)} entries re-timed ({some(change.retimed)})")
    return "; ".join(parts)
