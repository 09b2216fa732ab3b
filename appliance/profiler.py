"""The IP profiler: sliding windows in event time, episodes, block decisions.

Time is the event's own time stamp, never the wall clock, so reading
yesterday's log gives the decisions that following it live would have.
"""

import logging

from appliance import addresses
from appliance import service
from appliance.blockindex import BlockIndex
from appliance.config import THREAT_TYPES
from appliance.models import Rule
from appliance.models import SuspiciousEntry
from appliance.models import WindowEvent
from appliance.models import db

log = logging.getLogger(__name__)

BIT = {threat_type: 1 << n for n, threat_type in enumerate(THREAT_TYPES)}
SWEEP_EVERY = 60.0
SENDER_CACHE = 500_000


class SenderHistory:
    """One sender's recent events, with running sums per rule window."""

    __slots__ = ("events", "base", "heads", "sums")

    def __init__(self):
        self.events = []
        self.base = 0
        self.heads = dict.fromkeys(THREAT_TYPES, 0)
        self.sums = {t: [0, 0, 0, 0] for t in THREAT_TYPES}

    def add(self, row, windows):
        """Count one (ts, message, mask, recipients, unknown) row in every window."""
        self.events.append(row)
        ts, message, mask, recipients, unknown = row
        for threat_type, window in windows.items():
            sums = self.sums[threat_type]
            sums[0] += message
            sums[1] += 1 if mask & BIT[threat_type] else 0
            sums[2] += recipients
            sums[3] += unknown
            self._trim(threat_type, ts - window)
        self._compact()

    def _trim(self, threat_type, oldest):
        """Drop from a type's sums the events at or before `oldest`."""
        head = self.heads[threat_type]
        sums = self.sums[threat_type]
        bit = BIT[threat_type]
        while head - self.base < len(self.events):
            ts, message, mask, recipients, unknown = self.events[head - self.base]
            if ts > oldest:
                break
            sums[0] -= message
            sums[1] -= 1 if mask & bit else 0
            sums[2] -= recipients
            sums[3] -= unknown
            head += 1
        self.heads[threat_type] = head

    def _compact(self):
        """Forget events no window needs any more."""
        first = min(self.heads.values())
        drop = first - self.base
        if drop and drop * 2 >= len(self.events):
            del self.events[:drop]
            self.base = first

    def expire(self, now, windows):
        """Trim every window to `now`; True when nothing is left in any."""
        for threat_type, window in windows.items():
            self._trim(threat_type, now - window)
        self._compact()
        return min(self.heads.values()) - self.base >= len(self.events)


def crosses(sums, rule):
    """Whether window sums cross a rule: rate AND volume (AND the DHA extras)."""
    messages, violations, recipients, unknown = sums
    messages = max(messages, violations)
    if violations == 0 or messages <= rule.messages:
        return False
    if violations * 100.0 / messages <= rule.rate:
        return False
    if rule.threat_type == "dha":
        return recipients > rule.recipients and unknown > rule.unknown_recipients
    return True


class Profiler:
    """Counts events per sender and type, keeps episodes, and blocks."""

    def __init__(self, settings):
        self.settings = settings
        self.history = {}
        self.episodes = {}
        self.senders = {}
        self.blocks = BlockIndex(addresses.parse_network)
        self.pending_rows = []
        self.dirty = {}
        self.status_changed = {}
        self.now = 0.0
        self.swept = 0.0
        self.blocks_made = 0
        self.reload_rules()

    def reload_rules(self):
        """Read the rules from the database (the console may have changed them)."""
        self.rules = {rule.threat_type: rule for rule in Rule.select()}
        self.windows = {t: self.rules[t].window for t in THREAT_TYPES}

    def load(self):
        """Rebuild windows and open episodes from the database after a start."""
        latest = WindowEvent.select(WindowEvent.ts).order_by(WindowEvent.ts.desc())
        latest = latest.scalar() or 0.0
        self.now = latest
        oldest = latest - max(self.windows.values())
        rows = (
            WindowEvent.select()
            .where(WindowEvent.ts > oldest)
            .order_by(WindowEvent.id)
            .tuples()
        )
        for (
            _id,
            sender,
            ts,
            message,
            violations,
            recipients,
            unknown,
        ) in rows.iterator():
            mask = _mask(violations.split(",") if violations else ())
            history = self.history.setdefault(sender, SenderHistory())
            history.add((ts, message, mask, recipients, unknown), self.windows)
        query = SuspiciousEntry.select().where(SuspiciousEntry.open == True)  # noqa: E712
        for entry in query:
            self.episodes[(entry.sender, entry.threat_type)] = entry
        self.blocks.refresh()

    def refresh_blocks(self):
        """Take in blocks made or lifted by others (console, CLI, scheduler)."""
        self.blocks.refresh()

    def _sender(self, ip):
        """(sender text, network, sort key) for an IP, cached."""
        known = self.senders.get(ip)
        if known is None:
            if len(self.senders) > SENDER_CACHE:
                self.senders.clear()
            network = addresses.sender_of(ip, self.settings.ipv6_prefix)
            known = (
                addresses.sender_text(network),
                network,
                addresses.key_of(network.network_address),
            )
            self.senders[ip] = known
        return known

    def process(self, event):
        """Count one MailEvent and act on any rule it makes the sender cross."""
        sender, network, key = self._sender(event.ip)
        violations = event.violations
        mask = _mask(violations) if violations else 0
        history = self.history.get(sender)
        if history is None:
            history = self.history[sender] = SenderHistory()
        history.add(
            (event.ts, event.message, mask, event.recipients, event.unknown),
            self.windows,
        )
        self.pending_rows.append(
            (
                sender,
                event.ts,
                event.message,
                ",".join(violations),
                event.recipients,
                event.unknown,
            )
        )
        if event.ts > self.now:
            self.now = event.ts

        opened = False
        for threat_type in THREAT_TYPES:
            episode = self.episodes.get((sender, threat_type))
            if episode is None and threat_type not in violations:
                continue
            opened = True
            self._update_episode(sender, network, key, threat_type, episode, event)
        if not opened:
            return
        for threat_type in THREAT_TYPES:
            rule = self.rules[threat_type]
            if not rule.enabled or (sender, threat_type) not in self.episodes:
                continue
            if crosses(history.sums[threat_type], rule):
                self._act(sender, network, threat_type, history, event.ts)

    def _update_episode(self, sender, network, key, threat_type, episode, event):
        """Open, extend or close the sender's episode of one threat type."""
        if (
            episode is not None
            and event.ts - episode.last_seen >= self.windows[threat_type]
        ):
            episode.open = False
            self.dirty[id(episode)] = episode
            del self.episodes[(sender, threat_type)]
            episode = None

        if threat_type in event.violations:
            if episode is None:
                episode = self._open_episode(
                    sender, network, key, threat_type, event.ts
                )
            else:
                episode.violations += 1
                episode.messages += event.message
                episode.last_seen = event.ts
        elif episode is not None:
            episode.messages += event.message
        else:
            return
        episode.rate = round(episode.violations * 100.0 / episode.messages, 2)
        self.dirty[id(episode)] = episode

    def _open_episode(self, sender, network, key, threat_type, ts):
        """A new episode at a sender's first violation of a type."""
        episode = SuspiciousEntry(
            sender=sender,
            sender_key=key,
            threat_type=threat_type,
            first_seen=ts,
            last_seen=ts,
            violations=1,
            messages=1,
            status="suspicious",
            open=True,
        )
        block_id = self.blocks.covering(network, ts)
        if block_id is not None:
            episode.status = "blocked"
            episode.block_id = block_id
        self.episodes[(sender, threat_type)] = episode
        return episode

    def _act(self, sender, network, threat_type, history, ts):
        """Apply a crossed rule: monitor, or block unless already blocked."""
        rule = self.rules[threat_type]
        episode = self.episodes[(sender, threat_type)]
        if rule.action == "monitor":
            if episode.status == "suspicious":
                self._set_status(episode, "monitored")
                log.info("%s crossed the %s rule (monitor only)", sender, threat_type)
            return
        if self.blocks.covering(network, ts) is not None:
            return
        if episode.status == "approved":
            return

        messages, violations, recipients, unknown = history.sums[threat_type]
        messages = max(messages, violations)
        reason = f"{threat_type} rate {violations * 100.0 / messages:.0f}%"
        reason += f" over {messages} messages"
        if threat_type == "dha":
            reason += f", {unknown} of {recipients} recipients unknown"
        duration = rule.duration if rule.action == "temporary" else None
        try:
            block = service.block_network(
                network,
                threat_type=threat_type,
                duration=duration,
                actor=f"rule:{threat_type}",
                reason=reason,
                now=ts,
            )
        except service.AlreadyBlocked as refusal:
            block = refusal.block
        except service.Refused as refusal:
            self._set_status(episode, "approved")
            log.info("%s not blocked: %s", sender, refusal)
            return
        else:
            self.blocks_made += 1

        self.blocks.add(block)
        for other in THREAT_TYPES:
            open_episode = self.episodes.get((sender, other))
            if open_episode is not None:
                self._set_status(open_episode, "blocked", block.id)

    def _set_status(self, episode, status, block_id=None):
        """Change an episode's status (written at the next flush)."""
        episode.status = status
        if block_id is not None:
            episode.block_id = block_id
        self.status_changed[id(episode)] = episode
        self.dirty[id(episode)] = episode

    def flush(self):
        """Write buffered window events and changed episodes (inside a transaction)."""
        cursor = db.cursor()
        param = db.param
        if self.pending_rows:
            cursor.executemany(
                f"INSERT INTO {WindowEvent._meta.table_name} "
                "(sender, ts, message, violations, recipients, unknown) "
                f"VALUES ({', '.join([param] * 6)})",
                self.pending_rows,
            )
            self.pending_rows = []
        self._write_episodes(cursor, param)
        if self.now - self.swept >= SWEEP_EVERY:
            self._sweep()

    def _write_episodes(self, cursor, param):
        """Insert new episodes, update counters, and write status changes."""
        table = SuspiciousEntry._meta.table_name
        for episode in self.dirty.values():
            if episode.id is None:
                episode.id = _insert(cursor, table, param, episode)
        counters = [
            (e.last_seen, e.violations, e.messages, e.rate, e.open, e.id)
            for e in self.dirty.values()
        ]
        cursor.executemany(
            f"UPDATE {table} SET last_seen = {param}, violations = {param}, "
            f"messages = {param}, rate = {param}, open = {param} WHERE id = {param}",
            counters,
        )
        statuses = [(e.status, e.block_id, e.id) for e in self.status_changed.values()]
        cursor.executemany(
            f"UPDATE {table} SET status = {param}, block_id = {param} "
            f"WHERE id = {param}",
            statuses,
        )
        self.dirty = {}
        self.status_changed = {}

    def _sweep(self):
        """Forget senders and stored events that every window has left behind."""
        oldest = self.now - max(self.windows.values())
        WindowEvent.delete().where(WindowEvent.ts <= oldest).execute()
        idle = [s for s, h in self.history.items() if h.expire(self.now, self.windows)]
        for sender in idle:
            del self.history[sender]
        self.swept = self.now


def _insert(cursor, table, param, episode):
    """Insert one new episode row; returns its id."""
    cursor.execute(
        f"INSERT INTO {table} (sender, sender_key, threat_type, first_seen, "
        "last_seen, violations, messages, rate, status, open, block_id) "
        f"VALUES ({', '.join([param] * 11)})",
        (
            episode.sender,
            episode.sender_key,
            episode.threat_type,
            episode.first_seen,
            episode.last_seen,
            episode.violations,
            episode.messages,
            episode.rate,
            episode.status,
            episode.open,
            episode.block_id,
        ),
    )
    return cursor.lastrowid


def _mask(violations):
    """A bit mask of threat type names."""
    mask = 0
    for threat_type in violations:
        mask |= BIT.get(threat_type, 0)
    return mask
