"""Postfix's programs read line by line: smtpd, postscreen, cleanup and qmgr.

Each reader takes the message part of a line (after `postfix/smtpd[pid]: `),
its time stamp and the process name, and returns a LogLine. Other Postfix
programs (delivery agents, bounce, pickup, master, anvil...) carry nothing
for the profiler and are not read.
"""

import logging
import re
from collections.abc import Callable
from typing import Final

from appliance.sources.logline import CLIENT
from appliance.sources.logline import CONNECT
from appliance.sources.logline import CONTENT_REJECT
from appliance.sources.logline import DATA_REJECT
from appliance.sources.logline import DISCONNECT
from appliance.sources.logline import IGNORED_LINE
from appliance.sources.logline import MAIL_REJECT
from appliance.sources.logline import QUEUE_ID
from appliance.sources.logline import QUEUED
from appliance.sources.logline import RCPT_REJECT
from appliance.sources.logline import REMOVED
from appliance.sources.logline import SESSION_EDGE
from appliance.sources.logline import SESSION_REJECT
from appliance.sources.logline import SKIPPED_LINE
from appliance.sources.logline import VRFY_REJECT
from appliance.sources.logline import LogLine
from appliance.sources.logline import address

log = logging.getLogger(__name__)

CLIENT_AT: Final = r"([^\s\[\]]*)\[([^\]\s]{1,80})\](?::\d{1,5})?"
# the same, with the address as a named group (a `str.format` template)
CLIENT_AT_NAMED: Final = r"[^\s\[\]]*\[(?P<{name}>[^\]\s]{{1,80}})\](?::\d{{1,5}})?"
SMTPD_SESSION: Final = re.compile(rf"(connect|disconnect) from {CLIENT_AT}")
SMTPD_CLIENT: Final = re.compile(rf"({QUEUE_ID}): client={CLIENT_AT}(?:,|$)")
SMTPD_REJECT: Final = re.compile(
    rf"(NOQUEUE|{QUEUE_ID}): (reject|milter-reject|milter-discard|milter-hold"
    rf"|reject_warning|proxy-reject): ([A-Z-]{{4,14}}) from {CLIENT_AT}:? ?(.*)"
)
COUNTERS: Final = re.compile(
    r" mail=(\d{1,6})(?:/\d{1,6})?(?: rcpt=(\d{1,6})(?:/(\d{1,6}))?)?"
)
# `\bfrom=<...>`, written to start with its literal so the search skips ahead
# in C: the look-behind refuses a word character before `from`
SENDER: Final = re.compile(r"from=<(?<!\wfrom=<)([^>\s]{0,320})>")
POSTSCREEN_SESSION: Final = re.compile(rf"(?:CONNECT from|DISCONNECT) {CLIENT_AT}")
QMGR_QUEUED: Final = re.compile(
    rf"({QUEUE_ID}): from=<([^>]{{0,320}})>, size=\d+, nrcpt=(\d{{1,6}}) "
)
QMGR_OTHER: Final = re.compile(
    rf"({QUEUE_ID}): (removed$|from=<[^>]{{0,320}}>, status=|to=<|skipped, )"
)
CLEANUP_ACTION: Final = re.compile(rf"({QUEUE_ID}): [a-z_-]+(?:=|: )")
SMTPD_ACTION: Final = re.compile(
    rf"(?:NOQUEUE|{QUEUE_ID}): (?:hold|discard|filter|redirect|warn|info|prepend"
    rf"|replace|bcc|dunno|ok): "
)

UNKNOWN_RECIPIENT: Final = re.compile(
    r"user unknown|undeliverable address|unknown user|no such user", re.IGNORECASE
)
MALWARE_WORDS: Final = ("virus", "infected", "malware")
MALWARE: Final = re.compile("|".join(MALWARE_WORDS), re.IGNORECASE)
SPAM_WORD: Final = re.compile(r"spam", re.IGNORECASE)
BLOCKLISTED: Final = " blocked using "

SMTPD_NOISE: Final = (
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
POSTSCREEN_NOTES: Final = (
    "PASS NEW ",
    "PASS OLD ",
    "PREGREET ",
    "DNSBL rank ",
    "HANGUP after ",
    "COMMAND TIME LIMIT from ",
    "COMMAND COUNT LIMIT from ",
    "COMMAND LENGTH LIMIT from ",
    "COMMAND PIPELINING from ",
    "NON-SMTP COMMAND from ",
    "BARE NEWLINE from ",
    "DATA without valid RCPT from ",
    "BDAT without valid RCPT from ",
    "ALLOWLISTED ",
    "WHITELISTED ",
    "DENYLISTED ",
    "BLACKLISTED ",
    "ALLOWLIST VETO ",
    "WHITELIST VETO ",
    "cache ",
    "warning:",
    "error:",
    "fatal:",
    "panic:",
)
NOISE_ACTIONS: Final = ("reject_warning", "proxy-reject")
DATA_STAGES: Final = ("DATA", "BDAT", "END-OF-MESSAGE")
BEFORE_TRANSACTION: Final = ("CONNECT", "EHLO", "HELO", "STARTTLS", "AUTH", "ETRN")


def read_smtpd(message: str, ts: float, process: str) -> LogLine:
    """smtpd: sessions, queue files (`client=`) and rejects."""
    first = message[:1]
    if first == "c" or first == "d":
        match = SMTPD_SESSION.match(message)
        if match is not None:
            if match[1] == "connect":
                return LogLine(CONNECT, ts, process, ip=address(match[3]))
            record = LogLine(DISCONNECT, ts, process, ip=address(match[3]))
            record.counters = session_counters(message, match.end())
            return record
    # before the noise: no noise prefix can start a `QUEUEID: client=` line
    if "client=" in message:
        match = SMTPD_CLIENT.match(message)
        if match is not None:
            return LogLine(CLIENT, ts, process, match[1], address(match[3]))
    if message.startswith(SMTPD_NOISE):
        return IGNORED_LINE
    if "reject" in message or "milter-" in message:
        match = SMTPD_REJECT.match(message)
        if match is not None:
            return _reject(match, ts, process)
        return SKIPPED_LINE
    if SMTPD_ACTION.match(message):
        return IGNORED_LINE
    return SKIPPED_LINE


def session_counters(message: str, start: int) -> tuple[int, int] | None:
    """(accepted MAIL commands, RCPT commands) from a disconnect's counters.

    Postfix 3.0+ ends a session with `ehlo=1 mail=1 rcpt=1/3 ... commands=5/7`:
    `name=N` when all N succeeded, `name=ok/total` otherwise. None when the
    line has no counters (older Postfix); (0, 0) when the client sent no MAIL.
    """
    if " commands=" not in message:
        return None
    match = COUNTERS.search(message, start)
    if match is None:
        return 0, 0
    return int(match[1]), int(match[3] or match[2] or 0)


def _reject(match: re.Match[str], ts: float, session: str) -> LogLine:
    """A reject line of smtpd, postscreen or cleanup, as SMTPD_REJECT split it."""
    queue_id, action, stage, ip, text = match.group(1, 2, 3, 5, 6)
    return read_reject(queue_id, action, stage, ip, text, ts, session)


def read_reject(
    queue_id: str,
    action: str,
    stage: str,
    ip: str,
    text: str,
    ts: float,
    session: str,
) -> LogLine:
    """A reject line read from its parts, by action and stage.

    The parts are SMTPD_REJECT's groups: queue ID or `NOQUEUE`, action, SMTP
    stage, the client's address as text, and the text after the client.
    """
    if action in NOISE_ACTIONS:
        return IGNORED_LINE
    known = None if queue_id == "NOQUEUE" else queue_id
    record = LogLine(CONTENT_REJECT, ts, session, known, address(ip))
    record.stage = stage
    sender = SENDER.search(text)
    record.sender = sender[1] if sender is not None else None

    if action != "reject":
        return _milter_verdict(record, action, text)
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
    if stage != "VRFY" and BLOCKLISTED in text:
        record.verdict = "spam"
    return record


def _milter_verdict(record: LogLine, action: str, text: str) -> LogLine:
    """milter-reject/-discard/-hold: the scanner's verdict, when there is one.

    A 4xx reply (greylisting, rspamd's soft reject) is no verdict. A reply that
    names malware is `virus`; any other is `spam`, marked a guess unless the
    reply says spam, so a named verdict for the same message wins.
    """
    if record.stage in BEFORE_TRANSACTION:
        record.kind = SESSION_REJECT
        return record
    if action != "milter-reject" or text[:1] == "5":
        if _names_malware(text):
            record.verdict = "virus"
        else:
            record.verdict = "spam"
            record.guess = SPAM_WORD.search(text) is None
    if record.stage == "RCPT":
        record.recipients = 1
    return record


def _names_malware(text: str) -> bool:
    """Whether a reply names malware, in any letter case.

    ASCII text (nearly all) is lower-cased and searched for the words, several
    times faster than the case-blind regex, which other text still goes to
    (it also matches Unicode case variants).
    """
    if text.isascii():
        lowered = text.lower()
        return any(word in lowered for word in MALWARE_WORDS)
    return MALWARE.search(text) is not None


def _names_unknown_recipient(text: str) -> bool:
    """Whether Postfix's own reason is that the recipient does not exist.

    Only the first `... rejected: ` clause counts: a sender verification reply
    may quote a remote server's "Recipient address rejected: User unknown".
    """
    at = text.find(" rejected: ")
    if at < 17 or not text.startswith("Recipient address", at - 17):
        return False
    return UNKNOWN_RECIPIENT.match(text, at + 11) is not None


def read_postscreen(message: str, ts: float, process: str) -> LogLine:
    """postscreen: its RCPT rejects; session lines close a client's reject group."""
    if message.startswith("NOQUEUE: reject: "):
        match = SMTPD_REJECT.match(message)
        if match is None:
            return SKIPPED_LINE
        return _reject(match, ts, f"{process} {match[5]}")
    if message.startswith(("CONNECT from ", "DISCONNECT ")):
        match = POSTSCREEN_SESSION.match(message)
        if match is None:
            return SKIPPED_LINE
        session = f"{process} {match[2]}"
        return LogLine(SESSION_EDGE, ts, session, ip=address(match[2]))
    if message.startswith(POSTSCREEN_NOTES):
        return IGNORED_LINE
    return SKIPPED_LINE


def read_cleanup(message: str, ts: float, process: str) -> LogLine:
    """cleanup: milter verdicts; header/body checks and message-ids are ignored."""
    if "milter-" in message:
        match = SMTPD_REJECT.match(message)
        if match is not None:
            return _reject(match, ts, process)
    if CLEANUP_ACTION.match(message) or message.startswith(SMTPD_NOISE):
        return IGNORED_LINE
    return SKIPPED_LINE


def read_qmgr(message: str, ts: float, process: str) -> LogLine:
    """qmgr: a message entering the active queue (sender, recipients), and removal."""
    if message.endswith(": removed"):
        # the most common qmgr line: QMGR_QUEUED cannot match it
        match = QMGR_OTHER.match(message)
        if match is not None and match[2] == "removed":
            return LogLine(REMOVED, ts, process, match[1])
    queued = QMGR_QUEUED.match(message)
    if queued is not None:
        match = queued
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


READERS: Final[dict[str, Callable[[str, float, str], LogLine]]] = {
    "smtpd": read_smtpd,
    "qmqpd": read_smtpd,
    "postscreen": read_postscreen,
    "cleanup": read_cleanup,
    "qmgr": read_qmgr,
}
