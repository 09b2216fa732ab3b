"""Peewee models: counts, episodes, blocks, lists, positions, the audit log."""

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


class WindowEvent(BaseModel):
    """One counted event, kept for the longest window so restarts rebuild it."""

    # written for every event and read only by time: no index on sender
    sender = CharField()
    ts = FloatField(index=True)
    message = IntegerField()
    violations = CharField()
    recipients = IntegerField()
    unknown = IntegerField()


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

    class Meta:
        indexes = ((("key_first", "key_last"), False),)

    @property
    def active(self):
        """Whether nothing has lifted this block yet."""
        return self.lifted_at is None


class SuspiciousEntry(BaseModel):
    """One episode of one sender's violations of one threat type (SPEC §4)."""

    sender = CharField()
    sender_key = CharField(index=True)
    threat_type = CharField()
    first_seen = FloatField()
    last_seen = FloatField()
    violations = IntegerField(default=0)
    messages = IntegerField(default=0)
    rate = FloatField(default=0.0, index=True)
    status = CharField(default="suspicious")
    open = BooleanField(default=True)
    block = ForeignKeyField(Block, null=True, backref="entries")

    class Meta:
        # the daemon and the console both write entries: save what changed only
        only_save_dirty = True
        indexes = (
            (("last_seen", "first_seen"), False),
            (("threat_type", "last_seen"), False),
            (("violations", "last_seen"), False),
            (("messages", "last_seen"), False),
            (("status", "last_seen"), False),
            (("sender", "threat_type", "open"), False),
            # a new block marks the unblocked entries in its key range
            (("status", "sender_key"), False),
        )


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
    WindowEvent,
    Block,
    SuspiciousEntry,
    ApprovedHost,
    SourcePosition,
    SourceCounter,
    AuditEntry,
    ApiToken,
    ApplianceState,
)


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
    database.create_tables(ALL_MODELS)
    return database
