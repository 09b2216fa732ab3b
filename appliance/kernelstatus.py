"""How enforcement reads to an administrator, the same on the console and the CLI.

A block's kernel status is what the daemon's latest check of the kernel sets
wrote to `Block.enforced`; the state of enforcement as a whole is what the
daemon publishes in `ApplianceState`: its backend, its heartbeat and the
enforcement error of its latest pass.
"""

import time

from appliance.models import ApplianceState

# the daemon publishes a heartbeat every few seconds
DAEMON_SILENT = 30

IN_KERNEL = "in kernel"
NOT_IN_KERNEL = "NOT in kernel"
DRY_RUN = "not enforced (dry-run)"
NOT_CHECKED = "not checked yet"
STATUSES = (IN_KERNEL, NOT_IN_KERNEL, NOT_CHECKED, DRY_RUN)


def published():
    """What the daemon published: key -> ApplianceState row."""
    return {row.key: row for row in ApplianceState.select()}


def block_status(block, dry_run=False):
    """One block's kernel status in words, as the daemon's latest check found it.

    Under the dry-run backend nothing reaches the kernel, whatever a row says.
    """
    if dry_run:
        return DRY_RUN
    if block.enforced is None:
        return NOT_CHECKED
    return IN_KERNEL if block.enforced else NOT_IN_KERNEL


def notice(state=None, now=None):
    """The warning about enforcement as a whole, one paragraph, or "" when none.

    Says when no daemon has run or it went silent, the enforcement error it
    published, or that it only pretends (dry-run). `state` is `published()`.
    """
    state = published() if state is None else state
    now = time.time() if now is None else now
    backend = state.get("enforcement")
    heartbeat = state.get("heartbeat")
    if backend is None or heartbeat is None:
        return "The daemon has not run yet: no block is enforced."
    error = state.get("enforcement_error")
    if now - heartbeat.updated_at > DAEMON_SILENT:
        silent = (
            "The daemon is not running: new blocks, unblocks and changes do not "
            "reach the kernel until it runs again. What the kernel held at its "
            "last check still acts, and temporary entries still end on time."
        )
        if error is not None and error.value:
            silent += f" Its last check found: ENFORCEMENT ERROR: {error.value}."
        return silent
    if error is not None and error.value:
        return (
            f"ENFORCEMENT ERROR: {error.value}. Blocks shown as NOT in kernel are "
            "not enforced; see the daemon's log."
        )
    if backend.value == "dry-run":
        return (
            "Enforcement is DRY-RUN: the daemon logs what it would block and "
            "blocks nothing."
        )
    return ""
