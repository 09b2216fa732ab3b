"""The daemon: follow the logs, profile, lift blocks on time, make the kernel follow."""

import logging
import os
import signal
import socket
import threading
import time
from dataclasses import replace

from peewee import DatabaseError

from appliance import service
from appliance.ingest import Pipeline
from appliance.ingest import ReaderLock
from appliance.ingest import Source
from appliance.kernelfeed import KernelFeed
from appliance.models import db
from appliance.profiler import Profiler
from appliance.scheduler import BlockExpiry
from appliance.scheduler import schedule_reresolve
from appliance.sources.jsonlines import spool_path
from appliance.sources.watch import Watcher

log = logging.getLogger(__name__)

IDLE_SLEEP = 0.05
# how often the kernel is compared with the database when nothing changed
RECONCILE_EVERY = 2.0
# in between, a reconcile pass compares only counts unless this long has
# passed (an entry swapped for another by hand keeps the count) ...
FULL_RECONCILE_EVERY = 4.0
# ... or, with very many blocks, this many times what the last full pass took,
# which keeps full passes under a tenth of the time (100,000 blocks: ~0.45 s)
FULL_RECONCILE_SHARE = 10
# how often the profiler's rules are read again from the database
RULES_EVERY = 5.0
RETRY_AFTER = 1.0
# past this many entries in one change, the log names a few and counts the rest
LOG_EACH = 20


def notify_ready():
    """Tell systemd the blocks are back in the kernel (a `Type=notify` unit).

    The whole protocol is one datagram to $NOTIFY_SOCKET; units ordered after
    this one (Postfix) start only then. Without systemd it does nothing.
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.sendto(b"READY=1", address)
    except OSError as exc:
        log.error("telling systemd the daemon is ready failed: %s", exc)


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
        self.feed = KernelFeed(settings)
        self.last_reconcile = 0.0
        self.last_rules = 0.0
        self.last_full = 0.0
        # seconds the last full pass took
        self.full_took = 0.0
        # block id -> the kernel status last written to Block.enforced
        self.kernel_status = {}
        # entry -> end time (None: permanent) of what was sent to the kernel
        self.in_kernel = {}
        # the last full pass found an error: no cheap passes until one does not
        self.trouble = False
        # the last full pass left blocks out of a full set: changes go by full
        # passes, which choose what a full set holds
        self.sets_full = False
        # new temporary blocks wait for the scheduler's next refresh
        self.schedule_due = False

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
        if not self._start():
            self.lock.release()
            return
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

    def _start(self):
        """Rebuild the kernel sets, load the profiler, start the scheduler.

        The kernel first: after a reboot blocks are back before logs are read.
        A locked database is waited out; False when stopped meanwhile.
        """
        if not self.backend.dry_run:
            self.backend.start_cutting()
        while not self.stopping.is_set():
            try:
                self.enforce(rebuild=True)
                notify_ready()  # the blocks are back: Postfix may start
                self.load()
                break
            except DatabaseError as exc:
                self._database_failed(exc)
        if self.stopping.is_set():
            return False
        self.expiry.start()
        # the first pass hands the temporary blocks (and the overdue ones) to
        # the scheduler's own thread: with 100,000 of them that takes seconds,
        # in which new blocks must still reach the kernel
        self.schedule_due = True
        return True

    def tick(self):
        """Read what is new, send new blocks to the kernel, reconcile now and then.

        A database failure in the enforcement steps (locked longer than the
        busy timeout) is logged and the step tried again on a later pass; the
        next pass compares the kernel with the database in full.
        """
        blocks_before = self.profiler.blocks_made
        read = self._read()
        now = time.time()

        try:
            made = self.profiler.blocks_made != blocks_before or self.wake.is_set()
            self.enforce_changes(made)
            if now - self.last_reconcile >= RECONCILE_EVERY:
                self.enforce(reconcile=True)
            if now - self.last_rules >= RULES_EVERY:
                self.profiler.reload_rules()
                self.last_rules = now
        except DatabaseError as exc:
            self._database_failed(exc)
        if not read:
            self.watcher.wait(IDLE_SLEEP)

    def _database_failed(self, exc):
        """Log a failed enforcement step; the next pass is a full comparison."""
        log.error(
            "enforcement step failed on the database (%s); retrying in %.0f s",
            exc,
            RETRY_AFTER,
        )
        self.last_full = 0.0
        self.last_reconcile = 0.0
        self.stopping.wait(RETRY_AFTER)

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

    def enforce_changes(self, woken=False):
        """Send the blocks made, changed or lifted since the last look.

        Only those entries go to the kernel, in one batch without reading the
        sets back, so a new block's way to the kernel does not grow with the
        blocks in force. New temporary blocks are handed to the scheduler at
        the next reconcile pass (the kernel lifts them on time regardless).
        While the sets are full, a full pass sends them instead: only it can
        choose what a full set holds, the same way a restart does.
        """
        if woken:
            self.wake.clear()
            self.schedule_due = True
        now = time.time()
        wanted = self.feed.changes(now)
        if not wanted:
            return
        self.profiler.refresh_blocks()
        self.schedule_due = True
        if self.sets_full:
            self.enforce()
            return
        try:
            change = self.backend.apply(wanted.desired, wanted.removed)
        except Exception as exc:
            log.warning("sending block changes failed (%s); syncing in full", exc)
            self.enforce()
            return
        self._log_change(change)
        for target in wanted.removed:
            self.in_kernel.pop(target, None)
        self.in_kernel.update(wanted.expires)

        # only the rows in hand are compared and written, not every block
        status = dict.fromkeys(wanted.refused, False)
        status.update({i: t in change.enforced for i, t in wanted.targets.items()})
        touched = [*status, *wanted.gone]
        written = {i: self.kernel_status[i] for i in touched if i in self.kernel_status}
        service.record_kernel_status(status, written, now)
        for block_id in wanted.gone:
            self.kernel_status.pop(block_id, None)
        self.kernel_status.update(status)

    def enforce(self, rebuild=False, reconcile=False):
        """Make the kernel hold exactly the blocks in force now.

        On start the sets are rebuilt whole and swapped in; afterwards the
        whole difference is applied. A reconcile pass first compares counts
        and rules only, and in full at least every FULL_RECONCILE_EVERY; one
        that changes the kernel repaired drift, and says so. A kernel failure
        is logged and retried on the next pass.
        """
        now = time.time()
        self.last_reconcile = now
        service.publish_state(enforcement=self.backend.name, heartbeat=now)
        if self.schedule_due and self.expiry.scheduler.running:
            self.schedule_due = False
            # in the scheduler's thread: with 20,000 temporary blocks reading
            # them all takes long enough to hold up a new block
            self.expiry.scheduler.add_job(
                self._schedule_blocks,
                id="schedule-blocks",
                replace_existing=True,
                misfire_grace_time=None,
            )
        # while something is wrong, every pass is a full one, until it is not
        full_every = max(FULL_RECONCILE_EVERY, FULL_RECONCILE_SHARE * self.full_took)
        cheap = not self.trouble and now - self.last_full < full_every
        if reconcile and cheap:
            try:
                if self.backend.matches(self._held_count(now)):
                    service.publish_state(kernel_checked_at=now)
                    return
            except Exception as exc:
                log.warning("kernel check failed (%s); syncing instead", exc)
        self.last_full = now

        wanted = self.feed.whole(now)
        try:
            if rebuild:
                change = self.backend.rebuild(wanted.desired)
            else:
                change = self.backend.sync(wanted.desired)
            self.full_took = time.time() - now
        except Exception as exc:
            log.error(
                "enforcement failed; retrying in %.0f s: %s", RECONCILE_EVERY, exc
            )
            self._record_failure(wanted, now, f"enforcement failed: {exc}")
            return
        drift = unexpected(change, self.in_kernel, wanted.expires)
        if reconcile and drift:
            log.warning("kernel drift repaired: %s", drift_summary(drift))
        self._log_change(change)
        left_out = set(change.overflow)
        self.in_kernel = {
            target: expires_at
            for target, expires_at in wanted.expires.items()
            if target not in left_out
        }

        status = {i: target in change.enforced for i, target in wanted.targets.items()}
        status.update(dict.fromkeys(wanted.refused, False))
        self.kernel_status = service.record_kernel_status(
            status, self.kernel_status, now
        )
        problems = list(change.errors)
        if change.needs_setup:
            self._ask_for_setup(change.errors)
        if change.overflow:
            problems.append(
                f"{len(change.overflow)} blocks NOT enforced: the kernel sets are full"
            )
        self.trouble = bool(problems)
        self.sets_full = bool(change.overflow)
        service.publish_state(
            kernel_checked_at=now, enforcement_error="; ".join(problems)
        )

    def _ask_for_setup(self, errors):
        """Write the setup request file, for a privileged watcher to act on.

        The deployment's `sender-filter-setup.path` unit runs `python -m
        enforcement setup` as root when this file appears (and removes it).
        """
        request = self.settings.setup_request
        if request is None or request.exists():
            return
        try:
            request.write_text("\n".join(errors) + "\n")
        except OSError as exc:
            log.error("writing the setup request %s failed: %s", request, exc)
            return
        log.warning("asked for the privileged setup step: wrote %s", request)

    def _schedule_blocks(self):
        """Give the scheduler the temporary blocks it has no job for yet."""
        try:
            db.connect(reuse_if_open=True)
            self.expiry.refresh()
        except DatabaseError as exc:
            self.schedule_due = True
            log.error("scheduling the temporary blocks failed: %s", exc)
        finally:
            db.close()

    def _held_count(self, now):
        """How many entries the kernel should hold now, by what was sent."""
        return sum(1 for end in self.in_kernel.values() if end is None or end > now)

    def _record_failure(self, wanted, now, error):
        """After a failed sync: record what the kernel still enforces, and why not."""
        enforced = set()
        try:
            if not self.backend.dry_run:
                enforced = self.backend.enforced()
        except Exception as exc:
            log.error("reading what the kernel enforces failed: %s", exc)
        status = {i: target in enforced for i, target in wanted.targets.items()}
        status.update(dict.fromkeys(wanted.refused, False))
        self.kernel_status = service.record_kernel_status(
            status, self.kernel_status, now
        )
        self.trouble = True
        service.publish_state(enforcement_error=error)

    def _log_change(self, change):
        """One INFO line per entry the kernel took in or let go, or a count.

        A start after a reboot puts every block back at once: past
        LOG_EACH entries one line says how many, naming a few.
        """
        name = self.backend.name
        for entries, what in ((change.added, "now"), (change.removed, "no longer")):
            if len(entries) > LOG_EACH:
                named = ", ".join(entries[:3])
                log.info(
                    "%d entries %s enforced (%s backend): %s, ...",
                    len(entries), what, name, named,
                )  # fmt: skip
                continue
            for target in entries:
                log.info("%s %s enforced (%s backend)", target, what, name)


def unexpected(change, sent, expires):
    """The part of a change the kernel drifted into, not the database's news.

    `sent` is what the daemon last sent (target -> end), `expires` what is in
    force now. An entry sent and now missing, one never sent yet present, or
    one re-timed though its end did not change is drift; a block made,
    lifted or extended since the last pass (committed while this pass read
    the database) is not.
    """
    return replace(
        change,
        added=[entry for entry in change.added if entry in sent],
        removed=[entry for entry in change.removed if entry not in sent],
        retimed=[
            entry
            for entry in change.retimed
            if entry in sent and sent[entry] == expires.get(entry)
        ],
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
