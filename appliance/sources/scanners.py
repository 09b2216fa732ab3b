"""Content scanners' own log lines: amavis, rspamd's task log, clamav-milter.

Each gives a VERDICT for a Postfix queue ID (and, where the line has it, the
client IP). Verdicts Postfix itself logs as milter replies are read in
`postfix`; these are the scanners' side of the same messages.
"""

import logging
import re
from typing import Final

from appliance.sources.logline import IGNORED_LINE
from appliance.sources.logline import QUEUE_ID
from appliance.sources.logline import SKIPPED_LINE
from appliance.sources.logline import VERDICT
from appliance.sources.logline import LogLine
from appliance.sources.logline import address

log = logging.getLogger(__name__)

AMAVIS_VERDICT: Final = re.compile(
    r"(?:\([\w.-]{1,40}\) )?(Passed|Blocked) ([A-Z][A-Z0-9-]*)"
)
AMAVIS_QUEUE_ID: Final = re.compile(rf"Queue-ID: ({QUEUE_ID})\b")
BRACKETED: Final = re.compile(r"\[([^\]\s]{2,80})\]")
# amavis content categories, without a numbered subcategory (`BAD-HEADER-0`)
AMAVIS_THREATS: Final = {
    "SPAM": "spam",
    "SPAMMY": "spam",
    "INFECTED": "virus",
    "BANNED": "virus",
}

RSPAMD_TASK: Final = "rspamd_task_write_log: "
RSPAMD_RESULT: Final = re.compile(r"\(\w[\w-]{0,40}: [TFS] \(([a-z ]{2,24})\): \[")
RSPAMD_QUEUE_ID: Final = re.compile(r"\bqid: <([^>\s]{0,40})>")
RSPAMD_CLIENT: Final = re.compile(r"\bip: ([0-9A-Fa-f:.]{2,45})(?:,|\s|$)")
RSPAMD_VIRUS_SYMBOL: Final = re.compile(r"[\[,] ?[A-Z0-9_]{0,40}VIRUS\(")
# rspamd actions that mean the message was taken for spam
RSPAMD_SPAM_ACTIONS: Final = frozenset(
    ("reject", "add header", "rewrite subject", "discard", "quarantine")
)

CLAMAV_INFECTED: Final = " infected by "
WHOLE_QUEUE_ID: Final = re.compile(QUEUE_ID)


def read_amavis(message: str, ts: float) -> LogLine:
    """amavis: a Passed/Blocked verdict with the Queue-ID it was given."""
    if "Passed " not in message and "Blocked " not in message:
        return IGNORED_LINE
    match = AMAVIS_VERDICT.match(message)
    if match is None:
        return SKIPPED_LINE
    return amavis_verdict(match[2], message, match.end(), ts)


def amavis_verdict(category: str, message: str, start: int, ts: float) -> LogLine:
    """The VERDICT of an amavis category, its queue ID and IP read from `start` on."""
    if category[-1:].isdigit():
        category = category.rstrip("0123456789").rstrip("-")
    verdict = AMAVIS_THREATS.get(category)
    if verdict is None:
        # a verdict of no threat is charged nothing: its queue ID and IP go unread
        return LogLine(VERDICT, ts, "amavis")
    queue_id = AMAVIS_QUEUE_ID.search(message, start)
    record = LogLine(VERDICT, ts, "amavis", queue_id and queue_id[1])
    record.verdict = verdict
    record.ip = _first_client(message, start)
    return record


def _first_client(message: str, start: int) -> str | None:
    """The first non-loopback bracketed IP before the sender address, if any."""
    end = message.find(" <", start)
    if end < 0:
        end = len(message)
    for match in BRACKETED.finditer(message, start, end):
        found = address(match[1])
        if found is not None:
            return found
    return None


def read_rspamd(message: str, ts: float) -> LogLine:
    """rspamd: the task log line a scan ends with; its other lines are ignored.

    `(default: T (reject): [16.50/15.00] [SYMBOL(1.00){...},...])`: an action
    that takes the message for spam is `spam`; a symbol named `..._VIRUS`
    (CLAM_VIRUS, FPROT_VIRUS...) is `virus`, whatever the action.
    """
    at = message.find(RSPAMD_TASK)
    if at < 0:
        return IGNORED_LINE
    result = RSPAMD_RESULT.search(message, at)
    if result is None:
        return SKIPPED_LINE

    found = RSPAMD_QUEUE_ID.search(message, at, result.start())
    queue_id: str | None = None
    if found is not None and WHOLE_QUEUE_ID.fullmatch(found[1]):
        queue_id = found[1]
    client = RSPAMD_CLIENT.search(message, at, result.start())
    record = LogLine(VERDICT, ts, "rspamd", queue_id)
    record.ip = address(client[1]) if client is not None else None
    if RSPAMD_VIRUS_SYMBOL.search(message, result.end() - 1):
        record.verdict = "virus"
    elif result[1] in RSPAMD_SPAM_ACTIONS:
        record.verdict = "spam"
    return record


def read_clamav_milter(message: str, ts: float) -> LogLine:
    """clamav-milter: `Message QID from <a> to <b> ... infected by NAME` is a virus.

    The line names no client IP: without a queue ID (LogInfected Basic) the
    verdict cannot be charged and the line is only understood.
    """
    if not message.startswith("Message ") or CLAMAV_INFECTED not in message:
        return IGNORED_LINE
    queue_id = message[8 : message.find(" ", 8)]
    if WHOLE_QUEUE_ID.fullmatch(queue_id) is None:
        return IGNORED_LINE
    record = LogLine(VERDICT, ts, "clamav-milter", queue_id)
    record.verdict = "virus"
    return record
