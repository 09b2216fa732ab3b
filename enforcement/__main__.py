"""`python -m enforcement setup|teardown`: the privileged one-shot steps.

The daemon runs with CAP_NET_ADMIN only, which is enough for ipset, for the
jump and for cutting connections, but iptables needs CAP_NET_RAW as well to
write or read a rule that names an ipset. The service runs `setup` as root
before the daemon starts (and `teardown` never, unless asked): sets, chain,
rule and jump are then in place for the unprivileged daemon.
"""

import argparse
import logging
import sys

from appliance import config
from enforcement.kernel import EnforcementError
from enforcement.kernel import KernelBackend


def main(argv=None):
    """Create (setup) or remove (teardown) the sets and rules; exit 2 on failure."""
    parser = argparse.ArgumentParser(prog="python -m enforcement")
    parser.add_argument("action", choices=("setup", "teardown"))
    parser.add_argument("--config", help="the appliance's config file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

    try:
        settings = config.load(args.config)
        backend = KernelBackend(settings)
        if args.action == "setup":
            made = backend.setup()
            done = f"created {', '.join(made)}" if made else "already in place"
        else:
            backend.teardown()
            done = "sets and rules removed"
    except (config.ConfigError, EnforcementError, ValueError) as exc:
        print(f"python -m enforcement {args.action}: {exc}", file=sys.stderr)
        return 2
    print(f"{args.action}: {done} ({backend.driver.name} iptables)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
