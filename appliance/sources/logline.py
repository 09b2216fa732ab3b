"""What one mail-log line means, as the readers hand it to the correlator.

The readers (`postfix`, `scanners`) fill a `LogLine`; `maillog.parse` picks
the reader. Kinds name what a line is; IGNORED lines are understood and carry
nothing, SKIPPED lines are not understood.
"""

import logging

from appliance.addresses import AddressError
from appliance.addresses import parse_ip

log = logging.getLogger(__name__)

IGNORED = "ignored"
SKIPPED = "skipped"
CONNECT = "connect"
DISCONNECT = "disconnect"
SESSION_EDGE = "session-edge"
CLIENT = "client"
RCPT_REJECT = "rcpt-reject"
VRFY_REJECT = "vrfy-reject"
MAIL_REJECT = "mail-reject"
DATA_REJECT = "data-reject"
SESSION_REJECT = "session-reject"
CONTENT_REJECT = "content-reject"
QUEUED = "queued"
REMOVED = "removed"
VERDICT = "verdict"

QUEUE_ID = r"[0-9A-F]{5,16}|[0-9BCDFGHJ-NP-TV-Zbcdfghj-np-tv-z]{10,20}"
ADDRESS_CACHE_LIMIT = 65536


class LogLine:
    """The parts of a mail-log line that the correlator needs.

    `session` names the SMTP session a line belongs to: the smtpd process, or
    for postscreen (one process, many clients) the process and client IP.
    `ip` is the client's address as text, None when unknown or loopback.
    `verdict` is a threat type a scanner or reject gave the message; `guess`
    says it was inferred from a reply that names no reason (a bare milter
    reject), so a named verdict for the same message takes its place.
    `counters` are a disconnect's (accepted MAIL commands, RCPT commands).
    """

    __slots__ = (
        "kind",
        "ts",
        "session",
        "queue_id",
        "ip",
        "sender",
        "recipients",
        "unknown",
        "verdict",
        "guess",
        "stage",
        "counters",
    )

    def __init__(self, kind, ts=0.0, session="", queue_id=None, ip=None):
        self.kind = kind
        self.ts = ts
        self.session = session
        self.queue_id = queue_id
        self.ip = ip
        self.sender = None
        self.recipients = 0
        self.unknown = False
        self.verdict = None
        self.guess = False
        self.stage = None
        self.counters = None

    def __repr__(self):
        """A compact form for test failures and debug logs."""
        fields = (f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"LogLine({', '.join(fields)})"


IGNORED_LINE = LogLine(IGNORED)
SKIPPED_LINE = LogLine(SKIPPED)
_addresses = {}


def address(text):
    """A client address as normalised text; None if not one, or one never charged.

    Loopback, unspecified (`0.0.0.0`, `::`) and scoped link-local addresses
    are never a sender to count.
    """
    found = _addresses.get(text, False)
    if found is not False:
        return found
    try:
        parsed = parse_ip(text)
    except (AddressError, ValueError):
        found = None
    else:
        local = (
            parsed.is_loopback
            or parsed.is_unspecified
            or getattr(parsed, "scope_id", None)
        )
        found = None if local else str(parsed)
    if len(_addresses) >= ADDRESS_CACHE_LIMIT:
        _addresses.clear()
    _addresses[text] = found
    return found
