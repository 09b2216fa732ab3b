"""What one mail-log line means, as the readers hand it to the correlator.

The readers (`postfix`, `scanners`) fill a `LogLine`; `maillog.parse` picks
the reader. Kinds name what a line is; IGNORED lines are understood and carry
nothing, SKIPPED lines are not understood.
"""

import logging
from typing import Final
from typing import cast

from appliance.addresses import AddressError
from appliance.addresses import parse_ip

log = logging.getLogger(__name__)

IGNORED: Final = "ignored"
SKIPPED: Final = "skipped"
CONNECT: Final = "connect"
DISCONNECT: Final = "disconnect"
SESSION_EDGE: Final = "session-edge"
CLIENT: Final = "client"
RCPT_REJECT: Final = "rcpt-reject"
VRFY_REJECT: Final = "vrfy-reject"
MAIL_REJECT: Final = "mail-reject"
DATA_REJECT: Final = "data-reject"
SESSION_REJECT: Final = "session-reject"
CONTENT_REJECT: Final = "content-reject"
QUEUED: Final = "queued"
REMOVED: Final = "removed"
VERDICT: Final = "verdict"

QUEUE_ID: Final = r"[0-9A-F]{5,16}|[0-9BCDFGHJ-NP-TV-Zbcdfghj-np-tv-z]{10,20}"
ADDRESS_CACHE_LIMIT: Final = 65536
FIELDS: Final = (
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

    __slots__ = FIELDS

    def __init__(
        self,
        kind: str,
        ts: float = 0.0,
        session: str = "",
        queue_id: str | None = None,
        ip: str | None = None,
    ) -> None:
        self.kind = kind
        self.ts = ts
        self.session = session
        self.queue_id = queue_id
        self.ip = ip
        self.sender: str | None = None
        self.recipients = 0
        self.unknown = False
        self.verdict: str | None = None
        self.guess = False
        self.stage: str | None = None
        self.counters: tuple[int, int] | None = None

    def __repr__(self) -> str:
        """A compact form for test failures and debug logs."""
        # FIELDS, not __slots__: a class compiled by mypyc has no __slots__
        fields = [f"{name}={getattr(self, name)!r}" for name in FIELDS]
        return f"LogLine({', '.join(fields)})"


IGNORED_LINE = LogLine(IGNORED)
SKIPPED_LINE = LogLine(SKIPPED)
_addresses: dict[str, str | None] = {}


def address(text: str) -> str | None:
    """A client address as normalised text; None if not one, or one never charged.

    Loopback, unspecified (`0.0.0.0`, `::`) and scoped link-local addresses
    are never a sender to count.
    """
    cached = _addresses.get(text, False)
    if cached is not False:
        return cast(str | None, cached)
    found: str | None
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
