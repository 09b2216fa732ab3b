"""Network-layer enforcement: make the kernel hold exactly the active blocks.

The daemon hands a backend the full desired state as data; the backend works
out the difference with what the kernel holds and applies it in one batch.
"""

import logging
import os

log = logging.getLogger(__name__)


def make_backend(settings):
    """The kernel backend when we hold CAP_NET_ADMIN, else the dry-run one."""
    from enforcement.dryrun import DryRunBackend

    wanted = settings.enforcement
    if wanted == "dry-run":
        return DryRunBackend(settings)
    if wanted == "auto" and not has_net_admin():
        log.warning("no CAP_NET_ADMIN: enforcement runs as DRY-RUN, nothing is blocked")
        return DryRunBackend(settings)
    from enforcement.kernel import KernelBackend

    return KernelBackend(settings)


def has_net_admin():
    """Whether this process holds CAP_NET_ADMIN (bit 12 of CapEff)."""
    try:
        with open(f"/proc/{os.getpid()}/status") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) & (1 << 12))
    except OSError:
        return False
    return False
