"""Speed of the Sender filtering log page with 100,000 blocks and their actions.

Run as `.venv/bin/python -m bench.activity`. Builds a scratch database with
100,000 blocks (IPv4 and IPv6, temporary and permanent, two thirds of them
lifted or expired over 30 days) and 200,000 recorded actions, then times the
real page through the Flask app, logged in, over a seeded mix of IP and date
filters, both lists, page sizes and deep pages, and prints p50/p95/max per
kind of request. Asserts nothing.
"""

import random
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
from web import create_app

BLOCKS = 100_000
DAY = 86400
PASSWORD = "bench password"
BATCH = 10_000


def block_rows(rng, end):
    """Blocks and the actions that made and lifted them, oldest first."""
    blocks, actions = [], []
    for n in range(BLOCKS):
        if rng.random() < 0.8:
            network = addresses.ipaddress.ip_network(
                rng.randrange(0x01000000, 0xE0000000)
            )
        else:
            value = rng.randrange(0x2000 << 112, 0x3FFF << 112) >> 64 << 64
            network = addresses.ipaddress.ip_network((value, 64))
        target = addresses.sender_text(network)
        first, last = addresses.key_range(network)
        created = end - 30 * DAY + n * (30 * DAY / BLOCKS)
        duration = rng.choice((3600, 86400, None))
        lifted = created + rng.randrange(60, 7200) if rng.random() < 0.66 else None
        blocks.append(
            {
                "target": target,
                "key_first": first,
                "key_last": last,
                "threat_type": rng.choice(("spam", "dha", "virus", "bounce")),
                "action": "temporary" if duration else "permanent",
                "created_at": created,
                "expires_at": created + duration if duration else None,
                "lifted_at": lifted,
                "lift_reason": "unblocked" if lifted else None,
                "created_by": "rule:spam",
                "reason": "spam rate 64% over 112 messages",
                "changed_at": created,
            }
        )
        for ts, action in ((created, "block"), (lifted, "unblocked")):
            if ts is not None:
                actions.append(
                    {
                        "ts": ts,
                        "actor": "admin:alice",
                        "action": action,
                        "target": target,
                        "detail": "",
                        "source": "198.51.100.7",
                        "key_first": first,
                        "key_last": last,
                    }
                )
    return blocks, actions


def request_mix(rng, blocks, end, count):
    """(kind, URL) pairs over filters, lists and pages."""
    day = datetime.fromtimestamp(end - rng.randrange(30) * DAY, UTC).date()
    mix = []
    for _ in range(count):
        view = rng.choice(("blocks", "actions"))
        target = rng.choice(blocks)["target"]
        kinds = {
            "no filter": "",
            "ip": f"&ip={target}",
            "cidr /16": "&ip="
            + str(addresses.ipaddress.ip_network(target).supernet(new_prefix=16))
            if ":" not in target
            else f"&ip={target}",
            "one day": f"&from={day}&to={day}",
            "deep page": f"&page={rng.randrange(100, 1000)}",
        }
        kind = rng.choice(list(kinds))
        per_page = rng.choice((25, 50, 100))
        mix.append((kind, f"/activity?view={view}&per_page={per_page}{kinds[kind]}"))
    return mix


def main():
    """Build the data, time the page, print the figures."""
    rng = random.Random(4)
    end = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        config_path = Path(scratch) / "config.toml"
        config_path.write_text('[web]\nsecret_key_file = "secret_key"\n')
        settings = config.load(config_path)
        models.connect(settings.database)
        service.configure(settings)
        service.seed_rules(settings)
        service.add_admin("bench", PASSWORD)

        started = time.perf_counter()
        blocks, actions = block_rows(rng, end)
        with models.db.atomic():
            for start in range(0, len(blocks), BATCH):
                models.Block.insert_many(blocks[start : start + BATCH]).execute()
            for start in range(0, len(actions), BATCH):
                models.AuditEntry.insert_many(actions[start : start + BATCH]).execute()
        models.db.execute_sql("ANALYZE")
        print(
            f"built {len(blocks):,} blocks and {len(actions):,} actions "
            f"in {time.perf_counter() - started:.1f} s"
        )

        app = create_app(settings, {"TESTING": True, "WTF_CSRF_ENABLED": False})
        client = app.test_client()
        client.post("/login", data={"username": "bench", "password": PASSWORD})
        timings = {}
        for kind, url in request_mix(rng, blocks, end, 600):
            started = time.perf_counter()
            response = client.get(url)
            took = (time.perf_counter() - started) * 1000
            if response.status_code != 200:
                sys.exit(f"{url} answered {response.status_code}")
            timings.setdefault(kind, []).append(took)
        everything = [t for values in timings.values() for t in values]
        for kind, values in [*sorted(timings.items()), ("all", everything)]:
            values.sort()
            p95 = values[int(len(values) * 0.95) - 1]
            print(
                f"{kind:10} n={len(values):4}  p50 {statistics.median(values):6.1f} ms"
                f"  p95 {p95:6.1f} ms  max {values[-1]:6.1f} ms"
            )
        models.db.close()


if __name__ == "__main__":
    main()
