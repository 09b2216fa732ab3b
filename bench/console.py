"""Speed of the Suspicious IP page with 1,000,000 entries and 100,000 blocks.

Run as `bench/console` (it uses the project's .venv). Builds the database once
(cached under the scratch directory, keyed by the schema and the generator),
then times the real page through the Flask app, logged in, over a fixed,
seeded mix of filters, sorts, page sizes and pages, and prints p50/p95/max
overall and per kind of request, and the match count's own cost. Then the
100-row page with "Show domain names" against a 50 ms and a dead resolver on
loopback, beside serial lookups (bench/domain_names.py). Asserts nothing.
SPEC §9: p95 under 100 ms; names under 0.5 s, and under 1.5 s when dead.
"""

import argparse
import hashlib
import os
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import UTC
from datetime import datetime
from pathlib import Path

from appliance import addresses
from appliance import config
from appliance import models
from appliance import service
from appliance.config import THREAT_TYPES
from appliance.queries import SuspiciousQuery
from bench import domain_names

CACHE = Path(os.environ.get("SF_BENCH_CACHE", "/var/tmp/sender-filter-bench"))
GENERATOR = "console-data-2"  # change when the data below changes
DAY = 86400
SPAN_DAYS = 30
PASSWORD = "bench password"
TYPE_WEIGHTS = {"spam": 60, "dha": 20, "virus": 8, "bounce": 12}
STATUS_WEIGHTS = {"suspicious": 78, "monitored": 6, "blocked": 12, "approved": 4}
BATCH = 50_000
ENTRY_FIELDS = (
    "sender",
    "sender_key",
    "threat_type",
    "first_seen",
    "last_seen",
    "violations",
    "messages",
    "rate",
    "status",
    "open",
    "block",
)
BLOCK_FIELDS = (
    "target",
    "key_first",
    "key_last",
    "threat_type",
    "action",
    "created_at",
    "expires_at",
    "lifted_at",
    "lift_reason",
    "created_by",
    "reason",
    "domain",
    "changed_at",
)


# --- the data ------------------------------------------------------------------


def make_senders(rng, count):
    """Sender texts and keys: IPv4 hosts clustered in /24s, IPv6 per /64."""
    nets24 = [rng.randrange(0x01000000, 0xE0000000) & ~0xFF for _ in range(count // 6)]
    nets48 = [rng.randrange(0x2000 << 32, 0x3FFF << 32) for _ in range(count // 40)]
    senders = {}
    while len(senders) < count:
        if rng.random() < 0.75:
            value = rng.choice(nets24) | rng.randrange(1, 255)
            network = addresses.ipaddress.ip_network(value)
        else:
            value = (rng.choice(nets48) << 80) | (rng.randrange(0x10000) << 64)
            network = addresses.ipaddress.ip_network((value, 64))
        text = addresses.sender_text(network)
        senders[text] = addresses.key_of(network.network_address)
    return list(senders.items())


def entry_rows(rng, senders, count, end, block_ids):
    """`count` suspicious entries over the SPAN_DAYS before `end`, as tuples."""
    types = list(TYPE_WEIGHTS)
    type_weights = list(TYPE_WEIGHTS.values())
    statuses = list(STATUS_WEIGHTS)
    status_weights = list(STATUS_WEIGHTS.values())
    for _ in range(count):
        # a few senders come back again and again, most only once or twice
        sender, key = senders[int(len(senders) * rng.random() ** 2.2)]
        threat_type = rng.choices(types, type_weights)[0]
        last_seen = end - SPAN_DAYS * DAY * rng.random()
        first_seen = last_seen - min(rng.expovariate(1 / 1800), 3 * DAY)
        violations = min(1 + int(rng.paretovariate(1.3)), 5000)
        messages = violations + int(violations * rng.uniform(0, 6)) + rng.randrange(20)
        status = rng.choices(statuses, status_weights)[0]
        block = rng.choice(block_ids) if status == "blocked" else None
        yield (
            sender,
            key,
            threat_type,
            first_seen,
            last_seen,
            violations,
            messages,
            round(violations * 100 / messages, 2),
            status,
            last_seen > end - 3600,
            block,
        )


def block_rows(rng, senders, count, end):
    """`count` blocks, about half of them lifted, as tuples."""
    for _ in range(count):
        sender, _key = rng.choice(senders)
        network = addresses.parse_network(sender)
        if network.version == 4 and rng.random() < 0.1:
            network = network.supernet(new_prefix=24)
        first, last = addresses.key_range(network)
        created = end - 60 * DAY * rng.random()
        permanent = rng.random() < 0.2
        expires = None if permanent else created + rng.choice((3600, 6 * 3600, DAY))
        lifted = None
        if rng.random() < 0.5:
            lifted = created + rng.uniform(60, DAY)
        elif expires is not None and expires < end:
            expires = end + rng.uniform(0, DAY)
        threat_type = rng.choice((*THREAT_TYPES, "manual"))
        yield (
            addresses.sender_text(network),
            first,
            last,
            threat_type,
            "permanent" if permanent else "temporary",
            created,
            expires,
            lifted,
            "unblock" if lifted else None,
            "admin:bench" if threat_type == "manual" else f"rule:{threat_type}",
            "",
            None,
            created,
        )


def insert(model, names, rows):
    """executemany INSERT of tuples for the fields `names`; others get defaults."""
    others = [
        f
        for f in model._meta.sorted_fields
        if f.name not in names and f.name != "id" and f.default is not None
    ]
    defaults = tuple(f.default() if callable(f.default) else f.default for f in others)
    fields = [model._meta.fields[name] for name in names] + others
    columns = ", ".join(f.column_name for f in fields)
    marks = ", ".join("?" * len(fields))
    models.db.cursor().executemany(
        f"INSERT INTO {model._meta.table_name} ({columns}) VALUES ({marks})",
        (row + defaults for row in rows),
    )


def schema_key():
    """What a built database depends on: the models' schema and the generator."""
    with tempfile.TemporaryDirectory(prefix="sf-schema-") as tmp:
        models.connect(Path(tmp) / "schema.db")
        rows = models.db.execute_sql(
            "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL "
            "AND tbl_name IN ('suspiciousentry', 'block') ORDER BY name"
        ).fetchall()
        models.db.close()
    text = GENERATOR + "\n".join(sql for (sql,) in rows)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build(path, entries, blocks, end):
    """Fill a fresh database at `path` with blocks, entries, rules and an admin."""
    models.connect(path)
    settings = config.from_mapping({}, path.parent / "config.toml")
    service.seed_rules(settings)
    service.add_admin("bench", PASSWORD)
    rng = random.Random(4)
    senders = make_senders(rng, max(1000, entries // 4))

    with models.db.atomic():
        insert(models.Block, BLOCK_FIELDS, block_rows(rng, senders, blocks, end))
    block_ids = [i for (i,) in models.db.execute_sql("SELECT id FROM block")]

    rows = entry_rows(rng, senders, entries, end, block_ids)
    done = 0
    while done < entries:
        chunk = [row for _, row in zip(range(BATCH), rows, strict=False)]
        with models.db.atomic():
            insert(models.SuspiciousEntry, ENTRY_FIELDS, chunk)
        done += len(chunk)
        print(f"\r  {done:,} entries", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    models.db.close()


def cached_database(entries, blocks):
    """The benchmark database, built when the cache has none for this schema."""
    end = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    key = f"{schema_key()}-{entries}-{blocks}-{end:%Y%m%d}"
    path = CACHE / f"console-{key}.db"
    if path.exists():
        return path, end.timestamp()
    if CACHE.exists():
        shutil.rmtree(CACHE)
    CACHE.mkdir(parents=True)
    print(f"building {path} ({entries:,} entries, {blocks:,} blocks)", file=sys.stderr)
    started = time.perf_counter()
    partial = path.with_suffix(".partial")
    build(partial, entries, blocks, end.timestamp())
    for suffix in ("-wal", "-shm"):
        Path(f"{partial}{suffix}").unlink(missing_ok=True)
    partial.rename(path)
    seconds = time.perf_counter() - started
    print(f"built in {seconds:.0f} s", file=sys.stderr)
    return path, end.timestamp()


# --- the mix ---------------------------------------------------------------------


def request_mix(rng, path, end, count):
    """A fixed list of (kind, URL args) like an administrator's clicks."""
    with sqlite3.connect(path) as database:
        senders = [
            s
            for (s,) in database.execute(
                "SELECT sender FROM suspiciousentry WHERE id % 997 = 0"
            )
        ]
    columns = ("time", "type", "ip", "violations", "messages", "rate", "status")

    def day(offset):
        return datetime.fromtimestamp(end - offset * DAY, UTC).strftime("%Y-%m-%d")

    def minute(ts):
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M")

    def ip_search():
        network = addresses.parse_network(rng.choice(senders))
        if network.version == 4:
            prefix = rng.choice((32, 32, 24, 16))
        else:
            prefix = rng.choice((64, 64, 48))
        return str(network.supernet(new_prefix=prefix))

    def sort():
        return {"sort": rng.choice(columns), "order": rng.choice(("asc", "desc"))}

    kinds = {
        "first page": lambda: {},
        "type": lambda: {"type": rng.sample(THREAT_TYPES, rng.randrange(1, 4))},
        "dates": lambda: rng.choice(
            (
                {"from": minute(end - 3600)},
                {"from": day(1)},
                {"from": day(7), "to": day(5)},
                {"to": day(25)},
                {"from": day(20), "to": day(20)},
            )
        ),
        "ip": lambda: {"ip": ip_search(), **sort()},
        "sort": sort,
        "two-column sort": lambda: {
            **sort(),
            "then": rng.choice(columns),
            "then_order": rng.choice(("asc", "desc")),
        },
        "type+dates+sort": lambda: {
            "type": rng.sample(THREAT_TYPES, rng.randrange(1, 3)),
            "from": day(rng.randrange(1, 29)),
            **sort(),
        },
        "per page": lambda: {"per_page": rng.choice(("10", "25", "50", "100"))},
        "deep page": lambda: {
            **rng.choice(({}, sort(), {"type": ["spam"]})),
            "per_page": rng.choice(("25", "100")),
            "page": str(rng.choice((40, 400, 4000, 39_999))),
        },
    }
    mix = []
    for n in range(count):
        kind = list(kinds)[n % len(kinds)]
        mix.append((kind, kinds[kind]()))
    return mix


def timed_pages(client, mix):
    """Milliseconds per request, by kind; each answer checked for a table."""
    times = {}
    for kind, args in mix:
        started = time.perf_counter()
        response = client.get("/", query_string=args)
        elapsed = (time.perf_counter() - started) * 1000
        body = response.get_data(as_text=True)
        if response.status_code != 200 or 'class="log"' not in body:
            sys.exit(f"{kind} {args}: status {response.status_code}, no table")
        times.setdefault(kind, []).append(elapsed)
    return times


def timed_counts(mix, ipv6_prefix):
    """Milliseconds of the match count alone, for the same mix."""
    spent = []
    for _kind, args in mix:
        query, _errors = SuspiciousQuery.from_args(args, ipv6_prefix=ipv6_prefix)
        models.db.connect(reuse_if_open=True)
        started = time.perf_counter()
        query.count()
        spent.append((time.perf_counter() - started) * 1000)
        models.db.close()
    return spent


def summary(label, values):
    """One line: how many, p50, p95, max in milliseconds."""
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * len(ordered)) - 1)]
    return (
        f"{label:<18} n={len(values):<4} p50 {statistics.median(ordered):7.1f} ms  "
        f"p95 {p95:7.1f} ms  max {ordered[-1]:7.1f} ms"
    )


def main(argv=None):
    """Build or reuse the database, then measure and print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--blocks", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=270)
    parser.add_argument("--dns-runs", type=int, default=5)
    parser.add_argument("--serial-runs", type=int, default=3)
    args = parser.parse_args(argv)
    from web import create_app

    path, end = cached_database(args.entries, args.blocks)
    with tempfile.TemporaryDirectory(prefix="sf-bench-console-") as tmp:
        config_path = Path(tmp) / "config.toml"
        config_path.write_text(
            f'[database]\npath = "{path}"\n[web]\nsecret_key_file = "secret_key"\n'
        )
        settings = config.load(config_path)
        models.connect(settings.database)
        service.configure(settings)
        app = create_app(settings, {"TESTING": True, "WTF_CSRF_ENABLED": False})
        mix = request_mix(random.Random(9), path, end, args.requests)
        # like the console under waitress: each request opens its own connection
        models.db.close()
        client = app.test_client()
        login = {"username": "bench", "password": PASSWORD}
        response = client.post("/login", data=login)
        if response.status_code != 302:
            sys.exit("could not log in to the console")
        client.get("/")  # warm the OS page cache and the templates

        times = timed_pages(client, mix)
        counts = timed_counts(mix, settings.ipv6_prefix)
        names = domain_names.measure(client, settings, args.dns_runs, args.serial_runs)

    print(f"Suspicious IP page: {args.entries:,} entries, {args.blocks:,} blocks")
    print(summary("all requests", [t for kind in times.values() for t in kind]))
    for kind, values in times.items():
        print(summary(kind, values))
    print(summary("match count only", counts))
    print("SPEC §9 bar: p95 < 100 ms")
    print("\n".join(names))


if __name__ == "__main__":
    main()
