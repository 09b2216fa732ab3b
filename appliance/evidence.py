"""Evidence of a suspicious entry: the violations that made it, line by line.

The profiler hands each violation of an episode here with the event that
carried it; `write` stores them in the flush's transaction, so evidence is
exactly as durable as the counts. An entry keeps its first FIRST_KEPT and
its latest LATEST_KEPT violations: the first show how the episode began, the
latest what the sender does now. Violations between them are counted in the
entry but not kept.
"""

from dataclasses import dataclass

from appliance.models import Evidence
from appliance.models import SuspiciousEntry
from appliance.timefmt import iso

FIRST_KEPT = 10
LATEST_KEPT = 10
# a longer line is kept cut to this many characters
LINE_LIMIT = 4096
JSON_SOURCE_SUFFIX = ".jsonl"
# SQLite's largest row id: a larger number names no entry
MAX_ENTRY_ID = 2**63 - 1
COLUMNS = (
    "entry_id",
    "slot",
    "number",
    "ts",
    "source",
    "line",
    "message",
    "violations",
    "recipients",
    "unknown",
)


def slot_of(number):
    """Where an entry keeps its `number`th violation (1-based).

    The first FIRST_KEPT have a slot each; after them LATEST_KEPT slots are
    used in turn, so each holds the latest violation that fell to it.
    """
    if number <= FIRST_KEPT:
        return number
    return FIRST_KEPT + 1 + (number - FIRST_KEPT - 1) % LATEST_KEPT


def write(cursor, param, pending, source):
    """Store pending (episode, number, event) violations (inside a transaction).

    Episodes must have their ids. Only the last violation of each slot is
    written: the others would be replaced within this same batch.
    """
    rows = {}
    for episode, number, event in pending:
        line = event.line
        if line is not None and len(line) > LINE_LIMIT:
            line = line[:LINE_LIMIT]
        rows[episode.id, slot_of(number)] = (
            episode.id,
            slot_of(number),
            number,
            event.ts,
            source,
            line,
            event.message,
            ",".join(event.violations),
            event.recipients,
            event.unknown,
        )
    if not rows:
        return
    replaced = ", ".join(f"{column} = excluded.{column}" for column in COLUMNS[2:])
    cursor.executemany(
        f"INSERT INTO {Evidence._meta.table_name} ({', '.join(COLUMNS)}) "
        f"VALUES ({', '.join([param] * len(COLUMNS))}) "
        f"ON CONFLICT (entry_id, slot) DO UPDATE SET {replaced}",
        list(rows.values()),
    )


@dataclass(frozen=True, slots=True)
class EntryEvidence:
    """What an entry keeps of its violations, oldest first.

    `total` is the entry's violation count; `rows` the kept ones; `ranges`
    the (first, last) numbers of each run of kept violations, such as
    [(1, 10), (48, 57)] when 57 were counted.
    """

    total: int
    rows: list
    ranges: list


def find_entry(entry_id):
    """The Suspicious IP log entry with this id, or None (also for an impossible id)."""
    if not 0 < entry_id <= MAX_ENTRY_ID:
        return None
    return SuspiciousEntry.get_or_none(SuspiciousEntry.id == entry_id)


def for_entry(entry):
    """The violations an entry keeps, and which of its violations they are."""
    query = Evidence.select().where(Evidence.entry == entry.id)
    rows = list(query.order_by(Evidence.number))
    ranges = []
    for row in rows:
        if ranges and ranges[-1][1] == row.number - 1:
            ranges[-1] = (ranges[-1][0], row.number)
        else:
            ranges.append((row.number, row.number))
    return EntryEvidence(total=entry.violations, rows=rows, ranges=ranges)


def is_json_event(row):
    """Whether a row's line is an event of the JSON-lines format, not a log line."""
    return row.source is not None and row.source.endswith(JSON_SOURCE_SUFFIX)


def counted_text(row):
    """What the violation's event counted, in a few words."""
    parts = ["a new message"] if row.message else []
    parts += row.violations.split(",") if row.violations else []
    if row.recipients:
        recipients = f"{row.recipients} recipient{'s' if row.recipients > 1 else ''}"
        if row.unknown:
            recipients += f" ({row.unknown} unknown)"
        parts.append(recipients)
    elif row.unknown:
        parts.append(f"{row.unknown} unknown recipient{'s' if row.unknown > 1 else ''}")
    return ", ".join(parts)


def row_json(row):
    """One kept violation as the API shows it."""
    return {
        "number": row.number,
        "time": iso(row.ts),
        "source": row.source,
        "format": "json" if is_json_event(row) else "log",
        "line": row.line,
        "counted": {
            "message": bool(row.message),
            "violations": row.violations.split(",") if row.violations else [],
            "recipients": row.recipients,
            "unknown_recipients": row.unknown,
        },
    }
