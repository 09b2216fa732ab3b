"""Domain names as the lists take them: checked and written one way, no DNS asked.

Kept apart from `resolve` so that what only reads names does not load the
DNS library (about 30 ms at every start of the CLI).
"""

import re

# letters, digits and hyphens per label, at least two labels, 253 characters
LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


class ResolveError(Exception):
    """A name that is not a domain name, or that gives no address."""


def domain_name(text):
    """A domain name in lower case without the final dot; ResolveError if not one."""
    name = text.strip().lower().removesuffix(".")
    labels = name.split(".")
    if (
        len(name) > 253
        or len(labels) < 2
        or not all(LABEL.match(label) for label in labels)
        or labels[-1].isdigit()
    ):
        raise ResolveError(f"{text.strip()[:60]!r} is not a domain name")
    return name
