"""What a log source hands the profiler: one event per counted fact."""

from typing import NamedTuple


class MailEvent(NamedTuple):
    """Something a sender IP did, at event time `ts` (epoch seconds, UTC).

    A named tuple: cheap to make, and to send between processes in bulk.

    `message` is 1 when this event is a new SMTP transaction from the IP, 0
    when it adds to one already counted (a verdict, more recipients).
    `violations` names the threat types this transaction violates, each at
    most once per transaction. `recipients` and `unknown` are recipients the
    transaction named and how many of those do not exist. `line` is the
    text of the log line (or JSON-lines event) that produced the event, kept
    only on events that carry violations: it is the entry's evidence.
    """

    ts: float
    ip: str
    message: int = 0
    violations: tuple[str, ...] = ()
    recipients: int = 0
    unknown: int = 0
    line: str | None = None
