"""The IP profiler: sliding windows in event time, episodes, block decisions.

Time is the event's own time stamp, never the wall clock, so reading
yesterday's log gives the decisions that following it live would have.
"""

import json
import logging
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from dataclasses import fields
from ipaddress import IPv4Network
from ipaddress import IPv6Network
from typing import Final

from peewee import fn

from appliance import addresses
from appliance import evidence
from appliance import service
from appliance.blockindex import BlockIndex
from appliance.config import THREAT_TYPES
from appliance.config import Settings
from appliance.events import MailEvent
from appliance.models import Rule
from appliance.models import SuspiciousEntry
from appliance.models import WindowBatch
from appliance.models import db
from appliance.models import insert_statement

log = logging.getLogger(__name__)

NUMBER: Final = {threat_type: n for n, threat_type in enumerate(THREAT_TYPES)}
BIT: Final = {threat_type: 1 << n for n, threat_type in enumerate(THREAT_TYPES)}
# the threat type numbers a violation mask names, for every mask
TYPES_IN: Final = [
    tuple(n for n in range(len(THREAT_TYPES)) if mask >> n & 1)
    for mask in range(1 << len(THREAT_TYPES))
]
SWEEP_EVERY: Final = 60.0
SENDER_CACHE: Final = 500_000
# the network a sender is counted and blocked as
Network = IPv4Network | IPv6Network


class WindowGroups:
    """The rule windows, as groups of threat types that share one window.

    Types with equal windows always drop the same events, so a history counts
    each group once. `swept_to` is the event time of the last sweep, which
    histories catch up on when next used.
    """

    def __init__(self, windows: dict[str, int]) -> None:
        # before the first split, one group of every type (its window unused)
        self.groups: list[tuple[int, list[int]]] = [(0, list(range(len(THREAT_TYPES))))]
        self.sweeps = 0
        self.swept_to = 0.0
        self.split(windows)

    def split(self, windows: dict[str, int]) -> list[int]:
        """Take new windows; returns, per new group, the old group it comes from.

        A group whose types now have different windows splits; groups never
        merge, since their histories may have dropped different events.
        """
        self.windows = dict(windows)
        self.longest = max(self.windows.values())
        groups: dict[tuple[int, int], list[int]] = {}
        for parent, (_window, numbers) in enumerate(self.groups):
            for number in numbers:
                window = self.windows[THREAT_TYPES[number]]
                groups.setdefault((parent, window), []).append(number)
        self.groups = [(window, numbers) for (_, window), numbers in groups.items()]
        self.group_of = {
            THREAT_TYPES[number]: group
            for group, (_window, numbers) in enumerate(self.groups)
            for number in numbers
        }
        return [parent for parent, _window in groups]

    def sweep(self, now: float) -> None:
        """Record a sweep to event time `now`."""
        self.sweeps += 1
        self.swept_to = now


# a history's counts for one window group: STRIDE numbers, at these offsets
HEAD: Final = 0  # index in the history's events of the oldest one the group counts
MESSAGES: Final = 1
RECIPIENTS: Final = 2
UNKNOWN: Final = 3
VIOLATIONS: Final = 4  # then one count per threat type, in THREAT_TYPES order
STRIDE: Final = VIOLATIONS + len(THREAT_TYPES)


class SenderHistory:
    """One sender's recent events, with running counts per window group.

    Events are (ts, message, mask, recipients, unknown) rows. `counts` holds
    every group's counts in one flat list: there may be 100,000 histories.
    `latest` is the latest time stamp added (events may come out of order).
    """

    __slots__ = ("events", "counts", "window_groups", "sweeps", "latest")

    def __init__(self, window_groups: WindowGroups) -> None:
        self.events: list[tuple[float, int, int, int, int]] = []
        self.counts = [0] * (STRIDE * len(window_groups.groups))
        self.window_groups = window_groups
        self.sweeps = window_groups.sweeps
        self.latest = float("-inf")

    def add(
        self, ts: float, message: int, mask: int, recipients: int, unknown: int
    ) -> None:
        """Count one event in every window group, then drop what fell out."""
        if self.sweeps != self.window_groups.sweeps:
            self.catch_up()
        events = self.events
        events.append((ts, message, mask, recipients, unknown))
        if ts > self.latest:
            self.latest = ts
        counts = self.counts
        at = 0
        trimmed = False
        for window, _numbers in self.window_groups.groups:
            counts[at + MESSAGES] += message
            counts[at + RECIPIENTS] += recipients
            counts[at + UNKNOWN] += unknown
            if mask:
                for number in TYPES_IN[mask]:
                    counts[at + VIOLATIONS + number] += 1
            # usually the group's oldest event is still inside its window
            if events[counts[at + HEAD]][0] <= ts - window:
                self._trim(at, ts - window)
                trimmed = True
            at += STRIDE
        if trimmed:
            self._compact()

    def _trim(self, at: int, oldest: float) -> None:
        """Drop from the group at `at` the events at or before `oldest`."""
        counts = self.counts
        events = self.events
        head = counts[at + HEAD]
        while head < len(events):
            ts, message, mask, recipients, unknown = events[head]
            if ts > oldest:
                break
            counts[at + MESSAGES] -= message
            counts[at + RECIPIENTS] -= recipients
            counts[at + UNKNOWN] -= unknown
            if mask:
                for number in TYPES_IN[mask]:
                    counts[at + VIOLATIONS + number] -= 1
            head += 1
        counts[at + HEAD] = head

    def _compact(self) -> None:
        """Forget events no window needs any more, once they are half the list."""
        counts = self.counts
        first = min(counts[HEAD::STRIDE])
        if first and first * 2 >= len(self.events):
            del self.events[:first]
            for at in range(HEAD, len(counts), STRIDE):
                counts[at] -= first

    def catch_up(self) -> None:
        """Apply the sweeps made since this history was last used.

        No event was added since, so the last sweep's time alone drops what
        all of them would have dropped.
        """
        swept_to = self.window_groups.swept_to
        for group, (window, _numbers) in enumerate(self.window_groups.groups):
            self._trim(group * STRIDE, swept_to - window)
        self._compact()
        self.sweeps = self.window_groups.sweeps

    def is_empty(self) -> bool:
        """Whether no window holds any event (after catching up on sweeps)."""
        window_groups = self.window_groups
        # every event is older than the longest window: no need to drop them
        if self.latest <= window_groups.swept_to - window_groups.longest:
            return True
        if self.sweeps != window_groups.sweeps:
            self.catch_up()
        return min(self.counts[HEAD::STRIDE]) >= len(self.events)

    def regroup(self, parents: list[int]) -> None:
        """Follow a split of the window groups: each new group copies its parent."""
        counts: list[int] = []
        for parent in parents:
            counts += self.counts[parent * STRIDE : (parent + 1) * STRIDE]
        self.counts = counts

    def window_sums(self, threat_type: str) -> list[int]:
        """[messages, violations, recipients, unknown] in one type's window."""
        if self.sweeps != self.window_groups.sweeps:
            self.catch_up()
        at = self.window_groups.group_of[threat_type] * STRIDE
        counts = self.counts
        return [
            counts[at + MESSAGES],
            counts[at + VIOLATIONS + NUMBER[threat_type]],
            counts[at + RECIPIENTS],
            counts[at + UNKNOWN],
        ]

    def crosses(self, rule: "EnabledRule") -> bool:
        """Whether this sender's window sums cross an EnabledRule."""
        if self.sweeps != self.window_groups.sweeps:
            self.catch_up()
        at = self.window_groups.group_of[rule.threat_type] * STRIDE
        counts = self.counts
        violations = counts[at + VIOLATIONS + rule.number]
        if violations == 0:
            return False
        messages = counts[at + MESSAGES]
        if messages < violations:
            messages = violations
        if messages <= rule.messages or violations * 100.0 / messages <= rule.rate:
            return False
        if rule.recipients is None or rule.unknown is None:
            return True
        recipients, unknown = counts[at + RECIPIENTS], counts[at + UNKNOWN]
        return recipients > rule.recipients and unknown > rule.unknown

    @property
    def sums(self) -> dict[str, list[int]]:
        """Every type's window sums, by threat type."""
        return {t: self.window_sums(t) for t in THREAT_TYPES}


@dataclass(slots=True, eq=False)
class Episode:
    """The profiler's copy of an open SuspiciousEntry, written back at flush."""

    sender: str
    sender_key: str
    threat_type: str
    first_seen: float
    last_seen: float
    violations: int = 1
    messages: int = 1
    rate: float = 0.0
    status: str = "suspicious"
    open: bool = True
    block_id: int | None = None
    id: int | None = None


# the columns of a new episode's row: the Episode's fields but its id
EPISODE_COLUMNS = tuple(field.name for field in fields(Episode) if field.name != "id")


@dataclass(slots=True, frozen=True)
class EnabledRule:
    """An enabled rule as the profiler applies it, copied from its row once.

    It is crossed when its type's violation rate is above `rate` percent AND
    its messages are above `messages` (AND, for `dha` alone, recipients and
    unknown recipients are above theirs; None for the other types). `number`
    is the type's place in THREAT_TYPES; `duration` is None unless `action`
    is "temporary".
    """

    threat_type: str
    number: int
    messages: int
    rate: float
    recipients: int | None
    unknown: int | None
    action: str
    duration: int | None

    @classmethod
    def of(cls, rule: Rule) -> "EnabledRule":
        """The copy of a Rule row."""
        dha = rule.threat_type == "dha"
        return cls(
            rule.threat_type,
            NUMBER[rule.threat_type],
            rule.messages,
            rule.rate,
            rule.recipients if dha else None,
            rule.unknown_recipients if dha else None,
            rule.action,
            rule.duration if rule.action == "temporary" else None,
        )


class Profiler:
    """Counts events per sender and type, keeps episodes, and blocks.

    `history` holds the senders least recently counted first, so a sweep
    finds the idle ones at its front. `episodes` maps a sender to its open
    episodes by threat type; a sender without any has no key. `source` names
    the log the events being processed come from, for their evidence.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.history: dict[str, SenderHistory] = {}
        self.episodes: dict[str, dict[str, Episode]] = {}
        self.senders: dict[str, str] = {}
        self.networks: dict[str, tuple[Network, str]] = {}
        self.violation_forms: dict[tuple[str, ...], tuple[int, str]] = {}
        self.blocks = BlockIndex(addresses.parse_network)
        self.known_covers: dict[str, tuple[float, float]] = {}
        self.pending_rows: list[tuple[str, float, int, str, int, int]] = []
        # the latest violation per (episode, evidence slot): the others would
        # be overwritten in the same flush
        self.pending_evidence: dict[
            tuple[int, int], tuple[Episode, int, MailEvent]
        ] = {}
        self.source: str | None = None
        self.dirty: dict[int, Episode] = {}
        self.status_changed: dict[int, Episode] = {}
        self.now = 0.0
        self.swept = 0.0
        self.blocks_made = 0
        self._read_rules()
        self.window_groups = WindowGroups(self.windows)

    def reload_rules(self) -> None:
        """Read the rules from the database (the console may have changed them)."""
        self._read_rules()
        if self.window_groups.windows != self.windows:
            self._change_windows()

    def _read_rules(self) -> None:
        """Copy the rule rows, their windows and the enabled rules."""
        self.rules: dict[str, Rule] = {rule.threat_type: rule for rule in Rule.select()}
        self.windows: dict[str, int] = {t: self.rules[t].window for t in THREAT_TYPES}
        self.enabled_rules = [
            EnabledRule.of(self.rules[t]) for t in THREAT_TYPES if self.rules[t].enabled
        ]

    def _change_windows(self) -> None:
        """New windows: histories first drop what the old ones would have."""
        for history in self.history.values():
            if history.sweeps != self.window_groups.sweeps:
                history.catch_up()
        parents = self.window_groups.split(self.windows)
        for history in self.history.values():
            history.regroup(parents)

    def load(self) -> None:
        """Rebuild windows and open episodes from the database after a start."""
        latest = WindowBatch.select(fn.MAX(WindowBatch.last_ts)).scalar() or 0.0
        self.now = latest
        oldest = latest - max(self.windows.values())
        batches = (
            WindowBatch.select(WindowBatch.events)
            .where(WindowBatch.last_ts > oldest)
            .order_by(WindowBatch.id)
            .tuples()
        )
        for (events,) in batches.iterator():
            for sender, ts, message, violations, recipients, unknown in json.loads(
                events
            ):
                if ts <= oldest:
                    continue
                mask = _mask(violations.split(",") if violations else ())
                history = self._history(sender)
                history.add(ts, message, mask, recipients, unknown)
        columns = (
            SuspiciousEntry.sender,
            SuspiciousEntry.sender_key,
            SuspiciousEntry.threat_type,
            SuspiciousEntry.first_seen,
            SuspiciousEntry.last_seen,
            SuspiciousEntry.violations,
            SuspiciousEntry.messages,
            SuspiciousEntry.rate,
            SuspiciousEntry.status,
            SuspiciousEntry.open,
            SuspiciousEntry.block,
            SuspiciousEntry.id,
        )
        still_open = SuspiciousEntry.open == True  # noqa: E712
        query = SuspiciousEntry.select(*columns).where(still_open)
        for row in query.order_by(SuspiciousEntry.id).tuples().iterator():
            episode = Episode(*row)
            self.episodes.setdefault(episode.sender, {})[episode.threat_type] = episode
        self.refresh_blocks()

    def refresh_blocks(self) -> None:
        """Take in blocks made or lifted by others (console, CLI, scheduler)."""
        self.blocks.refresh()
        self.known_covers.clear()

    def _covered(self, sender: str, network: Network, ts: float) -> bool:
        """Whether a block is over all of a sender's network at event time `ts`.

        A blocked sender's every event asks again: the span of the block
        found is kept per sender until the blocks change.
        """
        span = self.known_covers.get(sender)
        if span is not None and span[0] <= ts < span[1]:
            return True
        block_id = self.blocks.covering(network, ts)
        if block_id is None:
            return False
        _key, created_at, until = self.blocks.spans[block_id]
        self.known_covers[sender] = (created_at, until)
        return True

    def _sender(self, ip: str) -> str:
        """The sender an IP is counted as (its text), cached."""
        sender = self.senders.get(ip)
        if sender is None:
            if len(self.senders) > SENDER_CACHE:
                self.senders.clear()
            network = addresses.sender_of(ip, self.settings.ipv6_prefix)
            sender = self.senders[ip] = addresses.sender_text(network)
        return sender

    def _network(self, sender: str, ip: str) -> tuple[Network, str]:
        """(network, sort key) of a sender, cached for senders with episodes.

        Only these need them: kept for every sender, they would cost about
        400 bytes each.
        """
        known = self.networks.get(sender)
        if known is None:
            if len(self.networks) > SENDER_CACHE:
                self.networks.clear()
            network = addresses.sender_of(ip, self.settings.ipv6_prefix)
            known = (network, addresses.key_of(network.network_address))
            self.networks[sender] = known
        return known

    def _history(self, sender: str) -> SenderHistory:
        """A sender's history, moved to the back as the most recently counted."""
        history = self.history.pop(sender, None)
        if history is None:
            history = SenderHistory(self.window_groups)
        self.history[sender] = history
        return history

    def _violation_form(self, violations: tuple[str, ...]) -> tuple[int, str]:
        """(mask, stored text) of a violations tuple, cached: there are few."""
        key = tuple(violations)
        form = self.violation_forms.get(key)
        if form is None:
            form = self.violation_forms[key] = (_mask(key), ",".join(key))
        return form

    def process(self, event: MailEvent) -> None:
        """Count one MailEvent and act on any rule it makes the sender cross."""
        ts, ip, message, violations, recipients, unknown, _line = event
        sender = self.senders.get(ip) or self._sender(ip)
        if violations:
            mask, stored = self._violation_form(violations)
        else:
            mask, stored = 0, ""
        history = self._history(sender)
        history.add(ts, message, mask, recipients, unknown)
        self.pending_rows.append((sender, ts, message, stored, recipients, unknown))
        if ts > self.now:
            self.now = ts

        # most events come from senders without an episode and violate nothing
        episodes = self.episodes.get(sender)
        if episodes is None and not violations:
            return
        for threat_type in THREAT_TYPES:
            # a step changes its own type's episode only: `episodes`, read
            # before the loop, still answers for the types after it
            episode = episodes.get(threat_type) if episodes else None
            if episode is None and threat_type not in violations:
                continue
            self._update_episode(sender, ip, threat_type, episode, event)
        episodes = self.episodes.get(sender)
        if episodes is None:
            return
        for rule in self.enabled_rules:
            if rule.threat_type in episodes and history.crosses(rule):
                self._act(sender, ip, rule, history, ts)

    def _update_episode(
        self,
        sender: str,
        ip: str,
        threat_type: str,
        episode: Episode | None,
        event: MailEvent,
    ) -> None:
        """Open, extend or close the sender's episode of one threat type."""
        if (
            episode is not None
            and event.ts - episode.last_seen >= self.windows[threat_type]
        ):
            episode.open = False
            self.dirty[id(episode)] = episode
            self._forget_episode(sender, threat_type)
            episode = None

        if threat_type in event.violations:
            if episode is None:
                episode = self._open_episode(sender, ip, threat_type, event.ts)
            else:
                episode.violations += 1
                episode.messages += event.message
                episode.last_seen = event.ts
            number = episode.violations
            slot = evidence.slot_of(number)
            self.pending_evidence[id(episode), slot] = (episode, number, event)
        elif episode is not None:
            episode.messages += event.message
        else:
            return
        # its rate is worked out when it is written
        self.dirty[id(episode)] = episode

    def _forget_episode(self, sender: str, threat_type: str) -> None:
        """Drop a closed episode from the open ones."""
        episodes = self.episodes[sender]
        del episodes[threat_type]
        if not episodes:
            del self.episodes[sender]

    def _open_episode(
        self, sender: str, ip: str, threat_type: str, ts: float
    ) -> Episode:
        """A new episode at a sender's first violation of a type."""
        network, key = self._network(sender, ip)
        episode = Episode(sender, key, threat_type, first_seen=ts, last_seen=ts)
        block_id = self.blocks.covering(network, ts)
        if block_id is not None:
            episode.status = "blocked"
            episode.block_id = block_id
        self.episodes.setdefault(sender, {})[threat_type] = episode
        return episode

    def _act(
        self,
        sender: str,
        ip: str,
        rule: EnabledRule,
        history: SenderHistory,
        ts: float,
    ) -> None:
        """Apply a crossed EnabledRule: monitor, or block unless already blocked."""
        network, _key = self._network(sender, ip)
        threat_type = rule.threat_type
        episode = self.episodes[sender][threat_type]
        if rule.action == "monitor":
            if episode.status == "suspicious":
                self._set_status(episode, "monitored")
                log.info("%s crossed the %s rule (monitor only)", sender, threat_type)
            return
        if self._covered(sender, network, ts):
            return
        if episode.status == "approved":
            return

        messages, violations, recipients, unknown = history.window_sums(threat_type)
        messages = max(messages, violations)
        reason = f"{threat_type} rate {violations * 100.0 / messages:.0f}%"
        reason += f" over {messages} messages"
        if threat_type == "dha":
            reason += f", {unknown} of {recipients} recipients unknown"
        try:
            block = service.block_network(
                network,
                threat_type=threat_type,
                duration=rule.duration,
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
        self.known_covers.clear()
        episodes = self.episodes[sender]
        for other in THREAT_TYPES:
            if other in episodes:
                self._set_status(episodes[other], "blocked", block.id)

    def _set_status(
        self, episode: Episode, status: str, block_id: int | None = None
    ) -> None:
        """Change an episode's status (written at the next flush)."""
        episode.status = status
        if block_id is not None:
            episode.block_id = block_id
        self.status_changed[id(episode)] = episode
        self.dirty[id(episode)] = episode

    def flush(self) -> None:
        """Write buffered window events, changed episodes and their evidence.

        Runs inside the caller's transaction, with the read position it goes with.
        """
        cursor = db.cursor()
        param = db.param
        if self.pending_rows:
            times = [row[1] for row in self.pending_rows]
            cursor.execute(
                f"INSERT INTO {WindowBatch._meta.table_name} "
                f"(first_ts, last_ts, events) VALUES ({param}, {param}, {param})",
                (min(times), max(times), json.dumps(self.pending_rows)),
            )
            self.pending_rows = []
        self._write_episodes(cursor, param)
        if self.pending_evidence:
            violations = list(self.pending_evidence.values())
            evidence.write(cursor, param, violations, self.source)
            self.pending_evidence = {}
        if self.now - self.swept >= SWEEP_EVERY:
            self._sweep()

    def _write_episodes(self, cursor: sqlite3.Cursor, param: str) -> None:
        """Insert new episodes, update counters, and write status changes.

        A row inserted now already holds its episode's counters and status:
        updating it again would rewrite every index of the table for nothing.
        """
        table = SuspiciousEntry._meta.table_name
        inserted: set[int] = set()
        counters = []
        for key, e in self.dirty.items():
            e.rate = round(e.violations * 100.0 / e.messages, 2)
            if e.id is None:
                e.id = _insert(cursor, e)
                inserted.add(key)
            else:
                counters.append(
                    (e.last_seen, e.violations, e.messages, e.rate, e.open, e.id)
                )
        cursor.executemany(
            f"UPDATE {table} SET last_seen = {param}, violations = {param}, "
            f"messages = {param}, rate = {param}, open = {param} WHERE id = {param}",
            counters,
        )
        statuses = [
            (e.status, e.block_id, e.id)
            for key, e in self.status_changed.items()
            if key not in inserted
        ]
        cursor.executemany(
            f"UPDATE {table} SET status = {param}, block_id = {param} "
            f"WHERE id = {param}",
            statuses,
        )
        self.dirty = {}
        self.status_changed = {}

    def _sweep(self) -> None:
        """Forget stored events and senders that every window has left behind.

        Histories catch up on the sweep when next used; only the least
        recently counted ones are looked at now, to forget the idle.
        """
        oldest = self.now - max(self.windows.values())
        WindowBatch.delete().where(WindowBatch.last_ts <= oldest).execute()
        self.window_groups.sweep(self.now)
        idle = []
        for sender, history in self.history.items():
            if not history.is_empty():
                break
            idle.append(sender)
        for sender in idle:
            del self.history[sender]
        self.swept = self.now


def _insert(cursor: sqlite3.Cursor, episode: Episode) -> int | None:
    """Insert one new episode row; returns its id."""
    row = tuple(getattr(episode, column) for column in EPISODE_COLUMNS)
    cursor.execute(insert_statement(SuspiciousEntry, EPISODE_COLUMNS), row)
    return cursor.lastrowid


def _mask(violations: Iterable[str]) -> int:
    """A bit mask of threat type names."""
    mask = 0
    for threat_type in violations:
        mask |= BIT.get(threat_type, 0)
    return mask
