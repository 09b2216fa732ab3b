"""Running the kernel's command-line tools: ipset, iptables-nft-restore, ss."""

import logging
import shlex
import subprocess

log = logging.getLogger(__name__)

COMMAND_TIMEOUT = 60


def run(argv, batch=None):
    """Run a command, returning its result; failing to start reads as exit 127."""
    try:
        return subprocess.run(
            argv,
            input=batch,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return subprocess.CompletedProcess(argv, 127, "", str(exc))


def best_effort(argv, harmless=None):
    """Run a command whose failure is logged, not raised; its output, or None."""
    result = run(argv)
    if result.returncode == 0 or (harmless and harmless in result.stderr):
        return result.stdout
    detail = result.stderr.strip() or f"exit {result.returncode}"
    log.warning("best-effort command failed: `%s`: %s", shlex.join(argv), detail)
    return None
