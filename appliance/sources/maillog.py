"""One mail-log line read as what it means: a connection, a reject, a verdict.

`parse` never raises. It tells apart lines that matter (kinds below), lines
it knows to be irrelevant (IGNORED) and lines it cannot read (SKIPPED).
"""

import logging
import re

from appliance.addresses import AddressError
from appliance.addresses import parse_ip

log = logging.getLogger(__name__)

IGNORED = "ignored"
SKIPPED = "skipped"
CONNECT = "connect"
DISCONNECT = "disconnect"
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

HEADER = re.compile(r"\S+ ([^\s\[\]:]+)(?:\[(\d{1,10})\])?: ")
QUEUE_ID = r"[0-9A-F]{5,16}|[0-9BCDFGHJ-NP-TV-Zbcdfghj-np-tv-z]{10,20}"
CLIENT_AT = r"([^\s\[\]]*)\[([^\]\s]{1,80})\](?::\d{1,5})?"
SMTPD_SESSION = re.compile(rf"(connect|disconnect) from {CLIENT_AT}")
SMTPD_CLIENT = re.compile(rf"({QUEUE_ID}): client={CLIENT_AT}(?:,|$)")
SMTPD_REJECT = re.compile(
    rf"(NOQUEUE|{QUEUE_ID}): (reject|milter-reject|milter-discard|milter-hold"
    rf"|reject_warning|proxy-reject): ([A-Z-]{{4,14}}) from {CLIENT_AT}:? ?(.*)"
)
SENDER = re.compile(r"\bfrom=<([^>\s]{0,320})>")
POSTSCREEN_SESSION = re.compile(rf"(CONNECT from|DISCONNECT) {CLIENT_AT}")
QMGR_QUEUED = re.compile(
    rf"({QUEUE_ID}): from=<([^>]{{0,320}})>, size=\d+, nrcpt=(\d{{1,6}}) "
)
QMGR_OTHER = re.compile(
    rf"({QUEUE_ID}): (removed$|from=<[^>]{{0,320}}>, status=|to=<|skipped, )"
)
CLEANUP_ACTION = re.compile(rf"({QUEUE_ID}): [a-z_-]+(?:=|: )")
SMTPD_ACTION = re.compile(
    rf"(?:NOQUEUE|{QUEUE_ID}): (?:hold|discard|filter|redirect|warn|info|prepend"
    rf"|replace|bcc|dunno|ok): "
)
AMAVIS_VERDICT = re.compile(r"(?:\([\w.-]{1,40}\) )?(Passed|Blocked) ([A-Z][A-Z0-9-]*)")
AMAVIS_QUEUE_ID = re.compile(rf"Queue-ID: ({QUEUE_ID})\b")
BRACKETED = re.compile(r"\[([^\]\s]{2,80})\]")

UNKNOWN_RECIPIENT = re.compile(
    r"user unknown|undeliverable address|unknown user|no such user", re.IGNORECASE
)
MALWARE = re.compile(r"virus|infected|malware", re.IGNORECASE)

SMTPD_NOISE = (
    "warning:",
    "error:",
    "fatal:",
    "panic:",
    "statistics:",
    "lost connection after ",
    "timeout after ",
    "too many errors after ",
    "improper command pipelining after ",
    "NOQUEUE: lost connection after ",
    "NOQUEUE: timeout after ",
    "SSL_accept error from ",
    "Anonymous TLS connection established from ",
    "Trusted TLS connection established from ",
    "Untrusted TLS connection established from ",
    "Verified TLS connection established from ",
    "discarding EHLO keywords:",
    "setting up TLS connection from ",
    "proxy-accept:",
    "xclient: ",
)
NOISE_ACTIONS = ("reject_warning", "proxy-reject")
DATA_STAGES = ("DATA", "BDAT", "END-OF-MESSAGE")
AMAVIS_SPAM = ("SPAM", "SPAMMY")
AMAVIS_VIRUS = ("INFECTED",)
ADDRESS_CACHE_LIMIT = 65536


class LogLine:
    """The parts of a mail-log line that the correlator needs.

    `session` names the SMTP session a line belongs to: the smtpd process, or
    for postscreen (one process, many clients) the process and client IP.
    `ip` is the client's address as text, None when unknown or loopback.
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
        "stage",
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
        self.stage = None

    def __repr__(self):
        """A compact form for test failures and debug logs."""
        fields = (f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"LogLine({', '.join(fields)})"


IGNORED_LINE = LogLine(IGNORED)
SKIPPED_LINE = LogLine(SKIPPED)
_addresses = {}


def address(text):
    """A client address as normalised text; None if not one, loopback or scoped."""
    found = _addresses.get(text, False)
    if found is not False:
        return found
    try:
        parsed = parse_ip(text)
    except (AddressError, ValueError):
        found = None
    else:
        local = parsed.is_loopback or getattr(parsed, "scope_id", None)
        found = None if local else str(parsed)
    if len(_addresses) >= ADDRESS_CACHE_LIMIT:
        _addresses.clear()
    _addresses[text] = found
    return found


def parse(line, stamps):
    """Read one line with a timestamps.StampReader; never raises."""
    try:
        return _parse(line, stamps)
    except Exception:  # a parser bug must not stop ingest; the line is skipped
        log.warning("mail-log line not parsed (parser error): %r", line, exc_info=True)
        return SKIPPED_LINE


def _parse(line, stamps):
    """Split off stamp, host and program, then read the program's message."""
    if not line or line.isspace():
        return IGNORED_LINE
    stamp = stamps.read(line)
    if stamp is None:
        return SKIPPED_LINE
    ts, start = stamp
    header = HEADER.match(line, start)
    if header is None:
        return SKIPPED_LINE
    program = header[1]
    message = line[header.end() :].rstrip("\r\n")

    if program.startswith("postfix"):
        reader = POSTFIX_READERS.get(program[program.rfind("/") + 1 :])
        if reader is None:
            return IGNORED_LINE
        return reader(message, ts, f"{program}[{header[2]}]")
    if program.startswith(("amavis", "/usr/sbin/amavis")):
        return _read_amavis(message, ts)
    return IGNORED_LINE


def _read_smtpd(message, ts, process):
    """smtpd: sessions, queue files (`client=`) and rejects."""
    first = message[:1]
    if first == "c" or first == "d":
        match = SMTPD_SESSION.match(message)
        if match is not None:
            kind = CONNECT if match[1] == "connect" else DISCONNECT
            return LogLine(kind, ts, process, ip=address(match[3]))
    if message.startswith(SMTPD_NOISE):
        return IGNORED_LINE
    if "client=" in message:
        match = SMTPD_CLIENT.match(message)
        if match is not None:
            return LogLine(CLIENT, ts, process, match[1], address(match[3]))
    if "reject" in message or "milter-" in message:
        match = SMTPD_REJECT.match(message)
        if match is not None:
            return _reject(match, ts, process)
        return SKIPPED_LINE
    if SMTPD_ACTION.match(message):
        return IGNORED_LINE
    return SKIPPED_LINE


def _reject(match, ts, session):
    """A reject line of smtpd, postscreen or cleanup, by action and stage."""
    queue_id, action, stage, ip, text = match.group(1, 2, 3, 5, 6)
    if action in NOISE_ACTIONS:
        return IGNORED_LINE
    queue_id = None if queue_id == "NOQUEUE" else queue_id
    record = LogLine(CONTENT_REJECT, ts, session, queue_id, address(ip))
    record.stage = stage
    sender = SENDER.search(text)
    record.sender = sender[1] if sender is not None else None

    if action != "reject":
        if action != "milter-reject" or text[:1] == "5":
            record.verdict = "virus" if MALWARE.search(text) else "spam"
        if stage == "RCPT":
            record.recipients = 1
        return record
    if stage == "RCPT" or stage == "VRFY":
        record.kind = RCPT_REJECT if stage == "RCPT" else VRFY_REJECT
        record.recipients = 1
        record.unknown = _names_unknown_recipient(text)
    elif stage == "MAIL":
        record.kind = MAIL_REJECT
    elif stage in DATA_STAGES:
        record.kind = DATA_REJECT
    else:
        record.kind = SESSION_REJECT
    return record


def _names_unknown_recipient(text):
    """Whether Postfix's own reason is that the recipient does not exist.

    Only the first `... rejected:` clause counts: a sender verification reply
    may quote a remote server's "Recipient address rejected: User unknown".
    """
    at = text.find(" rejected: ")
    if at < 17 or not text.startswith("Recipient address", at - 17):
        return False
    return UNKNOWN_RECIPIENT.match(text, at + 11) is not None


def _read_postscreen(message, ts, process):
    """postscreen: its RCPT rejects; its session lines only close reject groups."""
    if message.startswith("NOQUEUE: reject: "):
        match = SMTPD_REJECT.match(message)
        if match is None:
            return SKIPPED_LINE
        return _reject(match, ts, f"{process} {match[5]}")
    if message.startswith(("CONNECT from ", "DISCONNECT ")):
        match = POSTSCREEN_SESSION.match(message)
        if match is not None:
            kind = CONNECT if match[1] == "CONNECT from" else DISCONNECT
            session = f"{process} {match[3]}"
            return LogLine(kind, ts, session, ip=address(match[3]))
    return IGNORED_LINE


def _read_cleanup(message, ts, process):
    """cleanup: milter verdicts; header/body checks and message-ids are ignored."""
    if "milter-" in message:
        match = SMTPD_REJECT.match(message)
        if match is not None:
            return _reject(match, ts, process)
    if CLEANUP_ACTION.match(message) or message.startswith(SMTPD_NOISE):
        return IGNORED_LINE
    return SKIPPED_LINE


def _read_qmgr(message, ts, process):
    """qmgr: a message entering the active queue (sender, recipients), and removal."""
    match = QMGR_QUEUED.match(message)
    if match is not None:
        record = LogLine(QUEUED, ts, process, match[1])
        record.sender = match[2]
        record.recipients = int(match[3])
        return record
    match = QMGR_OTHER.match(message)
    if match is not None:
        if match[2] == "removed":
            return LogLine(REMOVED, ts, process, match[1])
        return IGNORED_LINE
    if message.startswith(SMTPD_NOISE):
        return IGNORED_LINE
    return SKIPPED_LINE


def _read_amavis(message, ts):
    """amavis: a Passed/Blocked verdict with the Queue-ID it was given."""
    if "Passed " not in message and "Blocked " not in message:
        return IGNORED_LINE
    match = AMAVIS_VERDICT.match(message)
    if match is None:
        return SKIPPED_LINE
    category = match[2]
    if category in AMAVIS_SPAM:
        verdict = "spam"
    elif category in AMAVIS_VIRUS:
        verdict = "virus"
    else:
        verdict = None
    queue_id = AMAVIS_QUEUE_ID.search(message, match.end())
    record = LogLine(VERDICT, ts, "amavis", queue_id and queue_id[1])
    record.verdict = verdict
    record.ip = _first_client(message, match.end())
    return record


def _first_client(message, start):
    """The first non-loopback bracketed IP before the sender address, if any."""
    end = message.find(" <", start)
    if end < 0:
        end = len(message)
    for match in BRACKETED.finditer(message, start, end):
        found = address(match[1])
        if found is not None:
            return found
    return None


POSTFIX_READERS = {
    "smtpd": _read_smtpd,
    "qmqpd": _read_smtpd,
    "postscreen": _read_postscreen,
    "cleanup": _read_cleanup,
    "qmgr": _read_qmgr,
}
