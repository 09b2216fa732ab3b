"""The JSON-lines event format: other scanners' events, one JSON object a line.

`parse_event` checks one decoded object; the decoder (for files the daemon
follows) and the API (which appends the events it accepts to the events spool,
a file the daemon follows like any log) both use it, so a line the API accepted
is a line the decoder understands. docs/events.md describes the format.
"""

import errno
import fcntl
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from datetime import datetime

from appliance import addresses
from appliance.config import THREAT_TYPES
from appliance.events import MailEvent
from appliance.sources.timestamps import EARLIEST
from appliance.sources.timestamps import FUTURE_SLACK

log = logging.getLogger(__name__)

STATE_FORMAT = 1
FIELDS = ("time", "ip", "message", "verdicts", "recipients", "unknown_recipients")
KEYS = frozenset((*FIELDS, "id"))
MAX_RECIPIENTS = 10000
MAX_ID_LENGTH = 128
MAX_LINE = 4096
ID_LIFETIME = 3600.0
MAX_IDS = 20000
PRUNE_EVERY = 60.0
RFC3339 = re.compile(
    r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?(Z|[+-]\d\d:\d\d)", re.IGNORECASE
)
SPOOL_NAME = "events.jsonl"


class EventError(ValueError):
    """An event that does not follow the format; the message says why."""


@dataclass(frozen=True, slots=True)
class ScannerEvent:
    """One checked event: epoch seconds (UTC), the sender IP as text, counts.

    `verdicts` is in THREAT_TYPES order and holds `dha` whenever `unknown` is
    above 0. `id` names the sender's transaction, or is None.
    """

    ts: float
    ip: str
    message: bool = False
    verdicts: tuple[str, ...] = ()
    recipients: int = 0
    unknown: int = 0
    id: str | None = None

    def as_json(self):
        """The event in the format's own keys, fields at their default left out."""
        shown = {"time": self.ts, "ip": self.ip}
        if self.message:
            shown["message"] = True
        if self.verdicts:
            shown["verdicts"] = list(self.verdicts)
        if self.recipients:
            shown["recipients"] = self.recipients
        if self.unknown:
            shown["unknown_recipients"] = self.unknown
        if self.id is not None:
            shown["id"] = self.id
        return shown


def loads_strict(text):
    """Decode JSON text, refusing NaN, Infinity and a key given twice."""
    return json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_object)


def _refuse_constant(name):
    """NaN and Infinity are not JSON numbers."""
    raise EventError(f"{name} is not a number")


def _object(pairs):
    """A JSON object as a dict; a key given twice is an error, not the last wins."""
    found = {}
    for key, value in pairs:
        if key in found:
            raise EventError(f"key {key!r} is given twice")
        found[key] = value
    return found


def parse_event(reported, now):
    """Check one decoded JSON value against the format; raises EventError.

    `now` is the current epoch time: an event more than a day ahead of it is
    refused, so a scanner with a wrong clock cannot move the windows forward.
    """
    if not isinstance(reported, dict):
        raise EventError("an event is a JSON object")
    strangers = sorted(set(reported) - KEYS)
    if strangers:
        raise EventError(f"unknown key {strangers[0]!r}")

    ts = _time(reported, now)
    ip = _sender(reported)
    message = _message(reported)
    verdicts = _verdicts(reported)
    recipients = _count(reported, "recipients")
    unknown = _count(reported, "unknown_recipients")
    transaction_id = _transaction_id(reported)
    if unknown > recipients:
        raise EventError("unknown_recipients is more than recipients")
    if unknown and "dha" not in verdicts:
        verdicts = tuple(t for t in THREAT_TYPES if t in verdicts or t == "dha")
    if not (message or verdicts or recipients):
        raise EventError(
            "the event counts nothing: give message, verdicts or recipients"
        )

    return ScannerEvent(ts, ip, message, verdicts, recipients, unknown, transaction_id)


def _time(reported, now):
    """`time`: RFC 3339 with a zone, or epoch seconds; from 2000 to a day ahead."""
    if "time" not in reported:
        raise EventError("time is missing")
    value = reported["time"]
    if isinstance(value, str):
        if not RFC3339.fullmatch(value):
            raise EventError(f"time {value!r} is not RFC 3339 with a zone")
        try:
            ts = datetime.fromisoformat(value.upper()).timestamp()
        except ValueError as exc:
            raise EventError(f"time {value!r} is not a real time ({exc})") from exc
    elif isinstance(value, int | float) and not isinstance(value, bool):
        try:
            ts = float(value)
        except OverflowError as exc:
            raise EventError("time is far too large a number") from exc
        if not math.isfinite(ts):
            raise EventError("time is not a finite number")
    else:
        raise EventError("time is an RFC 3339 string or epoch seconds")
    if ts < EARLIEST:
        raise EventError("time is before the year 2000")
    if ts > now + FUTURE_SLACK:
        raise EventError("time is more than a day ahead of this appliance's clock")
    return ts


def _sender(reported):
    """`ip`: the sender's IPv4 or IPv6 address; loopback and the like refused."""
    if "ip" not in reported:
        raise EventError("ip is missing")
    value = reported["ip"]
    if not isinstance(value, str):
        raise EventError("ip is a string")
    try:
        address = addresses.parse_ip(value)
    except addresses.AddressError as exc:
        raise EventError(str(exc)) from exc
    if address.is_loopback:
        raise EventError(f"{address} is loopback, which is never counted")
    if address.is_unspecified or address.is_multicast:
        raise EventError(f"{address} cannot be the address of a sender")
    return str(address)


def _message(reported):
    """`message`: true (or 1) when the event is a new transaction."""
    value = reported.get("message", False)
    if isinstance(value, bool) or (type(value) is int and value in (0, 1)):
        return bool(value)
    raise EventError("message is true, false, 1 or 0")


def _verdicts(reported):
    """`verdicts`: threat types, each at most once, in THREAT_TYPES order."""
    value = reported.get("verdicts", [])
    if not isinstance(value, list):
        raise EventError("verdicts is a list of threat types")
    for verdict in value:
        if verdict not in THREAT_TYPES:
            raise EventError(
                f"verdict {verdict!r} is not one of {', '.join(THREAT_TYPES)}"
            )
    if len(set(value)) != len(value):
        raise EventError("a verdict is given twice")
    return tuple(t for t in THREAT_TYPES if t in value)


def _count(reported, key):
    """A recipient count: a whole number from 0 to MAX_RECIPIENTS."""
    value = reported.get(key, 0)
    if not isinstance(value, int) or isinstance(value, bool):
        raise EventError(f"{key} is a whole number")
    if not 0 <= value <= MAX_RECIPIENTS:
        raise EventError(f"{key} is from 0 to {MAX_RECIPIENTS}")
    return value


def _transaction_id(reported):
    """`id`: optional; printable text of 1 to MAX_ID_LENGTH characters."""
    if "id" not in reported:
        return None
    value = reported["id"]
    if not isinstance(value, str) or not value:
        raise EventError("id is a non-empty string")
    if len(value) > MAX_ID_LENGTH or not value.isprintable():
        raise EventError(f"id is at most {MAX_ID_LENGTH} printable characters")
    return value


def encode_event(event):
    """One event as a spool line (UTF-8 bytes ending in a newline)."""
    text = json.dumps(event.as_json(), separators=(",", ":"), ensure_ascii=False)
    return (text + "\n").encode()


class Charged:
    """What one sender's transaction id has been charged: flags and totals."""

    __slots__ = ("ts", "message", "flags", "recipients", "unknown")

    def __init__(self, ts, message=0, flags=(), recipients=0, unknown=0):
        self.ts = ts
        self.message = message
        self.flags = set(flags)
        self.recipients = recipients
        self.unknown = unknown

    def as_list(self):
        """The JSON form: [last seen, message, sorted flags, recipients, unknown]."""
        return [
            self.ts,
            self.message,
            sorted(self.flags),
            self.recipients,
            self.unknown,
        ]


class JsonLinesDecoder:
    """Feeds JSON-lines events in order and returns the MailEvents they make.

    The same interface as the mail-log Correlator. `lines` counts every line
    fed, `skipped` those that are not a valid event (blank lines are neither
    events nor skipped). An event with an `id` adds to that sender's
    transaction only what it has not been charged yet: the message once, each
    threat type once, and recipient totals above the ones already counted. Ids
    are remembered for ID_LIFETIME seconds of event time after their last
    event, at most MAX_IDS of them.
    """

    def __init__(self, now=None):
        self.now = time.time if now is None else now
        self.lines = 0
        self.skipped = 0
        self.charged = {}
        self.newest = 0.0
        self.pruned_at = 0.0

    def feed(self, line):
        """The MailEvents one line produces (none or one); never raises."""
        self.lines += 1
        text = line.strip()
        if not text:
            return []
        try:
            if len(text) > MAX_LINE:
                raise EventError(f"line longer than {MAX_LINE} characters")
            event = parse_event(loads_strict(text), self.now())
        except (ValueError, RecursionError, OverflowError) as exc:
            self.skipped += 1
            log.debug("JSON-lines event skipped (%s): %r", exc, text[:200])
            return []

        if event.ts > self.newest:
            self.newest = event.ts
            if self.newest - self.pruned_at >= PRUNE_EVERY:
                self.prune()
        if event.id is None:
            message = int(event.message)
            return _mail_event(
                event, message, event.verdicts, event.recipients, event.unknown, text
            )
        return self._charge_transaction(event, text)

    def feed_lines(self, lines):
        """The MailEvents a batch of lines produces, in order."""
        return [event for line in lines for event in self.feed(line)]

    def _charge_transaction(self, event, text):
        """The part of an event with an id that its transaction was not charged."""
        key = f"{event.ip} {event.id}"
        charged = self.charged.pop(key, None) or Charged(event.ts)
        message = int(event.message and not charged.message)
        violations = tuple(t for t in event.verdicts if t not in charged.flags)
        recipients = max(event.recipients - charged.recipients, 0)
        unknown = max(event.unknown - charged.unknown, 0)

        charged.ts = max(charged.ts, event.ts)
        charged.message |= message
        charged.flags.update(violations)
        charged.recipients += recipients
        charged.unknown += unknown
        self.charged[key] = charged
        if len(self.charged) > MAX_IDS:
            del self.charged[next(iter(self.charged))]
        return _mail_event(event, message, violations, recipients, unknown, text)

    def prune(self):
        """Forget ids no event has named for ID_LIFETIME seconds of event time."""
        since = self.newest - ID_LIFETIME
        self.charged = {
            key: charged for key, charged in self.charged.items() if charged.ts >= since
        }
        self.pruned_at = self.newest

    def dump(self):
        """The remembered ids and the counters as plain JSON-serialisable data."""
        return {
            "jsonlines": STATE_FORMAT,
            "lines": self.lines,
            "skipped": self.skipped,
            "newest": self.newest,
            "pruned_at": self.pruned_at,
            "ids": {key: charged.as_list() for key, charged in self.charged.items()},
        }

    @classmethod
    def restore(cls, state, now=None):
        """A decoder that goes on where the one that dumped `state` stopped."""
        decoder = cls(now=now)
        if not state or state.get("jsonlines") != STATE_FORMAT:
            if state:
                log.warning("JSON-lines state %r ignored", sorted(state)[:6])
            return decoder
        decoder.lines = state["lines"]
        decoder.skipped = state["skipped"]
        decoder.newest = state["newest"]
        decoder.pruned_at = state["pruned_at"]
        decoder.charged = {key: Charged(*entry) for key, entry in state["ids"].items()}
        return decoder


def _mail_event(event, message, violations, recipients, unknown, text):
    """The MailEvent for what an event adds; none when it adds nothing.

    One that charges violations carries the event's JSON `text`: its evidence.
    """
    if not (message or violations or recipients or unknown):
        return []
    line = text if violations else None
    return [
        MailEvent(event.ts, event.ip, message, violations, recipients, unknown, line)
    ]


def spool_path(settings):
    """The events spool: where the API leaves events for the daemon to follow."""
    return settings.database.parent / SPOOL_NAME


def append_to_spool(path, events):
    """Append checked events to the spool in one locked write: all or none.

    Raises OSError when the events could not be written; the spool is then
    left as it was. The write is flushed to disk before this returns.
    """
    payload = b"".join(encode_event(event) for event in events)
    descriptor = _open_locked(path)
    try:
        size = os.fstat(descriptor).st_size
        if size and os.pread(descriptor, 1, size - 1) != b"\n":
            # a line torn by a crashed writer stays a line of its own (skipped)
            payload = b"\n" + payload
        try:
            written = os.write(descriptor, payload)
            if written != len(payload):
                raise OSError(
                    errno.ENOSPC, f"{written} of {len(payload)} bytes written"
                )
            os.fsync(descriptor)
        except OSError:
            os.ftruncate(descriptor, size)
            raise
    finally:
        os.close(descriptor)


def _open_locked(path, attempts=3):
    """The spool opened for appending and locked, reopened if it was rotated."""
    for _ in range(attempts):
        descriptor = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        try:
            if os.stat(path).st_ino == os.fstat(descriptor).st_ino:
                return descriptor
        except FileNotFoundError:
            pass
        os.close(descriptor)
    raise OSError(errno.EAGAIN, f"{path} kept being rotated while opening it")
