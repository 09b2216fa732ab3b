"""The dry-run backend: keeps blocks in memory and logs what the kernel would do.

For machines without CAP_NET_ADMIN (a laptop, a test run). Every log line
starts with DRY-RUN so nobody mistakes it for enforcement, and each sync
reports nothing as enforced, so no block reads as held by the kernel.
"""

import logging
import math
import threading
import time

from enforcement.plan import compare
from enforcement.plan import plan
from enforcement.plan import wanted_state

log = logging.getLogger(__name__)


class DryRunBackend:
    """Holds the blocks a kernel would hold, with their countdowns, in memory."""

    name = "dry-run"
    dry_run = True

    def __init__(self, settings, clock=time.monotonic):
        """An empty pretend kernel; `clock` gives seconds, for tests."""
        self.settings = settings
        self.clock = clock
        self.deadlines = {}
        self._lock = threading.RLock()

    def setup(self):
        """Say loudly that nothing will be blocked."""
        log.warning(
            "DRY-RUN: enforcement backend is dry-run, no sender is blocked "
            "(would create sets %s and %s, chain %s)",
            self.settings.set_v4,
            self.settings.set_v6,
            self.settings.chain,
        )
        return []

    def sync(self, desired, check_rules=True):
        """Pretend to make the kernel hold `desired`; log each would-be change."""
        with self._lock:
            change = plan(self._held(), desired)
            self._apply(change)
            return change

    def apply(self, added, removed):
        """Pretend to add and remove just these entries."""
        with self._lock:
            held = self._held()
            wanted = dict(held)
            for entry in wanted_state(dict.fromkeys(removed)):
                wanted.pop(entry, None)
            wanted.update(wanted_state(added))
            change = compare(held, wanted)
            self._apply(change)
            return change

    def rebuild(self, desired):
        """Pretend to load `desired` into fresh sets and swap them in."""
        with self._lock:
            wanted = wanted_state(desired)
            change = compare(self._held(), wanted)
            log.info("DRY-RUN: would rebuild the sets with %d entries", len(wanted))
            self._apply(change)
            return change

    def matches(self, count):
        """Never takes the shortcut: a dry-run sync is cheap."""
        return False

    def enforced(self):
        """The entries the pretend kernel holds right now."""
        with self._lock:
            return set(self._held())

    def teardown(self):
        """Forget every pretend entry."""
        with self._lock:
            self.deadlines.clear()
            log.info(
                "DRY-RUN: would remove chain %s and both sets", self.settings.chain
            )

    def _held(self):
        """Entries still running, with remaining seconds (None: permanent)."""
        now = self.clock()
        expired = [
            entry
            for entry, deadline in self.deadlines.items()
            if deadline is not None and deadline <= now
        ]
        for entry in expired:
            del self.deadlines[entry]
        return {
            entry: None if deadline is None else math.ceil(deadline - now)
            for entry, deadline in self.deadlines.items()
        }

    def _apply(self, change):
        """Log the change line by line and keep its result in memory.

        `change.enforced` stays empty: no kernel holds any of it, so the
        daemon records every block as not enforced.
        """
        for line in change.lines():
            log.info("DRY-RUN: would %s", line)

        now = self.clock()
        for entry in change.removed:
            del self.deadlines[entry]
        for entry in change.added + change.retimed:
            timeout = change.timeouts[entry]
            self.deadlines[entry] = None if timeout is None else now + timeout
