"""Join the lines of one SMTP transaction and charge it to its sender IP.

A transaction is known by its smtpd session until Postfix gives it a queue
ID (the `client=` line), and by the queue ID after that. Rejected
recipients before a queue ID exists form a "reject group": consecutive
NOQUEUE rejects of one session, client IP and sender, counted as one
transaction. Each threat type is charged at most once per transaction.

An smtpd session seen from its `connect` keeps a tally of the transactions
and recipients charged to it; its `disconnect` counters (`mail=`, `rcpt=`)
then add what no line showed: transactions the reject groups merged or that
left no line, recipients of messages that never reached qmgr.

State is small and JSON-serialisable (`dump`/`restore`), so the ingest
pipeline can save it in the same database transaction as the counts.
"""

import logging
import re
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Sequence
from typing import Any
from typing import Final
from typing import cast

from appliance.events import MailEvent
from appliance.sources import logline
from appliance.sources import maillog
from appliance.sources import postfix
from appliance.sources import scanners
from appliance.sources.logline import LogLine
from appliance.sources.timestamps import StampReader

log = logging.getLogger(__name__)

# The commonest Postfix and amavis lines, after the time stamp, each ending in
# a marker group that names it (`lastgroup`). Each is read exactly as
# `maillog.parse` would read it (rejects and verdicts by the readers' own
# functions, from the same split); lines of another form, or that nearly
# match, go there. The busiest program first, smtpd; `postfix/` is read once
# for the others. tests/test_sources_hot.py holds it to `maillog.parse`.
PID = r"\[\d{1,10}\]: "
QID = logline.QUEUE_ID
CLIENT_AT = postfix.CLIENT_AT_NAMED.format
HOT = re.compile(
    r"\S+ (?:(?P<smtpd>postfix/smtpd\[\d{1,10}\]): (?:"
    rf"connect from {CLIENT_AT(name='connect_ip')}(?P<connect>)"
    rf"|(?P<client_id>{QID}): client={CLIENT_AT(name='client_ip')}(?:,|$)(?P<client>)"
    rf"|disconnect from {CLIENT_AT(name='disconnect_ip')}(?P<disconnect>)"
    # the rejects: split as postfix.SMTPD_REJECT splits them, up to the text
    rf"|NOQUEUE: reject: RCPT from {CLIENT_AT(name='rcpt_ip')}:? ?(?P<rcpt>))"
    rf"|postfix/(?:qmgr{PID}(?:(?P<removed_id>{QID}): removed$(?P<removed>)"
    rf"|(?P<queued_id>{QID}): from=<(?P<from>[^>]{{0,320}})>, "
    r"size=\d+, nrcpt=(?P<nrcpt>\d{1,6}) (?P<queued>))"
    # delivery agents and cleanup's message-id: understood, nothing to count
    rf"|(?:(?:lmtp|smtp|local|virtual|pipe|error|bounce){PID}"
    rf"|cleanup{PID}(?:{QID}): message-id=)(?P<ignored>))"
    rf"|(?P<cleanup>postfix/cleanup\[\d{{1,10}}\]): (?P<milter_id>{QID}): "
    r"(?P<action>milter-(?:reject|discard|hold)): (?P<stage>END-OF-MESSAGE) "
    rf"from {CLIENT_AT(name='milter_ip')}:? ?(?P<milter>)"
    # amavis verdicts: split as scanners.AMAVIS_VERDICT splits them
    rf"|amavis{PID}(?:\([\w.-]{{1,40}}\) )?(?:Passed CLEAN (?P<clean>)"
    r"|Blocked (?P<category>[A-Z][A-Z0-9-]*)(?P<blocked>))"
    r")"
)

STATE_VERSION: Final = 1
QUEUED_LIFETIME: Final = 2 * 86400.0
OPEN_LIFETIME: Final = 3600.0
PRUNE_EVERY: Final = 300.0
QUEUED: Final = "queued"
SETTLED: Final = "settled"
VERDICTS: Final = frozenset(("spam", "virus"))
UNCOUNTED_STAGES: Final = ("MAIL", "VRFY")
MISSING_LIMIT: Final = 1000

Events = list[MailEvent]


class Transaction:
    """One SMTP transaction: client IP, sender, flags already charged, session."""

    __slots__ = ("ip", "sender", "ts", "flags", "session")

    def __init__(
        self,
        ip: str | None,
        sender: str | None,
        ts: float,
        flags: Iterable[str] = (),
        session: str | None = None,
    ) -> None:
        self.ip = ip
        self.sender = sender
        self.ts = ts
        self.flags = set(flags)
        self.session = session

    def as_list(self) -> list[object]:
        """The JSON form: [ip, sender, last seen, sorted flags, session]."""
        return [self.ip, self.sender, self.ts, sorted(self.flags), self.session]


class Session:
    """An smtpd session seen from `connect`: what was charged to it so far."""

    __slots__ = ("ip", "ts", "transactions", "recipients", "queue_ids")

    def __init__(
        self,
        ip: str,
        ts: float,
        transactions: int = 0,
        recipients: int = 0,
        queue_ids: Iterable[str] = (),
    ) -> None:
        self.ip = ip
        self.ts = ts
        self.transactions = transactions
        self.recipients = recipients
        self.queue_ids = list(queue_ids)

    def as_list(self) -> list[object]:
        """The JSON form: [ip, last seen, transactions, recipients, queue IDs]."""
        return [self.ip, self.ts, self.transactions, self.recipients, self.queue_ids]


class Correlator:
    """Feeds mail-log lines in order and returns the MailEvents they make.

    `lines` counts every line fed; `skipped` those not understood: no time
    stamp or program could be read, or a line of a program we follow (Postfix
    smtpd, postscreen, cleanup, qmgr; amavis, rspamd and clamav-milter
    verdicts) matched no known form. Lines known to carry nothing for the
    profiler (warnings, TLS notes, delivery agents, other programs) are
    understood and not skipped.

    An event that carries violations also carries the line that charged them
    (`line`), the evidence an administrator reads; `line` is the line being
    handled, which only the handlers that can charge a violation read.
    """

    def __init__(self, now: Callable[[], float] | None = None) -> None:
        self.stamps = StampReader() if now is None else StampReader(now=now)
        self.lines = 0
        self.skipped = 0
        self.line = ""
        self.groups: dict[str, Transaction] = {}
        self.queue: dict[str, Transaction] = {}
        self.sessions: dict[str, Session] = {}
        self.newest = 0.0
        self.pruned_at = 0.0
        self.handlers: dict[str, Callable[[LogLine], Events]] = {
            logline.CONNECT: self._connect_record,
            logline.DISCONNECT: self._disconnect_record,
            logline.SESSION_EDGE: self._session_edge,
            logline.CLIENT: self._client_record,
            logline.RCPT_REJECT: self._rcpt_reject,
            logline.VRFY_REJECT: self._vrfy_reject,
            logline.MAIL_REJECT: self._mail_reject,
            logline.DATA_REJECT: self._data_reject,
            logline.CONTENT_REJECT: self._content_reject,
            logline.QUEUED: self._queued_record,
            logline.REMOVED: self._removed,
            logline.VERDICT: self._verdict,
        }

    def feed(self, line: str) -> Events:
        """The MailEvents one log line produces (often none); never raises."""
        return self.feed_lines((line,))

    def feed_lines(self, lines: Sequence[str]) -> Events:
        """The MailEvents a batch of lines produces, in order; never raises.

        The commonest Postfix lines, those HOT knows, are read with one match
        and handled here; every other line goes through `maillog.parse`.
        """
        events: Events = []
        self.lines += len(lines)
        stamps = self.stamps
        hot = HOT.match
        stamp: tuple[float, int] | None
        ts: float
        for line in lines:
            if line.startswith(stamps.last_prefix):
                stamp = stamps.last_found
            else:
                stamp = stamps.read(line)
            found = None if stamp is None else hot(line, stamp[1])
            if found is None or stamp is None:
                events += self._feed_parsed(line)
                continue
            # every form HOT knows ends in a marker group: never None
            kind = cast(str, found.lastgroup)
            if kind == "ignored":
                continue
            ts = stamp[0]
            if ts > self.newest:
                self.newest = ts
                if ts - self.pruned_at >= PRUNE_EVERY:
                    self.prune()
            if kind == "clean":
                # amavis found nothing: the transaction is charged nothing more
                continue
            if kind == "removed":
                self.queue.pop(found["removed_id"], None)
            elif kind == "connect":
                self._connect(found["smtpd"], logline.address(found["connect_ip"]), ts)
            elif kind == "client":
                ip = logline.address(found["client_ip"])
                events += self._client(found["client_id"], found["smtpd"], ip, ts)
            elif kind == "queued":
                self.line = line
                recipients = int(found["nrcpt"])
                events += self._queued(
                    found["queued_id"], found["from"], recipients, ts
                )
            elif kind == "disconnect":
                ip = logline.address(found["disconnect_ip"])
                counters = postfix.session_counters(line, found.end())
                events += self._disconnect(found["smtpd"], ip, counters, ts)
            else:
                self.line = line
                events += self._hot_reject(kind, found, line.rstrip("\r\n"), ts)
        return events

    def _hot_reject(
        self, kind: str, found: re.Match[str], line: str, ts: float
    ) -> Events:
        """A reject or amavis verdict HOT split: read on by the reader's own rules."""
        if kind == "blocked":
            category = found["category"]
            record = scanners.amavis_verdict(category, line, found.end(), ts)
            return self._verdict(record)
        text = line[found.end() :]
        if kind == "rcpt":
            ip = found["rcpt_ip"]
            process = found["smtpd"]
            record = postfix.read_reject(
                "NOQUEUE", "reject", "RCPT", ip, text, ts, process
            )
            return self._rcpt_reject(record)
        queue_id, action, stage, ip = found.group(
            "milter_id", "action", "stage", "milter_ip"
        )
        record = postfix.read_reject(
            queue_id, action, stage, ip, text, ts, found["cleanup"]
        )
        return self._content_reject(record)

    def _feed_parsed(self, line: str) -> Events:
        """The MailEvents of a line read by `maillog.parse`."""
        self.line = line
        record = maillog.parse(line, self.stamps)
        kind = record.kind
        if kind == logline.SKIPPED:
            self.skipped += 1
            log.debug("mail-log line skipped: %r", line)
            return []
        handler = self.handlers.get(kind)
        if handler is None:
            return []

        if record.ts > self.newest:
            self.newest = record.ts
            if self.newest - self.pruned_at >= PRUNE_EVERY:
                self.prune()
        return handler(record)

    def _session_edge(self, record: LogLine) -> Events:
        """A postscreen client comes or goes: its reject group is over."""
        self.groups.pop(record.session, None)
        return []

    def _connect_record(self, record: LogLine) -> Events:
        """smtpd connect, as `maillog.parse` reads it."""
        self._connect(record.session, record.ip, record.ts)
        return []

    def _connect(self, process: str, ip: str | None, ts: float) -> None:
        """smtpd connect: a new session, with nothing charged to it yet."""
        self.groups.pop(process, None)
        if ip is None:
            self.sessions.pop(process, None)
        else:
            self.sessions[process] = Session(ip, ts)

    def _disconnect_record(self, record: LogLine) -> Events:
        """smtpd disconnect, as `maillog.parse` reads it."""
        return self._disconnect(record.session, record.ip, record.counters, record.ts)

    def _disconnect(
        self,
        process: str,
        ip: str | None,
        counters: tuple[int, int] | None,
        ts: float,
    ) -> Events:
        """smtpd disconnect: add what the session's counters show beyond its lines.

        Transactions: accepted MAIL commands beyond those charged. Recipients:
        RCPT commands beyond those charged; the session's queue IDs that have
        not reached qmgr yet are settled here, and their qmgr line adds none.
        """
        self.groups.pop(process, None)
        session = self.sessions.pop(process, None)
        if session is None or session.ip != ip or counters is None:
            return []
        accepted_mail, rcpt_commands = counters
        for queue_id in session.queue_ids:
            transaction = self.queue.get(queue_id)
            if transaction is not None and QUEUED not in transaction.flags:
                transaction.flags.add(SETTLED)

        missing = min(max(accepted_mail - session.transactions, 0), MISSING_LIMIT)
        recipients = max(rcpt_commands - session.recipients, 0)
        if not (missing or recipients):
            return []
        events = [MailEvent(ts, ip, min(missing, 1), (), recipients)]
        events += [MailEvent(ts, ip, 1) for _ in range(missing - 1)]
        return events

    def _client_record(self, record: LogLine) -> Events:
        """smtpd `client=`, as `maillog.parse` reads it."""
        queue_id = cast(str, record.queue_id)  # a CLIENT line always has one
        return self._client(queue_id, record.session, record.ip, record.ts)

    def _client(self, queue_id: str, process: str, ip: str | None, ts: float) -> Events:
        """A queue file: a new transaction, or the open reject group's one."""
        if queue_id in self.queue:
            return []
        session = self._session_of(process, ip)
        if session is not None:
            session.queue_ids.append(queue_id)
        group = self.groups.pop(process, None)
        if group is not None and group.ip == ip:
            group.ts = ts
            group.session = process
            self.queue[queue_id] = group
            return []
        transaction = Transaction(ip, None, ts, session=process)
        self.queue[queue_id] = transaction
        return self._charge(ts, transaction, 1, session=session)

    def _rcpt_reject(self, record: LogLine) -> Events:
        """A rejected recipient: one more, DHA when it does not exist; RBL is spam."""
        violations: tuple[str, ...] = ("dha",) if record.unknown else ()
        if record.verdict is not None:
            violations += (record.verdict,)
        unknown = 1 if record.unknown else 0
        if record.queue_id is not None:
            return self._charge_queue(record, violations, 1, unknown)
        return self._charge_group(record, violations, 1, unknown, close=False)

    def _vrfy_reject(self, record: LogLine) -> Events:
        """VRFY of a user that does not exist: a probe, counted as a transaction."""
        if not record.unknown:
            return []
        transaction = Transaction(record.ip, None, record.ts)
        return self._charge(record.ts, transaction, 1, ("dha",), 1, 1)

    def _mail_reject(self, record: LogLine) -> Events:
        """A rejected MAIL FROM: a transaction of its own (spam if RBL-listed)."""
        self.groups.pop(record.session, None)
        violations = (record.verdict,) if record.verdict else ()
        if record.queue_id is not None:
            return self._charge_queue(record, violations)
        transaction = Transaction(record.ip, record.sender, record.ts)
        return self._charge(record.ts, transaction, 1, violations)

    def _data_reject(self, record: LogLine) -> Events:
        """A rejected DATA/BDAT: ends the transaction (counted already if known)."""
        if record.queue_id is not None:
            return self._charge_queue(record, ())
        return self._charge_group(record, (), 0, 0, close=True)

    def _content_reject(self, record: LogLine) -> Events:
        """A milter verdict (reject, discard, hold); 4xx ones carry no verdict."""
        violations = (record.verdict,) if record.verdict else ()
        if record.queue_id is not None:
            return self._charge_queue(record, violations, record.recipients)
        close = record.stage != "RCPT"
        return self._charge_group(record, violations, record.recipients, 0, close)

    def _queued_record(self, record: LogLine) -> Events:
        """qmgr's `from=<...>, size=..., nrcpt=...`, as `maillog.parse` reads it."""
        queue_id = cast(str, record.queue_id)  # a QUEUED line always has one
        return self._queued(queue_id, record.sender, record.recipients, record.ts)

    def _queued(
        self, queue_id: str, sender: str | None, recipients: int, ts: float
    ) -> Events:
        """qmgr took the message: its accepted recipients; null sender is a bounce."""
        transaction = self.queue.get(queue_id)
        if transaction is None or QUEUED in transaction.flags:
            return []
        transaction.flags.add(QUEUED)
        transaction.ts = ts
        violations = ("bounce",) if sender == "" else ()
        if SETTLED in transaction.flags:
            return self._charge(ts, transaction, 0, violations)
        process = transaction.session
        session = None if process is None else self.sessions.get(process)
        if session is not None and queue_id not in session.queue_ids:
            session = None
        return self._charge(ts, transaction, 0, violations, recipients, session=session)

    def _removed(self, record: LogLine) -> Events:
        """qmgr removed the message: nothing more will name its queue ID."""
        self.queue.pop(cast(str, record.queue_id), None)
        return []

    def _verdict(self, record: LogLine) -> Events:
        """A scanner's verdict, charged to its queue ID's IP or the line's own IP.

        A verdict for a queue ID never seen, on a line without an IP (the log
        began mid-message), cannot be charged.
        """
        if record.verdict is None:
            return []
        queue_id = record.queue_id
        if queue_id is not None and (queue_id in self.queue or record.ip is not None):
            return self._charge_queue(record, (record.verdict,))
        if record.ip is None:
            return []
        transaction = Transaction(record.ip, None, record.ts)
        return self._charge(record.ts, transaction, 1, (record.verdict,))

    def _session_of(self, process: str, ip: str | None) -> Session | None:
        """The open smtpd session a line belongs to, if it is that client's."""
        session = self.sessions.get(process)
        if session is None or session.ip != ip:
            return None
        return session

    def _charge_queue(
        self,
        record: LogLine,
        violations: tuple[str, ...],
        recipients: int = 0,
        unknown: int = 0,
    ) -> Events:
        """Charge a queue ID's transaction; an unseen queue ID is a new one."""
        queue_id = cast(str, record.queue_id)  # the callers checked it
        transaction = self.queue.get(queue_id)
        session = self._session_of(record.session, record.ip)
        if transaction is None:
            transaction = Transaction(record.ip, record.sender, record.ts)
            self.queue[queue_id] = transaction
            if session is not None:
                transaction.session = record.session
                session.queue_ids.append(queue_id)
            message = 1
        else:
            transaction.ts = record.ts
            message = 0
        return self._charge_line(
            record, transaction, message, violations, recipients, unknown, session
        )

    def _charge_group(
        self,
        record: LogLine,
        violations: tuple[str, ...],
        recipients: int,
        unknown: int,
        close: bool,
    ) -> Events:
        """Charge a NOQUEUE line to its session's reject group, opening one if new."""
        group = self.groups.get(record.session)
        if group is None or group.ip != record.ip or group.sender != record.sender:
            group = Transaction(record.ip, record.sender, record.ts)
            self.groups[record.session] = group
            message = 1
        else:
            group.ts = record.ts
            message = 0
        if close:
            del self.groups[record.session]
        session = self._session_of(record.session, record.ip)
        return self._charge_line(
            record, group, message, violations, recipients, unknown, session
        )

    def _charge_line(
        self,
        record: LogLine,
        transaction: Transaction,
        message: int,
        violations: tuple[str, ...],
        recipients: int,
        unknown: int,
        session: Session | None,
    ) -> Events:
        """`_charge` for a line read by `maillog.parse`: its time, stage and guess."""
        return self._charge(
            record.ts,
            transaction,
            message,
            violations,
            recipients,
            unknown,
            session,
            stage=record.stage,
            guess=record.guess,
        )

    def _charge(
        self,
        ts: float,
        transaction: Transaction,
        message: int,
        violations: tuple[str, ...] = (),
        recipients: int = 0,
        unknown: int = 0,
        session: Session | None = None,
        *,
        stage: str | None = None,
        guess: bool = False,
    ) -> Events:
        """The event for one line of a transaction; each type at most once per one.

        A guessed verdict (a bare milter reject) is dropped when the transaction
        already has a verdict. The session, if given, tallies what was charged
        (a message at the SMTP `stage` of the line, if it counts one).
        """
        if session is not None:
            session.ts = ts
            session.recipients += recipients
            if message and stage not in UNCOUNTED_STAGES:
                session.transactions += 1
        new: tuple[str, ...] = ()
        if violations:
            flags = transaction.flags
            if not (guess and not flags.isdisjoint(VERDICTS)):
                new = tuple(v for v in violations if v not in flags)
                flags.update(new)
        if transaction.ip is None:
            return []
        if not (message or new or recipients):
            return []
        line = self.line.rstrip("\r\n") if new else None
        return [MailEvent(ts, transaction.ip, message, new, recipients, unknown, line)]

    def prune(self) -> None:
        """Forget sessions and queue IDs no line has named for a long while."""
        open_since = self.newest - OPEN_LIFETIME
        queued_since = self.newest - QUEUED_LIFETIME
        self.groups = {
            key: group for key, group in self.groups.items() if group.ts >= open_since
        }
        self.sessions = {
            key: session
            for key, session in self.sessions.items()
            if session.ts >= open_since
        }
        self.queue = {
            queue_id: transaction
            for queue_id, transaction in self.queue.items()
            if transaction.ts
            >= (queued_since if QUEUED in transaction.flags else open_since)
        }
        self.pruned_at = self.newest

    def dump(self) -> dict[str, object]:
        """The correlation state and counters as plain JSON-serialisable data."""
        return {
            "version": STATE_VERSION,
            "lines": self.lines,
            "skipped": self.skipped,
            "newest": self.newest,
            "pruned_at": self.pruned_at,
            "groups": {key: group.as_list() for key, group in self.groups.items()},
            "queue": {key: entry.as_list() for key, entry in self.queue.items()},
            "sessions": {key: s.as_list() for key, s in self.sessions.items()},
        }

    @classmethod
    def restore(
        cls, state: dict[str, Any] | None, now: Callable[[], float] | None = None
    ) -> "Correlator":
        """A Correlator that goes on where the one that dumped `state` stopped."""
        correlator = cls(now=now)
        if not state or state.get("version") != STATE_VERSION:
            if state:
                log.warning(
                    "correlation state version %r ignored", state.get("version")
                )
            return correlator
        correlator.lines = state["lines"]
        correlator.skipped = state["skipped"]
        correlator.newest = state["newest"]
        correlator.pruned_at = state["pruned_at"]
        correlator.groups = {
            key: Transaction(*entry) for key, entry in state["groups"].items()
        }
        correlator.queue = {
            key: Transaction(*entry) for key, entry in state["queue"].items()
        }
        correlator.sessions = {
            key: Session(*entry) for key, entry in state.get("sessions", {}).items()
        }
        return correlator
