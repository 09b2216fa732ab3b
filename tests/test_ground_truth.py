"""Catch-up over a generated gateway log gives exactly the ground truth."""

import json

import pytest

from appliance import addresses
from appliance import cli
from appliance import config
from appliance import loggen
from appliance import service
from appliance.config import THREAT_TYPES
from appliance.evidence import FIRST_KEPT
from appliance.evidence import LATEST_KEPT
from appliance.models import Block
from appliance.models import Evidence
from appliance.models import SourceCounter
from appliance.models import SuspiciousEntry
from appliance.sources.timestamps import StampReader
from tests.conftest import write_config

RULES_TOML = """
[rules.spam]
messages = 20
[rules.virus]
messages = 20
action = "permanent"
[rules.dha]
messages = 20
duration = 7200
[rules.bounce]
messages = 20
duration = 1800
"""


@pytest.fixture(scope="module")
def caught_up(tmp_path_factory):
    """A generated 3-hour log, ingested once; returns (truth, config path)."""
    directory = tmp_path_factory.mktemp("truth")
    config_path = write_config(directory, RULES_TOML)
    rules = config.load(config_path).rules
    log_path = directory / "mail.log"
    truth = loggen.generate(log_path, seed=7, hours=3, rules=rules)

    assert cli.main(["init", "--config", str(config_path)]) == 0
    assert cli.main(["ingest", "--config", str(config_path), str(log_path)]) == 0
    return truth, config_path, log_path


def blocks_in_db():
    """Every block the ingest made, as the ground truth writes them."""
    return sorted(
        (b.target, b.threat_type, b.created_at, b.expires_at) for b in Block.select()
    )


def episodes_in_db():
    """Every suspicious entry, as the ground truth writes them."""
    return sorted(
        (
            e.sender,
            e.threat_type,
            e.first_seen,
            e.last_seen,
            e.violations,
            e.messages,
            e.status,
        )
        for e in SuspiciousEntry.select()
    )


def test_exactly_the_expected_senders_are_blocked(caught_up):
    truth, _config, _log = caught_up

    expected = sorted(
        (b["ip"], b["type"], b["created_at"], b["expires_at"]) for b in truth["blocks"]
    )

    assert blocks_in_db() == expected
    assert len(expected) > 30


def expected_entries(truth):
    """The ground truth's episodes as sorted tuples, like episodes_in_db()."""
    return sorted(
        (
            e["ip"],
            e["type"],
            e["first_seen"],
            e["last_seen"],
            e["violations"],
            e["messages"],
            e["status"],
        )
        for e in truth["episodes"]
    )


def test_exactly_the_expected_entries_with_exact_counts(caught_up):
    truth, _config, _log = caught_up

    expected = expected_entries(truth)

    assert episodes_in_db() == expected
    suspicious = [e for e in expected if e[6] == "suspicious"]
    assert len(suspicious) > 20


def test_every_hostile_class_is_blocked_and_light_ones_stay_suspicious(caught_up):
    truth, _config, _log = caught_up
    blocked = {(b["ip"], b["type"]) for b in truth["blocks"]}
    wanted = {
        "spammer": "spam",
        "virus": "virus",
        "harvester": "dha",
        "bounce-flood": "bounce",
    }

    for sender in truth["senders"]:
        ip = loggen.addresses.sender_text(loggen.addresses.sender_of(sender["ip"]))
        if sender["kind"] in wanted:
            assert (ip, wanted[sender["kind"]]) in blocked, sender
        elif sender["kind"].startswith("light-"):
            assert not any(b[0] == ip for b in blocked), sender
            statuses = {
                e.status
                for e in SuspiciousEntry.select().where(SuspiciousEntry.sender == ip)
            }
            assert statuses == {"suspicious"}, sender
    virus = Block.select().where(Block.threat_type == "virus")
    assert {b.action for b in virus} == {"permanent"}


def test_every_entry_keeps_its_first_and_latest_violations_as_real_log_lines(
    caught_up,
):
    truth, _config, log_path = caught_up
    log_lines = set(log_path.read_text().splitlines())
    stamps = StampReader()
    blocked = {(b["ip"], b["type"]) for b in truth["blocks"]}
    with_evidence = set()

    for entry in SuspiciousEntry.select():
        rows = list(entry.evidence.order_by(Evidence.number))
        v = entry.violations
        first = range(1, min(v, FIRST_KEPT) + 1)
        latest = range(max(FIRST_KEPT + 1, v - LATEST_KEPT + 1), v + 1)

        assert [r.number for r in rows] == [*first, *latest], entry.id
        assert (rows[0].ts, rows[-1].ts) == (entry.first_seen, entry.last_seen)
        for row in rows:
            assert row.line in log_lines, row.line
            assert row.source == str(log_path)
            assert stamps.read(row.line)[0] == row.ts
            assert entry.threat_type in row.violations.split(",")
        with_evidence.add((entry.sender, entry.threat_type))
    assert blocked <= with_evidence
    assert max(e.violations for e in SuspiciousEntry.select()) > 20


def test_garbage_lines_are_counted_and_skipped(caught_up):
    truth, _config, log_path = caught_up

    counter = SourceCounter.get(SourceCounter.path == str(log_path))

    assert counter.skipped == truth["garbage_lines"]
    assert counter.lines == sum(1 for _ in open(log_path, "rb"))


def test_reading_the_same_log_again_counts_nothing_twice(caught_up, capsys):
    truth, config_path, log_path = caught_up
    before = (blocks_in_db(), episodes_in_db())

    assert (
        cli.main(["ingest", "--json", "--config", str(config_path), str(log_path)]) == 0
    )

    summary = json.loads(capsys.readouterr().out)
    assert summary["lines"] == 0
    assert (blocks_in_db(), episodes_in_db()) == before


def test_no_generated_sender_is_one_of_this_machines_addresses(caught_up):
    truth, _config, _log = caught_up
    own = service.interface_addresses()

    senders = [addresses.parse_network(s["ip"]) for s in truth["senders"]]

    assert not [s for s in senders if any(addresses.overlaps(s, o) for o in own)]


def test_every_threat_type_appears(caught_up):
    truth, _config, _log = caught_up

    assert {e["type"] for e in truth["episodes"]} == set(THREAT_TYPES)
