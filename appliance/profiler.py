"""The IP profiler: sliding windows in event time, episodes, block decisions.

Time is the event's own time stamp, never the wall clock, so reading
yesterday's log gives the decisions that following it live would have.
"""

import logging

from appliance import addresses
from appliance import service
from appliance.config import THREAT_TYPES
from appliance.models import Rule
from appliance.models import SuspiciousEntry
from appliance.models import WindowEvent

log = logging.getLogger(__name__)

BIT = {threat_type: 1 << n for n, threat_type in enumerate(THREAT_TYPES)}
FOREVER = float("inf")
SWEEP_EVERY = 60.0


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
        self.blocked_until = {}
        self.pending_rows = []
        self.dirty = set()
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
            WindowEvent.select().where(WindowEvent.ts > oldest).order_by(WindowEvent.id)
        )
        for row in rows.iterator():
            mask = _mask(row.violations.split(",") if row.violations else ())
            history = self.history.setdefault(row.sender, SenderHistory())
            history.add(
                (row.ts, row.message, mask, row.recipients, row.unknown), self.windows
            )
        query = SuspiciousEntry.select().where(SuspiciousEntry.open == True)  # noqa: E712
        for entry in query:
            self.episodes[(entry.sender, entry.threat_type)] = entry
        self.blocked_until = {}

    def forget_blocks(self):
        """Drop cached block state; the next crossing asks the database again."""
        self.blocked_until = {}

    def process(self, event):
        """Count one MailEvent and act on any rule it makes the sender cross."""
        network = addresses.sender_of(event.ip, self.settings.ipv6_prefix)
        sender = addresses.sender_text(network)
        mask = _mask(event.violations)
        row = (event.ts, event.message, mask, event.recipients, event.unknown)
        history = self.history.get(sender)
        if history is None:
            history = self.history[sender] = SenderHistory()
        history.add(row, self.windows)
        self.pending_rows.append(
            (sender, *row[:2], ",".join(event.violations), *row[3:])
        )
        self.now = max(self.now, event.ts)

        for threat_type in THREAT_TYPES:
            self._update_episode(sender, network, threat_type, event)
        for threat_type in THREAT_TYPES:
            rule = self.rules[threat_type]
            if not rule.enabled or (sender, threat_type) not in self.episodes:
                continue
            if crosses(history.sums[threat_type], rule):
                self._act(sender, network, threat_type, history, event.ts)

    def _update_episode(self, sender, network, threat_type, event):
        """Open, extend or close the sender's episode of one threat type."""
        key = (sender, threat_type)
        episode = self.episodes.get(key)
        if (
            episode is not None
            and event.ts - episode.last_seen >= self.windows[threat_type]
        ):
            episode.open = False
            self.dirty.add(episode)
            del self.episodes[key]
            episode = None

        if threat_type in event.violations:
            if episode is None:
                episode = self._open_episode(sender, network, threat_type, event.ts)
            else:
                episode.violations += 1
                episode.messages += event.message
                episode.last_seen = event.ts
        elif episode is not None:
            episode.messages += event.message
        else:
            return
        episode.rate = round(episode.violations * 100.0 / episode.messages, 2)
        self.dirty.add(episode)

    def _open_episode(self, sender, network, threat_type, ts):
        """A new episode at a sender's first violation of a type."""
        episode = SuspiciousEntry(
            sender=sender,
            sender_key=addresses.key_of(network.network_address),
            threat_type=threat_type,
            first_seen=ts,
            last_seen=ts,
            violations=1,
            messages=1,
        )
        block = self._block_in_force(sender, network, ts)
        if block is not None:
            episode.status = "blocked"
            episode.block = block
        self.episodes[(sender, threat_type)] = episode
        return episode

    def _block_in_force(self, sender, network, ts):
        """The block covering a sender at event time `ts`, if any."""
        cached = self.blocked_until.get(sender)
        if cached is not None and cached[0] > ts:
            return cached[1]
        block = service.block_covering(network, ts)
        if block is not None:
            until = block.expires_at if block.expires_at is not None else FOREVER
            self.blocked_until[sender] = (until, block)
        return block

    def _act(self, sender, network, threat_type, history, ts):
        """Apply a crossed rule: monitor, or block unless already blocked."""
        rule = self.rules[threat_type]
        episode = self.episodes[(sender, threat_type)]
        if rule.action == "monitor":
            if episode.status == "suspicious":
                episode.status = "monitored"
                self.dirty.add(episode)
                log.info("%s crossed the %s rule (monitor only)", sender, threat_type)
            return
        if self._block_in_force(sender, network, ts) is not None:
            return
        if episode.status == "approved":
            return

        messages, violations, recipients, unknown = history.sums[threat_type]
        rate = violations * 100.0 / max(messages, violations)
        reason = (
            f"{threat_type} rate {rate:.0f}% over {max(messages, violations)} messages"
        )
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
            episode.status = "approved"
            self.dirty.add(episode)
            log.info("%s not blocked: %s", sender, refusal)
            return

        else:
            self.blocks_made += 1
        until = block.expires_at if block.expires_at is not None else FOREVER
        self.blocked_until[sender] = (until, block)
        for other in THREAT_TYPES:
            open_episode = self.episodes.get((sender, other))
            if open_episode is not None:
                open_episode.status = "blocked"
                open_episode.block = block
                self.dirty.add(open_episode)

    def flush(self):
        """Write buffered window events and changed episodes (inside a transaction)."""
        fields = [
            WindowEvent.sender,
            WindowEvent.ts,
            WindowEvent.message,
            WindowEvent.violations,
            WindowEvent.recipients,
            WindowEvent.unknown,
        ]
        for start in range(0, len(self.pending_rows), 400):
            chunk = self.pending_rows[start : start + 400]
            WindowEvent.insert_many(chunk, fields=fields).execute()
        self.pending_rows = []
        for episode in self.dirty:
            episode.save()
        self.dirty = set()
        if self.now - self.swept >= SWEEP_EVERY:
            self._sweep()

    def _sweep(self):
        """Forget senders and stored events that every window has left behind."""
        oldest = self.now - max(self.windows.values())
        WindowEvent.delete().where(WindowEvent.ts <= oldest).execute()
        idle = [s for s, h in self.history.items() if h.expire(self.now, self.windows)]
        for sender in idle:
            del self.history[sender]
        self.swept = self.now


def _mask(violations):
    """A bit mask of threat type names."""
    mask = 0
    for threat_type in violations:
        mask |= BIT.get(threat_type, 0)
    return mask
