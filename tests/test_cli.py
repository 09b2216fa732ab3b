"""The sender-filter command: lists, one-line refusals, JSON output."""

import bz2
import json
import lzma
import subprocess
import sys
import time

import pytest
from dnsserver import DeadResolver
from dnsserver import Dnsmasq
from test_web import add_entry

from appliance import addresses
from appliance import cli
from appliance import models
from appliance import queries
from appliance.models import ApprovedHost
from appliance.models import AuditEntry
from appliance.models import Block
from appliance.models import SuspiciousEntry
from appliance.timefmt import iso
from tests.conftest import write_config

NAME = "sender.example.test"
# the names the test dnsmasq serves; others under example.test do not exist
HOST_RECORDS = {
    NAME: ["192.0.2.77", "2001:db8::77"],
    "loopback.example.test": ["127.0.0.1"],
}


def fresh_appliance(tmp_path, capsys, extra=""):
    """Init an appliance; returns a runner giving (status, stdout, stderr)."""
    config_path = write_config(tmp_path, extra)

    def invoke(*argv):
        status = cli.main([argv[0], "--config", str(config_path), *argv[1:]])
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    assert invoke("init")[0] == 0
    return invoke


@pytest.fixture
def run(tmp_path, capsys):
    """Run the CLI against a fresh appliance; returns (status, stdout, stderr)."""
    return fresh_appliance(tmp_path, capsys)


@pytest.fixture(scope="module")
def dns_server():
    """A dnsmasq on loopback serving HOST_RECORDS, authoritative for example.test."""
    with Dnsmasq({}, HOST_RECORDS, authoritative_for="example.test") as server:
        yield server


@pytest.fixture
def run_named(tmp_path, capsys, dns_server):
    """`run` for an appliance that resolves names at the test dnsmasq."""
    extra = f'[dns]\nnameservers = ["{dns_server.nameserver}"]\n'
    return fresh_appliance(tmp_path, capsys, extra)


def test_init_prints_the_admin_password_once(tmp_path, capsys):
    config_path = write_config(tmp_path)

    assert cli.main(["init", "--json", "--config", str(config_path)]) == 0
    first = json.loads(capsys.readouterr().out)
    assert cli.main(["init", "--json", "--config", str(config_path)]) == 0
    second = json.loads(capsys.readouterr().out)

    assert first["admin"] == "admin" and len(first["password"]) >= 12
    assert second["admin"] is None and "password" not in second


def test_block_list_and_unblock(run):
    status, out, _ = run("block", "198.51.100.7", "--for", "2h", "--reason", "test")
    assert status == 0 and out.startswith("198.51.100.7 blocked 2h (until ")

    status, out, _ = run("blocks", "--json")
    rows = json.loads(out)["blocks"]
    assert [(r["target"], r["action"], r["type"], r["created_by"]) for r in rows] == [
        ("198.51.100.7", "temporary", "manual", "cli")
    ]

    assert run("unblock", "198.51.100.7")[0] == 0
    assert json.loads(run("blocks", "--json")[1])["blocks"] == []
    everything = json.loads(run("blocks", "--all", "--json")[1])["blocks"]
    assert [(r["target"], r["lift_reason"]) for r in everything] == [
        ("198.51.100.7", "unblocked")
    ]


def test_permanent_block_of_an_ipv6_network(run):
    status, out, _ = run("block", "2001:db8:7::/48", "--permanent", "--json")

    block = json.loads(out)
    assert status == 0
    assert (block["target"], block["action"], block["expires_at"]) == (
        "2001:db8:7::/48",
        "permanent",
        "",
    )


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (("block", "0.0.0.0/0"), "0.0.0.0/0 is wider than /16"),
        (("block", "::/0"), "::/0 is wider than /32"),
        (("block", "127.0.0.1"), "127.0.0.1 covers loopback"),
        (("block", "not-an-ip"), "'not-an-ip' is not an IP address"),
        (("block", "192.0.2.9/24"), "has host bits set; did you mean 192.0.2.0/24?"),
        (("block", "fe80::1%eth0"), "zone ids (%) are not sender addresses"),
        (("block", "0.0.0.0"), "0.0.0.0 is the unspecified address, not a sender"),
        (("block", "224.0.0.1"), "224.0.0.1 is multicast, not a sender"),
        (("block", "255.255.255.255"), "is the broadcast address, not a sender"),
        (("approve", "0.0.0.0/0"), "wider than /16, the widest range to approve"),
        (("block", "192.0.2.9", "--for", "soon"), "'soon' is not a duration"),
        (("block", "192.0.2.9", "--for", "31d"), "from 1 second to 30 days"),
        (("unblock", "192.0.2.9"), "192.0.2.9 is not blocked"),
        (("unapprove", "192.0.2.9"), "192.0.2.9 is not on the approved list"),
    ],
)
def test_bad_input_is_refused_with_one_line(run, argv, reason):
    status, out, err = run(*argv)

    assert status == 2
    assert out == ""
    assert err.count("\n") == 1 and reason in err
    assert Block.select().count() == 0


def test_approve_lifting_many_blocks_names_ten_and_counts(run):
    for host in range(1, 13):
        assert run("block", f"198.51.100.{host}", "--permanent")[0] == 0
        assert run("block", f"203.0.113.{host}", "--permanent")[0] == 0

    status, out, _ = run("approve", "198.51.100.0/28")
    _, listed, _ = run("approve", "203.0.113.0/28", "--json")

    assert status == 0
    assert out.startswith("198.51.100.0/28 approved; 12 blocks lifted: ")
    assert out.strip().endswith(", ... (--json lists all)")
    assert out.count("198.51.100.") == 1 + 10
    assert len(json.loads(listed)["lifted"]) == 12


def test_approved_address_cannot_be_blocked_and_approving_lifts(run):
    assert run("block", "203.0.113.5", "--permanent")[0] == 0

    status, out, _ = run("approve", "203.0.113.0/28")
    assert status == 0
    assert out.strip() == "203.0.113.0/28 approved; blocks lifted: 203.0.113.5"
    assert json.loads(run("blocks", "--json")[1])["blocks"] == []

    status, _, err = run("block", "203.0.113.9")
    assert status == 2
    assert err.strip().endswith("203.0.113.9 covers approved 203.0.113.0/28")
    actions = [a.action for a in AuditEntry.select().order_by(AuditEntry.id)]
    assert actions[-3:] == ["block", "approve", "approved"]


def test_missing_config_and_missing_database_are_one_line(tmp_path, capsys):
    missing = tmp_path / "nowhere.toml"

    assert cli.main(["blocks", "--config", str(missing)]) == 2
    assert "does not exist" in capsys.readouterr().err

    config_path = write_config(tmp_path)
    assert cli.main(["blocks", "--config", str(config_path)]) == 2
    assert "run `sender-filter init` first" in capsys.readouterr().err


def test_ingest_of_a_missing_file_is_one_line(run):
    status, _, err = run("ingest", "/nonexistent/mail.log")

    assert status == 2
    assert err.strip() == (
        "sender-filter ingest: /nonexistent/mail.log is not a readable file"
    )


@pytest.mark.parametrize(("suffix", "kind"), [(".xz", "xz"), (".bz2", "bzip2")])
def test_ingest_refuses_logs_compressed_other_than_gzip(run, tmp_path, suffix, kind):
    path = tmp_path / f"mail.log.2{suffix}"
    line = "Dec  4 10:00:00 mx1 postfix/smtpd[1]: connect from x[192.0.2.1]\n"
    opener = lzma.open if suffix == ".xz" else bz2.open
    with opener(path, "wt") as compressed:
        compressed.write(line)

    status, _, err = run("ingest", str(path))

    assert status == 2
    assert err.strip() == (
        f"sender-filter ingest: {path} is {kind}-compressed: only plain and .gz "
        "logs are read; decompress it first"
    )
    status, out, _ = run("--json", "status")
    assert json.loads(out)["sources"] == []


def test_options_may_come_before_the_subcommand(tmp_path, capsys):
    config_path = write_config(tmp_path)
    assert cli.main(["--config", str(config_path), "init"]) == 0
    capsys.readouterr()

    assert cli.main(["--json", "--config", str(config_path), "blocks"]) == 0

    assert json.loads(capsys.readouterr().out) == {
        "blocks": [],
        "repeat": {"factor": 2.0, "maximum": 2592000, "period": 604800},
        "enforcement": {
            "backend": None,
            "kernel_checked_at": "",
            "error": "",
            "notice": "The daemon has not run yet: no block is enforced.",
        },
    }


@pytest.mark.parametrize("limit", ["abc", "0", "-1", "10001", "99999999999999999999"])
def test_usage_errors_are_one_line(run, capsys, limit):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["suspicious", "--limit", limit])

    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "sender-filter suspicious: argument --limit: "
        f"{limit!r} is not a number of entries from 1 to 10000 (see --help)\n"
    )


@pytest.fixture
def many_senders(run):
    """1,300 IPv6 senders in the log, newest last; 256 of them under a block."""
    senders = [f"2001:db8:0:{n:x}::/64" for n in range(1300)]
    with models.db.atomic():
        for n, sender in enumerate(senders):
            add_entry(sender, last_seen=1_780_000_000.0 + n)
    assert run("block", "2001:db8:0:100::/56", "--permanent")[0] == 0
    return senders


def test_suspicious_lists_more_senders_than_one_block_query_may_name(run, many_senders):
    # the review's case: 1,150 senders or more crashed with a traceback
    status, out, err = run("suspicious", "--limit", "5000", "--json")

    rows = json.loads(out)
    assert (status, err) == (0, "")
    assert [row["ip"] for row in rows] == many_senders[::-1]
    blocked = [row["ip"] for row in rows if row["status"] == "blocked"]
    assert blocked == many_senders[0x100:0x200][::-1]


def test_suspicious_says_when_more_entries_match_than_shown(run, many_senders):
    _, default, _ = run("suspicious")
    _, some, _ = run("suspicious", "--limit", "7")
    _, every, _ = run("suspicious", "--limit", "1300")
    _, as_json, _ = run("suspicious", "--json")

    assert default.splitlines()[-1] == "100 of 1,300 shown; --limit to see more"
    assert len(default.splitlines()) == 101
    assert some.splitlines()[-1] == "7 of 1,300 shown; --limit to see more"
    assert len(every.splitlines()) == 1300
    assert every.splitlines()[-1].split()[2] == many_senders[0]
    assert len(json.loads(as_json)) == 100


def test_suspicious_past_what_the_limit_reaches_asks_to_narrow(
    run, many_senders, monkeypatch
):
    monkeypatch.setattr(cli, "MATCH_CAP", 1000)
    monkeypatch.setattr(queries, "MATCH_CAP", 1000)

    _, every, _ = run("suspicious", "--limit", "1000")
    _, spam, _ = run("suspicious", "--limit", "1000", "--type", "spam")
    _, some, _ = run("suspicious", "--limit", "10", "--type", "spam")

    narrow = "narrow with --type, --ip, --since or --until"
    assert every.splitlines()[-1] == f"1,000 of 1,300 shown; {narrow}"
    assert spam.splitlines()[-1] == f"1,000 of 1,000+ shown; {narrow}"
    assert some.splitlines()[-1] == "10 of 1,000+ shown; --limit to see more"


def test_suspicious_shows_the_status_as_of_now(run):
    SuspiciousEntry.create(
        sender="198.51.100.8",
        sender_key=addresses.key_of(addresses.parse_ip("198.51.100.8")),
        threat_type="spam",
        first_seen=1_780_000_000.0,
        last_seen=1_780_000_060.0,
        violations=3,
        messages=4,
        rate=75.0,
    )

    def shown():
        rows = json.loads(run("suspicious", "--json")[1])
        return [(r["ip"], r["status"]) for r in rows]

    assert shown() == [("198.51.100.8", "suspicious")]
    run("block", "198.51.100.0/24", "--permanent")
    assert shown() == [("198.51.100.8", "blocked")]
    run("unblock", "198.51.100.0/24")
    assert shown() == [("198.51.100.8", "block ended")]


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ('[logs]\nfiles = "mail.log"\n', "logs.files is a list of strings"),
        ('[network]\nown_addresses = ["zzz"]\n', "network.own_addresses: 'zzz'"),
        ("[rules.spam]\nrate = 500\n", "rules.spam.rate is a percentage"),
        ("[rules.dha]\nmessages = -5\n", "rules.dha.messages is a number, 0 or more"),
        ("[rules.worm]\nrate = 5\n", "[rules.worm]: threat types are"),
        ("[dns]\ntimeout = -1\n", "dns.timeout is a number of seconds"),
        ("[nonsense]\n", "unknown section [nonsense]"),
    ],
)
def test_bad_config_values_are_one_line(tmp_path, capsys, extra, reason):
    config_path = write_config(tmp_path, extra)

    assert cli.main(["init", "--config", str(config_path)]) == 2

    err = capsys.readouterr().err
    assert err.count("\n") == 1 and reason in err


def test_enforcement_ports_are_checked(tmp_path, capsys):
    config_path = write_config(tmp_path, "ports = [0, 70000]\n")

    assert cli.main(["init", "--config", str(config_path)]) == 2

    assert "enforcement.ports is a list of ports 1-65535" in capsys.readouterr().err


def test_concurrent_blocks_of_one_address_make_one_block(tmp_path):
    config_path = write_config(tmp_path)
    assert cli.main(["init", "--config", str(config_path)]) == 0
    argv = [sys.executable, "-m", "appliance.cli", "--config", str(config_path)]

    racers = [
        subprocess.Popen(
            [*argv, "block", "203.0.113.50", "--for", "1h"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(8)
    ]
    refusals = [racer.communicate(timeout=60)[1] for racer in racers]

    assert sorted(racer.returncode for racer in racers) == [0] + [2] * 7
    assert sum("203.0.113.50 is already blocked" in err for err in refusals) == 7
    assert Block.select().where(Block.target == "203.0.113.50").count() == 1


def test_block_then_approve_a_domain_name_acts_on_each_address(run_named):
    status, out, err = run_named("block", "Sender.Example.Test.", "--for", "2h")

    blocks = {b.target: b for b in Block.select()}
    assert (status, err) == (0, "")
    assert sorted(blocks) == ["192.0.2.77", "2001:db8::77"]
    assert out.splitlines() == [
        f"{target} ({NAME}) blocked 2h (until {iso(blocks[target].expires_at)})"
        for target in ("192.0.2.77", "2001:db8::77")
    ]
    for block in blocks.values():
        assert (block.domain, block.created_by, block.threat_type) == (
            NAME,
            "cli",
            "manual",
        )
        assert block.expires_at - block.created_at == 7200

    status, out, err = run_named("approve", NAME, "--json")

    assert (status, err) == (0, "")
    assert json.loads(out) == {
        "domain": NAME,
        "approved": ["192.0.2.77", "2001:db8::77"],
        "lifted": ["192.0.2.77", "2001:db8::77"],
        "refused": [],
    }
    assert json.loads(run_named("blocks", "--json")[1])["blocks"] == []
    approved = {(a.target, a.domain) for a in ApprovedHost.select()}
    assert approved == {("192.0.2.77", NAME), ("2001:db8::77", NAME)}


def test_permanent_block_of_a_name_as_json(run_named):
    status, out, _ = run_named("block", NAME, "--permanent", "--json")

    payload = json.loads(out)
    assert status == 0
    assert (payload["domain"], payload["refused"]) == (NAME, [])
    assert [(b["target"], b["action"], b["expires_at"]) for b in payload["blocks"]] == [
        ("192.0.2.77", "permanent", ""),
        ("2001:db8::77", "permanent", ""),
    ]


def test_approved_address_of_a_name_is_refused_alone(run_named):
    assert run_named("approve", "192.0.2.0/24")[0] == 0

    status, out, err = run_named("block", NAME, "--permanent")

    assert (status, err) == (0, "")
    assert out.splitlines() == [
        "192.0.2.77 not blocked: 192.0.2.77 covers approved 192.0.2.0/24",
        f"2001:db8::77 ({NAME}) blocked permanent",
    ]
    assert [b.target for b in Block.select()] == ["2001:db8::77"]


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (("block", "gone.example.test"), "gone.example.test does not exist in DNS"),
        (("approve", "gone.example.test"), "gone.example.test does not exist in DNS"),
        (
            ("block", "loopback.example.test"),
            "127.0.0.1 not blocked: 127.0.0.1 covers loopback, which is always "
            "approved",
        ),
        (
            ("block", "bad_name.example.test"),
            "'bad_name.example.test' is not an IP address, a CIDR network or a "
            "domain name",
        ),
    ],
)
def test_a_name_with_nothing_to_act_on_is_refused_in_one_line(run_named, argv, line):
    status, out, err = run_named(*argv)

    assert (status, out) == (2, "")
    assert err == f"sender-filter {argv[0]}: {line}\n"
    assert Block.select().count() == ApprovedHost.select().count() == 0


def test_a_name_at_a_dead_resolver_is_refused_within_the_timeout(tmp_path, capsys):
    with DeadResolver() as dead:
        extra = f'[dns]\nnameservers = ["{dead.nameserver}"]\ntimeout = 0.3\n'
        run = fresh_appliance(tmp_path, capsys, extra)
        started = time.monotonic()
        status, out, err = run("block", NAME)
        elapsed = time.monotonic() - started

    assert (status, out) == (2, "")
    reason = f"{NAME} does not resolve: no answer within 0.3 s"
    assert err == f"sender-filter block: {reason}\n"
    # A and AAAA, 0.3 s each; dnspython's own default would wait 5 s per query
    assert elapsed < 5
    assert Block.select().count() == 0
