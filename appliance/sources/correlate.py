"""Join the lines of one SMTP transaction and charge it to its sender IP.

A transaction is known by its smtpd session until Postfix gives it a queue
ID (the `client=` line), and by the queue ID after that. Rejected
recipients before a queue ID exists form a "reject group": consecutive
NOQUEUE rejects of one session, client IP and sender, counted as one
transaction. Each threat type is charged at most once per transaction.

State is small and JSON-serialisable (`dump`/`restore`), so the ingest
pipeline can save it in the same database transaction as the counts.
"""

import logging

from appliance.events import MailEvent
from appliance.sources import maillog
from appliance.sources.timestamps import StampReader

log = logging.getLogger(__name__)

STATE_VERSION = 1
QUEUED_LIFETIME = 2 * 86400.0
OPEN_LIFETIME = 3600.0
PRUNE_EVERY = 300.0
QUEUED = "queued"


class Transaction:
    """One SMTP transaction: client IP, sender, and the flags already charged."""

    __slots__ = ("ip", "sender", "ts", "flags")

    def __init__(self, ip, sender, ts, flags=()):
        self.ip = ip
        self.sender = sender
        self.ts = ts
        self.flags = set(flags)

    def as_list(self):
        """The JSON form: [ip, sender, last seen, sorted flags]."""
        return [self.ip, self.sender, self.ts, sorted(self.flags)]


class Correlator:
    """Feeds mail-log lines in order and returns the MailEvents they make.

    `lines` counts every line fed; `skipped` those not understood: no time
    stamp or program could be read, or a line of a program we follow (Postfix
    smtpd, postscreen, cleanup, qmgr; amavis verdicts) matched no known form.
    Lines known to carry nothing for the profiler (warnings, SASL failures,
    TLS notes, other programs) are understood and not skipped.
    """

    def __init__(self, now=None):
        self.stamps = StampReader() if now is None else StampReader(now=now)
        self.lines = 0
        self.skipped = 0
        self.groups = {}
        self.queue = {}
        self.newest = 0.0
        self.pruned_at = 0.0
        self.handlers = {
            maillog.CONNECT: self._session_edge,
            maillog.DISCONNECT: self._session_edge,
            maillog.CLIENT: self._client,
            maillog.RCPT_REJECT: self._rcpt_reject,
            maillog.VRFY_REJECT: self._vrfy_reject,
            maillog.MAIL_REJECT: self._mail_reject,
            maillog.DATA_REJECT: self._data_reject,
            maillog.CONTENT_REJECT: self._content_reject,
            maillog.QUEUED: self._queued,
            maillog.REMOVED: self._removed,
            maillog.VERDICT: self._verdict,
        }

    def feed(self, line):
        """The MailEvents one log line produces (often none); never raises."""
        self.lines += 1
        record = maillog.parse(line, self.stamps)
        kind = record.kind
        if kind == maillog.SKIPPED:
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

    def _session_edge(self, record):
        """connect/disconnect: whatever reject group the session had is over."""
        self.groups.pop(record.session, None)
        return []

    def _client(self, record):
        """A queue file: a new transaction, or the open reject group's one."""
        if record.queue_id in self.queue:
            return []
        group = self.groups.pop(record.session, None)
        if group is not None and group.ip == record.ip:
            group.ts = record.ts
            self.queue[record.queue_id] = group
            return []
        transaction = Transaction(record.ip, None, record.ts)
        self.queue[record.queue_id] = transaction
        return _charge(record.ts, transaction, 1)

    def _rcpt_reject(self, record):
        """A rejected recipient: one more recipient, DHA when it does not exist."""
        violation = "dha" if record.unknown else None
        unknown = 1 if record.unknown else 0
        if record.queue_id is not None:
            return self._charge_queue(record, violation, 1, unknown)
        return self._charge_group(record, violation, 1, unknown, close=False)

    def _vrfy_reject(self, record):
        """VRFY of a user that does not exist: a probe, counted as a transaction."""
        if not record.unknown:
            return []
        transaction = Transaction(record.ip, None, record.ts)
        return _charge(record.ts, transaction, 1, "dha", 1, 1)

    def _mail_reject(self, record):
        """A rejected MAIL FROM: a transaction of its own, nothing more."""
        self.groups.pop(record.session, None)
        if record.queue_id is not None:
            return self._charge_queue(record, None)
        return _charge(record.ts, Transaction(record.ip, record.sender, record.ts), 1)

    def _data_reject(self, record):
        """A rejected DATA/BDAT: ends the transaction (counted already if known)."""
        if record.queue_id is not None:
            return self._charge_queue(record, None)
        return self._charge_group(record, None, 0, 0, close=True)

    def _content_reject(self, record):
        """A milter verdict (reject, discard, hold); 4xx ones carry no verdict."""
        if record.queue_id is not None:
            return self._charge_queue(record, record.verdict, record.recipients)
        close = record.stage != "RCPT"
        return self._charge_group(record, record.verdict, record.recipients, 0, close)

    def _queued(self, record):
        """qmgr took the message: its accepted recipients; null sender is a bounce."""
        transaction = self.queue.get(record.queue_id)
        if transaction is None or QUEUED in transaction.flags:
            return []
        transaction.flags.add(QUEUED)
        transaction.ts = record.ts
        violation = "bounce" if record.sender == "" else None
        return _charge(record.ts, transaction, 0, violation, record.recipients)

    def _removed(self, record):
        """qmgr removed the message: nothing more will name its queue ID."""
        self.queue.pop(record.queue_id, None)
        return []

    def _verdict(self, record):
        """An amavis verdict, charged to its queue ID's IP or the line's own IP."""
        if record.verdict is None:
            return []
        if record.queue_id is not None:
            return self._charge_queue(record, record.verdict)
        transaction = Transaction(record.ip, None, record.ts)
        return _charge(record.ts, transaction, 1, record.verdict)

    def _charge_queue(self, record, violation, recipients=0, unknown=0):
        """Charge a queue ID's transaction; an unseen queue ID is a new one."""
        transaction = self.queue.get(record.queue_id)
        if transaction is None:
            transaction = Transaction(record.ip, record.sender, record.ts)
            self.queue[record.queue_id] = transaction
            message = 1
        else:
            transaction.ts = record.ts
            message = 0
        return _charge(record.ts, transaction, message, violation, recipients, unknown)

    def _charge_group(self, record, violation, recipients, unknown, close):
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
        return _charge(record.ts, group, message, violation, recipients, unknown)

    def prune(self):
        """Forget sessions and queue IDs no line has named for a long while."""
        open_since = self.newest - OPEN_LIFETIME
        queued_since = self.newest - QUEUED_LIFETIME
        self.groups = {
            session: group
            for session, group in self.groups.items()
            if group.ts >= open_since
        }
        self.queue = {
            queue_id: transaction
            for queue_id, transaction in self.queue.items()
            if transaction.ts
            >= (queued_since if QUEUED in transaction.flags else open_since)
        }
        self.pruned_at = self.newest

    def dump(self):
        """The correlation state and counters as plain JSON-serialisable data."""
        return {
            "version": STATE_VERSION,
            "lines": self.lines,
            "skipped": self.skipped,
            "newest": self.newest,
            "pruned_at": self.pruned_at,
            "groups": {key: group.as_list() for key, group in self.groups.items()},
            "queue": {key: entry.as_list() for key, entry in self.queue.items()},
        }

    @classmethod
    def restore(cls, state, now=None):
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
        return correlator


def _charge(ts, transaction, message, violation=None, recipients=0, unknown=0):
    """The event for one line of a transaction; each type at most once per one."""
    violations = ()
    if violation is not None and violation not in transaction.flags:
        transaction.flags.add(violation)
        violations = (violation,)
    if transaction.ip is None:
        return []
    if not (message or violations or recipients):
        return []
    return [MailEvent(ts, transaction.ip, message, violations, recipients, unknown)]
