"""The overview's figures: top senders per type, counts, violations over time.

Every figure reads the Suspicious IP log (episodes) and the blocks; the window
events are kept only as long as the longest rule window, too short for a week.
An episode's violations are charted in the bucket of its last-seen time.
"""

import math
import time
from dataclasses import dataclass

from peewee import Case
from peewee import fn

from appliance.config import THREAT_TYPES
from appliance.models import Block
from appliance.models import SuspiciousEntry

# period name -> (seconds it covers, seconds per chart bucket, label)
PERIODS = {
    "hour": (3600, 300, "last hour"),
    "day": (86400, 3600, "last 24 hours"),
    "week": (7 * 86400, 6 * 3600, "last 7 days"),
}
TOP_LIMIT = 10


@dataclass(frozen=True)
class TopSender:
    """One sender's episodes of one type in the period, added up."""

    sender: str
    violations: int
    messages: int
    episodes: int
    last_seen: float


@dataclass(frozen=True)
class Overview:
    """What the overview page shows for one period ending `now`."""

    period: str
    since: float
    now: float
    top: dict
    blocked_now: int
    permanent_now: int
    suspicious_ips: int
    bucket_seconds: int
    bucket_starts: list
    series: dict


def overview(period="day", now=None):
    """The overview for a period name of PERIODS, ending at `now` (epoch)."""
    now = time.time() if now is None else now
    span, bucket, _label = PERIODS[period]
    since = now - span

    blocked_now, permanent_now = active_block_counts(now)
    return Overview(
        period=period,
        since=since,
        now=now,
        top={t: top_senders(t, since) for t in THREAT_TYPES},
        blocked_now=blocked_now,
        permanent_now=permanent_now,
        suspicious_ips=suspicious_senders(since),
        bucket_seconds=bucket,
        bucket_starts=bucket_starts(since, now, bucket),
        series=violations_over_time(since, now, bucket),
    )


def top_senders(threat_type, since, limit=TOP_LIMIT):
    """The senders with the most violations of one type seen since `since`."""
    violations = fn.SUM(SuspiciousEntry.violations)
    query = (
        SuspiciousEntry.select(
            SuspiciousEntry.sender,
            violations,
            fn.SUM(SuspiciousEntry.messages),
            fn.COUNT(SuspiciousEntry.id),
            fn.MAX(SuspiciousEntry.last_seen),
        )
        .where(
            (SuspiciousEntry.threat_type == threat_type)
            & (SuspiciousEntry.last_seen >= since)
        )
        .group_by(SuspiciousEntry.sender)
        .order_by(violations.desc(), SuspiciousEntry.sender)
        .limit(limit)
    )
    return [TopSender(*row) for row in query.tuples()]


def in_period(since):
    """Entries seen since `since`, written so SQLite walks the index that leads
    with (threat_type, last_seen) and holds every column the overview reads."""
    return SuspiciousEntry.threat_type.in_(THREAT_TYPES) & (
        SuspiciousEntry.last_seen >= since
    )


def active_block_counts(now):
    """Blocks in force at `now`: (all of them, the permanent ones), in one pass."""
    in_force = Block.lifted_at.is_null() & (
        Block.expires_at.is_null() | (Block.expires_at > now)
    )
    permanent = fn.SUM(Case(None, [(Block.expires_at.is_null(), 1)], 0))
    query = Block.select(fn.COUNT(Block.id), permanent).where(in_force)
    total, permanent = query.tuples()[0]
    return total, permanent or 0


def suspicious_senders(since):
    """How many senders not blocked now have an episode seen since `since`."""
    query = SuspiciousEntry.select(fn.COUNT(SuspiciousEntry.sender.distinct()))
    condition = in_period(since) & (SuspiciousEntry.status != "blocked")
    return query.where(condition).scalar() or 0


def bucket_starts(since, now, bucket):
    """Chart bucket starts on whole multiples of `bucket` (UTC) covering the period.

    The first and last buckets are partial unless the period's ends fall on
    bucket boundaries.
    """
    first = math.floor(since / bucket) * bucket
    count = math.ceil((now - first) / bucket)
    return [first + n * bucket for n in range(count)]


def violations_over_time(since, now, bucket):
    """Violations per type per bucket (see `bucket_starts`), oldest bucket first."""
    starts = bucket_starts(since, now, bucket)
    series = {t: [0] * len(starts) for t in THREAT_TYPES}
    index = ((SuspiciousEntry.last_seen - starts[0]) / bucket).cast("INTEGER")
    query = (
        SuspiciousEntry.select(
            SuspiciousEntry.threat_type, index, fn.SUM(SuspiciousEntry.violations)
        )
        .where(in_period(since) & (SuspiciousEntry.last_seen < now))
        .group_by(SuspiciousEntry.threat_type, index)
    )
    for threat_type, position, violations in query.tuples():
        if threat_type in series and 0 <= position < len(starts):
            series[threat_type][position] += violations
    return series
