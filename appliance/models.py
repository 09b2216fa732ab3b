"""Peewee models: counts, episodes, blocks, lists, positions, the audit log."""

import functools
import time

from peewee import BooleanField
from peewee import CharField
from peewee import DatabaseProxy
from peewee import FloatField
from peewee import ForeignKeyField
from peewee import IntegerField
from peewee import Model
from peewee import SqliteDatabase
from peewee import TextField
from playhouse.migrate import SchemaMigrator
from playhouse.migrate import migrate

db = DatabaseProxy()


class BaseModel(Model):
    class Meta:
        database = db


class Admin(BaseModel):
    """A console administrator; the password is stored hashed."""

    username = CharField(unique=True)
    password_hash = CharField()
    created_at = FloatField(default=time.time)


class Rule(BaseModel):
    """One threat type's profiler rule (SPEC §2); times in seconds."""

    threat_type = CharField(primary_key=True)
    enabled = BooleanField(default=True)
    window = IntegerField(default=3600)
    rate = FloatField(default=20.0)
    messages = IntegerField(default=100)
    action = CharField(default="temporary")
    duration = IntegerField(default=3600)
    recipients = IntegerField(default=10)
    unknown_recipients = IntegerField(default=5)


class WindowBatch(BaseModel):
    """The events one flush counted, kept for the longest window so restarts
    rebuild it: one row per flush, the events as a JSON list of
    [sender, ts, message, violations, recipients, unknown] (a row per event
    made every flush as slow as the counting itself)."""

    first_ts = FloatField()
    last_ts = FloatField(index=True)
    events = TextField()


class Block(BaseModel):
    """A block of an address or network, active or lifted; times are epoch."""

    target = CharField(index=True)
    key_first = CharField()
    key_last = CharField()
    threat_type = CharField()
    action = CharField()
    created_at = FloatField()
    expires_at = FloatField(null=True)
    lifted_at = FloatField(null=True, index=True)
    lift_reason = CharField(null=True)
    created_by = CharField()
    reason = TextField(default="")
    domain = CharField(null=True)
    changed_at = FloatField(default=time.time, index=True)
    # the next number at each insert and each write of changed_at, given by
    # triggers (`add_change_triggers`) in commit order: the daemon reads the
    # rows numbered above the last one it saw
    change_number = IntegerField(null=True, index=True)
    # written by the daemon's reconcile: True in the kernel set, False missing
    enforced = BooleanField(null=True)
    enforced_checked_at = FloatField(null=True)
    # 1 for a first block; n when n blocks of this target began within the
    # repeat period (enforcement.repeat_period), the longer for it
    offence = IntegerField(default=1)

    class Meta:
        indexes = (
            (("key_first", "key_last"), False),
            # the sender filtering log lists blocks by when they started
            (("created_at",), False),
            # blocks in force, counted by the overview from the index alone
            (("lifted_at", "expires_at"), False),
        )

    @property
    def active(self):
        """Whether nothing has lifted this block yet."""
        return self.lifted_at is None


# what every Suspicious IP log index holds after its own column
FILTER_COLUMNS = ("last_seen", "id", "first_seen", "threat_type", "status")


class SuspiciousEntry(BaseModel):
    """One episode of one sender's violations of one threat type (SPEC §4)."""

    sender = CharField()
    sender_key = CharField()
    threat_type = CharField()
    first_seen = FloatField()
    last_seen = FloatField()
    violations = IntegerField(default=0)
    messages = IntegerField(default=0)
    rate = FloatField(default=0.0)
    status = CharField(default="suspicious")
    open = BooleanField(default=True)
    block = ForeignKeyField(Block, null=True, backref="entries")

    class Meta:
        # the daemon and the console both write entries: save what changed only
        only_save_dirty = True
        # One index per sortable column of the Suspicious IP log, in the page's
        # order (column, last_seen, id), each also holding the filter columns,
        # so a page walks one index and reads only its own rows from the table
        # (appliance/queries.py). The sender key one also finds a new block's
        # entries. Every index costs the profiler's writes: add none lightly.
        indexes = (
            (("last_seen", "id", "first_seen", "threat_type", "status"), False),
            # + sender, violations, messages: the Overview's figures read this
            # index alone (appliance/overview.py)
            (
                (
                    "threat_type",
                    "last_seen",
                    "id",
                    "first_seen",
                    "status",
                    "sender",
                    "violations",
                    "messages",
                ),
                False,
            ),
            (("sender_key", "last_seen", "id", "first_seen", "threat_type"), False),
            (("violations", *FILTER_COLUMNS), False),
            (("messages", *FILTER_COLUMNS), False),
            (("rate", *FILTER_COLUMNS), False),
            (("status", "last_seen", "id", "first_seen", "threat_type"), False),
        )


class Evidence(BaseModel):
    """A violation of an entry, with the log line (or JSON event) that made it.

    An entry keeps its first violations and its latest ones (appliance/evidence.py
    says how many): `number` is the violation's place in the episode (1 for the
    first), `slot` where it is kept, so a later violation takes an older one's
    slot. `source` is the log the line was read from; `message`, `violations`,
    `recipients` and `unknown` are what the event counted.
    """

    # the (entry, slot) index finds an entry's rows: no index of its own
    entry = ForeignKeyField(
        SuspiciousEntry, backref="evidence", on_delete="CASCADE", index=False
    )
    slot = IntegerField()
    number = IntegerField()
    ts = FloatField()
    source = CharField(null=True)
    line = TextField(null=True)
    message = IntegerField()
    violations = CharField()
    recipients = IntegerField()
    unknown = IntegerField()

    class Meta:
        indexes = ((("entry", "slot"), True),)


class ApprovedHost(BaseModel):
    """An address, network or domain that is never blocked."""

    target = CharField(index=True)
    key_first = CharField()
    key_last = CharField()
    domain = CharField(null=True)
    created_at = FloatField(default=time.time)
    created_by = CharField()
    note = TextField(default="")


class SourcePosition(BaseModel):
    """Where reading a log file stopped, with the correlator state at that point."""

    path = CharField(primary_key=True)
    inode = IntegerField()
    offset = IntegerField()
    state = TextField(default="{}")
    updated_at = FloatField(default=time.time)


class SourceCounter(BaseModel):
    """Lines read and lines not understood, per source file."""

    path = CharField(primary_key=True)
    lines = IntegerField(default=0)
    skipped = IntegerField(default=0)


class AuditEntry(BaseModel):
    """The sender filtering log: block starts and ends, administrator actions."""

    ts = FloatField(default=time.time, index=True)
    actor = CharField()
    action = CharField()
    target = CharField(index=True)
    detail = TextField(default="")
    # where the action came from: the console's or API's client, the CLI's user
    source = CharField(null=True)
    # the key range of `target` when it is an address or network, for IP search
    key_first = CharField(null=True)
    key_last = CharField(null=True)

    class Meta:
        indexes = ((("key_first", "key_last"), False),)


class LoginFailure(BaseModel):
    """A failed console login, kept a while to slow down password guessing."""

    source = CharField()
    ts = FloatField(default=time.time)

    class Meta:
        indexes = ((("source", "ts"), False),)


class ApiToken(BaseModel):
    """A named API token; `token_hash` is the token's SHA-256, never the token."""

    name = CharField(unique=True)
    token_hash = CharField(unique=True)
    created_at = FloatField(default=time.time)
    last_used = FloatField(null=True)


class ApplianceState(BaseModel):
    """Small facts the daemon publishes for the console (backend, heartbeat)."""

    key = CharField(primary_key=True)
    value = TextField(default="")
    updated_at = FloatField(default=time.time)


ALL_MODELS = (
    Admin,
    Rule,
    WindowBatch,
    Block,
    SuspiciousEntry,
    Evidence,
    ApprovedHost,
    SourcePosition,
    SourceCounter,
    AuditEntry,
    LoginFailure,
    ApiToken,
    ApplianceState,
)


@functools.cache
def insert_statement(model, columns):
    """A plain SQL INSERT of one row's `columns` (a tuple) into a model's table.

    Peewee builds its INSERT anew on every call, which costs more than the
    insert itself on the hot paths: rules make blocks in bursts, and lifting
    them at once writes a row each.
    """
    names = ", ".join(f'"{column}"' for column in columns)
    values = ", ".join([db.param] * len(columns))
    return f'INSERT INTO "{model._meta.table_name}" ({names}) VALUES ({values})'


def connect(path):
    """Open the SQLite database in WAL mode and create missing tables."""
    path.parent.mkdir(parents=True, exist_ok=True)
    database = SqliteDatabase(
        str(path),
        pragmas={
            "journal_mode": "wal",
            "busy_timeout": 10000,
            "synchronous": "normal",
            "foreign_keys": 1,
        },
        check_same_thread=False,
        lock_type="IMMEDIATE",
    )
    db.initialize(database)
    database.connect(reuse_if_open=True)
    add_missing_columns(database)
    drop_replaced_indexes(database, SuspiciousEntry)
    database.create_tables(ALL_MODELS)
    add_change_triggers(database)
    refresh_statistics(database, SuspiciousEntry)
    return database


def add_change_triggers(database):
    """Number every block insert and every write of Block.changed_at.

    A trigger runs inside the writing statement, which holds SQLite's write
    lock until its transaction commits, so the numbers follow commit order
    whatever wall time each process stamped: a reader that saw number n
    finds every later change above n.
    """
    table = Block._meta.table_name
    number = f'(SELECT ifnull(max(change_number), 0) + 1 FROM "{table}")'
    for name, event in (
        ("block_numbered_on_insert", "INSERT"),
        ("block_numbered_on_change", "UPDATE OF changed_at"),
    ):
        database.execute_sql(
            f'CREATE TRIGGER IF NOT EXISTS "{name}" AFTER {event} ON "{table}" '
            f'BEGIN UPDATE "{table}" SET change_number = {number} '
            "WHERE id = NEW.id; END"
        )


def refresh_statistics(database, model, growth=10):
    """ANALYZE a table (sampled) when it has grown `growth` times since the last.

    The planner needs the statistics to skip-scan the Suspicious IP log's
    indexes; the sampled ANALYZE takes milliseconds even for a million rows.
    """
    table = model._meta.table_name
    counted = 0
    if database.table_exists("sqlite_stat1"):
        found = database.execute_sql(
            "SELECT stat FROM sqlite_stat1 WHERE tbl = ? LIMIT 1", (table,)
        ).fetchone()
        counted = int(found[0].split()[0]) if found and found[0] else 0
    rows = database.execute_sql(f'SELECT max(rowid) FROM "{table}"').fetchone()[0]
    if rows and rows >= max(counted, 1) * growth:
        database.execute_sql("PRAGMA analysis_limit = 1000")
        database.execute_sql(f'ANALYZE "{table}"')


def drop_replaced_indexes(database, model):
    """Drop indexes an older version made on a model's table and it no longer has."""
    wanted = {index._name for index in model._meta.fields_to_index()}
    present = database.execute_sql(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ? "
        "AND sql IS NOT NULL",
        (model._meta.table_name,),
    )
    for (name,) in present.fetchall():
        if name not in wanted:
            database.execute_sql(f'DROP INDEX "{name}"')


def add_missing_columns(database):
    """Give tables an older version created the columns the models have since got."""
    migrator = SchemaMigrator.from_database(database)
    for model in ALL_MODELS:
        table = model._meta.table_name
        if not database.table_exists(table):
            continue
        present = {column.name for column in database.get_columns(table)}
        missing = [f for f in model._meta.sorted_fields if f.column_name not in present]
        if missing:
            migrate(*(migrator.add_column(table, f.column_name, f) for f in missing))
