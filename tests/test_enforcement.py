"""Enforcement: the kernel backend in its own namespaces, dry-run and plan anywhere.

Kernel tests build a lab (tests/netns.py) with an appliance namespace and
sender namespaces on one bridge, and drive KernelBackend inside the appliance
namespace, one short Python process per call, because python-iptables and
ipset act on the namespace of the process that calls them.
"""

import ipaddress
import json
import logging
import subprocess
import time

import pytest
from conftest import require_root_tools
from netns import Lab

from appliance.addresses import AddressError
from appliance.addresses import sender_text
from appliance.config import Settings
from enforcement.dryrun import DryRunBackend
from enforcement.plan import KERNEL_MAX_TIMEOUT
from enforcement.plan import entry_text
from enforcement.plan import fit
from enforcement.plan import plan

APPLIANCE_V4 = "192.0.2.1"
APPLIANCE_V6 = "2001:db8:1::1"
SMTP = 25
UNPROTECTED = 2525

# runs one backend method inside a namespace; request and answer are JSON
BACKEND_CALL = r"""
import dataclasses, json, logging, sys
from pathlib import Path
from appliance.config import Settings
from enforcement import commands as tools
from enforcement import kernel

logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
request = json.load(sys.stdin)
commands = []
real_run = tools.run

def recorded_run(argv, batch=None):
    commands.append(argv)
    return real_run(argv, batch)

tools.run = recorded_run
settings = Settings(path=Path("config.toml"), database=Path("unused.db"),
                    **request["settings"])
backend = kernel.KernelBackend(settings)
result = getattr(backend, request["method"])(*request["args"])
if dataclasses.is_dataclass(result):
    result = dataclasses.asdict(result)
elif isinstance(result, set):
    result = sorted(result)
print(json.dumps({"result": result, "commands": commands}, default=sorted))
"""

# connects, reads the greeting, then reports whether the server cut it off
HELD_CONNECTION = r"""
import socket, sys
client = socket.create_connection((sys.argv[1], int(sys.argv[2])), 5)
client.recv(100)
print("ready", flush=True)
client.settimeout(15)
try:
    print("cut" if client.recv(100) == b"" else "data", flush=True)
except ConnectionResetError:
    print("cut", flush=True)
except TimeoutError:
    print("alive", flush=True)
"""


class Appliance:
    """KernelBackend driven inside the appliance namespace, one process per call."""

    def __init__(self, namespace, **settings):
        """A backend with SPEC default settings, overridden by `settings`."""
        self.namespace = namespace
        self.settings = settings
        self.commands = []

    def call(self, method, *args):
        """Run one backend method inside the namespace and return its result."""
        request = {"method": method, "args": args, "settings": self.settings}
        result = self.namespace.python(BACKEND_CALL, stdin=json.dumps(request))
        answer = json.loads(result.stdout)
        self.commands = answer["commands"]
        return answer["result"]

    def sync(self, desired):
        """Sync to `desired`; the Change as a dict."""
        return self.call("sync", desired)

    def enforced(self):
        """What the kernel holds, as a set of entries."""
        return set(self.call("enforced"))

    def ipset_calls(self, subcommand):
        """How many `ipset SUBCOMMAND` runs the last call made."""
        return sum(1 for argv in self.commands if argv[:2] == ["ipset", subcommand])

    def shell(self, *argv):
        """A command's output inside the appliance namespace."""
        return self.namespace.run(*argv).stdout


@pytest.fixture
def lab():
    """A fresh lab, removed with everything in it when the test ends."""
    require_root_tools("ip", "ipset", "iptables-nft", "ip6tables-nft")
    with Lab() as fresh:
        yield fresh


@pytest.fixture
def gateway(lab):
    """The appliance namespace, listening on SMTP and on an unprotected port."""
    host = lab.add_host("gw", APPLIANCE_V4, APPLIANCE_V6)
    host.listen(SMTP)
    host.listen(UNPROTECTED)
    return host


@pytest.fixture
def appliance(gateway):
    """The kernel backend acting inside the gateway namespace."""
    return Appliance(gateway)


def test_blocked_sender_is_refused_while_other_sender_connects(lab, appliance):
    """A blocked sender is reset on SMTP; its neighbour and other ports are not."""
    spammer = lab.add_host("spammer", "198.51.100.7")
    neighbour = lab.add_host("neighbour", "198.51.100.8")

    change = appliance.sync({"198.51.100.7": None})

    assert change["added"] == ["198.51.100.7"]
    assert not spammer.can_connect(APPLIANCE_V4, SMTP)
    assert neighbour.can_connect(APPLIANCE_V4, SMTP)
    assert spammer.can_connect(APPLIANCE_V4, UNPROTECTED)


def test_unblocked_sender_connects_again(lab, appliance):
    """Syncing without an entry lifts its block at once."""
    spammer = lab.add_host("spammer", "198.51.100.7")
    appliance.sync({"198.51.100.7": 3600})
    assert not spammer.can_connect(APPLIANCE_V4, SMTP)

    change = appliance.sync({})

    assert change["removed"] == ["198.51.100.7"]
    assert spammer.can_connect(APPLIANCE_V4, SMTP)


def test_temporary_block_expires_in_kernel_without_daemon(lab, appliance):
    """The kernel lifts a 2 s block by itself, with no process running."""
    spammer = lab.add_host("spammer", "198.51.100.7")
    appliance.sync({"198.51.100.7": 2})
    assert not spammer.can_connect(APPLIANCE_V4, SMTP)

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not spammer.can_connect(
        APPLIANCE_V4, SMTP, timeout=1
    ):
        time.sleep(0.5)

    assert spammer.can_connect(APPLIANCE_V4, SMTP)
    assert appliance.enforced() == set()


def test_ipv6_prefix_block_covers_every_address_in_the_prefix(lab, appliance):
    """A /64 entry blocks every address in it and nothing outside."""
    first = lab.add_host("first", ipv6="2001:db8:2::7")
    second = lab.add_host("second", ipv6="2001:db8:2::8")
    outsider = lab.add_host("outsider", ipv6="2001:db8:3::9")

    appliance.sync({"2001:db8:2::/64": None})

    assert not first.can_connect(APPLIANCE_V6, SMTP)
    assert not second.can_connect(APPLIANCE_V6, SMTP)
    assert outsider.can_connect(APPLIANCE_V6, SMTP)


def test_drop_on_all_ports_silences_every_tcp_port(lab, gateway):
    """verdict DROP with all ports drops every TCP port, no port match."""
    appliance = Appliance(gateway, verdict="DROP", all_ports=True, ports=())
    spammer = lab.add_host("spammer", "198.51.100.7")

    appliance.sync({"198.51.100.0/24": None})

    assert not spammer.can_connect(APPLIANCE_V4, SMTP, timeout=1)
    assert not spammer.can_connect(APPLIANCE_V4, UNPROTECTED, timeout=1)
    rules = appliance.shell("iptables", "-S", "SENDER_FILTER")
    assert (
        "-A SENDER_FILTER -p tcp -m set --match-set sender_filter_v4 src -j DROP"
        in rules
    )


def test_chain_and_rule_show_in_iptables(appliance):
    """setup twice leaves one chain, one rule and one jump per family."""
    appliance.call("setup")
    appliance.call("setup")

    for tool, set_name in (
        ("iptables", "sender_filter_v4"),
        ("ip6tables", "sender_filter_v6"),
    ):
        rules = appliance.shell(tool, "-S").splitlines()
        input_rules = [line for line in rules if line.startswith("-A INPUT")]
        assert input_rules == ["-A INPUT -j SENDER_FILTER"]
        assert [line for line in rules if "SENDER_FILTER" in line] == [
            "-N SENDER_FILTER",
            "-A INPUT -j SENDER_FILTER",
            "-A SENDER_FILTER -p tcp -m multiport --dports 25,465,587 -m set "
            f"--match-set {set_name} src -j REJECT --reject-with tcp-reset",
        ]
    sets = appliance.shell("ipset", "save")
    assert "create sender_filter_v4 hash:net family inet " in sets
    assert "create sender_filter_v6 hash:net family inet6 " in sets
    assert sets.count("maxelem 262144 timeout 0") == 2


def test_jump_moved_below_another_rule_goes_back_to_the_top(appliance):
    """A rule put above the jump by hand is seen; the jump goes back to INPUT 1."""
    appliance.call("setup")
    appliance.shell("iptables", "-I", "INPUT", "1", "-p", "udp", "-j", "ACCEPT")

    appliance.sync({})

    rules = appliance.shell("iptables", "-S", "INPUT").splitlines()
    assert rules[1:] == ["-A INPUT -j SENDER_FILTER", "-A INPUT -p udp -j ACCEPT"]


def test_sync_applies_thousands_of_entries_in_one_batch(appliance):
    """5,000 entries go in with one ipset restore; a repeat sync changes nothing."""
    appliance.call("setup")
    desired = thousands_of_entries()

    change = appliance.sync(desired)

    assert appliance.ipset_calls("restore") == 1
    assert len(change["added"]) == len(desired) == 5000
    assert appliance.enforced() == set(desired)
    again = appliance.sync(desired)
    assert again["added"] == again["removed"] == again["retimed"] == []
    assert appliance.ipset_calls("restore") == 0


def test_enforced_equals_desired_after_sync(appliance):
    """enforced() reads back the desired entries; permanent ones hold timeout 0."""
    desired = {
        "192.0.2.7": 3600,
        "198.51.100.0/24": None,
        "2001:db8:2::/64": 600,
        "2001:db8:3::9": None,
    }

    appliance.sync(desired)

    assert appliance.enforced() == set(desired)
    saved = appliance.shell("ipset", "save")
    assert "add sender_filter_v4 198.51.100.0/24 timeout 0" in saved
    assert "add sender_filter_v6 2001:db8:3::9 timeout 0" in saved


def test_timeouts_beyond_kernel_maximum_are_capped_and_retimed(appliance):
    """A 30-day block is capped at the kernel maximum; permanent is a retime."""
    appliance.sync({"192.0.2.7": 60})

    change = appliance.sync({"192.0.2.7": 30 * 86400})

    assert change["retimed"] == ["192.0.2.7"]
    saved = appliance.shell("ipset", "save", "sender_filter_v4")
    timeout = int(saved.split("add sender_filter_v4 192.0.2.7 timeout ")[1].split()[0])
    assert KERNEL_MAX_TIMEOUT - 60 < timeout <= KERNEL_MAX_TIMEOUT
    assert appliance.sync({"192.0.2.7": None})["retimed"] == ["192.0.2.7"]
    assert "192.0.2.7 timeout 0" in appliance.shell("ipset", "save")


def test_set_flushed_by_hand_is_repaired_by_next_sync(lab, appliance):
    """`ipset flush` by hand is undone by the next sync."""
    spammer = lab.add_host("spammer", "198.51.100.7")
    desired = {"198.51.100.7": None, "2001:db8:2::/64": 3600}
    appliance.sync(desired)
    appliance.shell("ipset", "flush", "sender_filter_v4")
    assert spammer.can_connect(APPLIANCE_V4, SMTP)

    change = appliance.sync(desired)

    assert change["added"] == ["198.51.100.7"]
    assert appliance.enforced() == set(desired)
    assert not spammer.can_connect(APPLIANCE_V4, SMTP)


def test_chain_and_set_deleted_by_hand_are_repaired_by_next_sync(lab, appliance):
    """A deleted chain and destroyed set are rebuilt by the next sync."""
    spammer = lab.add_host("spammer", "198.51.100.7")
    appliance.sync({"198.51.100.7": None})
    for command in (
        "-D INPUT -j SENDER_FILTER",
        "-F SENDER_FILTER",
        "-X SENDER_FILTER",
    ):
        appliance.shell("iptables", *command.split())
    appliance.shell("ipset", "destroy", "sender_filter_v4")
    assert spammer.can_connect(APPLIANCE_V4, SMTP)

    appliance.sync({"198.51.100.7": None})

    assert not spammer.can_connect(APPLIANCE_V4, SMTP)
    assert "-A INPUT -j SENDER_FILTER" in appliance.shell("iptables", "-S")


def test_matches_is_true_in_sync_and_false_on_each_kind_of_drift(appliance):
    """The cheap reconcile check reads the headers of both sets and the rules."""
    desired = {"198.51.100.7": None, "192.0.2.0/28": 3600, "2001:db8:2::/64": None}
    appliance.sync(desired)

    in_sync = appliance.call("matches", 3)
    wrong_count = appliance.call("matches", 4)
    appliance.shell("ipset", "add", "sender_filter_v6", "2001:db8:9::/64")
    extra_entry = appliance.call("matches", 3)
    appliance.shell("ipset", "del", "sender_filter_v6", "2001:db8:9::/64")
    appliance.shell("ipset", "del", "sender_filter_v4", "198.51.100.7")
    missing_entry = appliance.call("matches", 3)
    appliance.sync(desired)
    appliance.shell("iptables", "-F", "SENDER_FILTER")
    rule_flushed = appliance.call("matches", 3)
    appliance.sync(desired)
    appliance.shell("ip6tables", "-D", "INPUT", "-j", "SENDER_FILTER")
    jump_deleted = appliance.call("matches", 3)
    appliance.sync(desired)
    in_sync_again = appliance.call("matches", 3)

    assert (in_sync, in_sync_again) == (True, True)
    assert appliance.commands[0] == ["ipset", "list", "-t"]
    assert appliance.ipset_calls("save") == 0
    assert [wrong_count, extra_entry, missing_entry] == [False, False, False]
    assert [rule_flushed, jump_deleted] == [False, False]


def test_apply_adds_and_removes_only_the_entries_given(appliance):
    """A new block's way to the kernel: one restore, no `ipset save` of the set."""
    appliance.sync({"198.51.100.7": None, "2001:db8:2::/64": None})

    change = appliance.call(
        "apply", {"192.0.2.9": 600, "2001:db8:3::/64": None}, ["198.51.100.7"]
    )

    assert (change["added"], change["removed"]) == (
        ["192.0.2.9", "2001:db8:3::/64"],
        ["198.51.100.7"],
    )
    assert sorted(change["enforced"]) == ["192.0.2.9", "2001:db8:3::/64"]
    assert (appliance.ipset_calls("save"), appliance.ipset_calls("restore")) == (0, 1)
    assert appliance.enforced() == {"192.0.2.9", "2001:db8:2::/64", "2001:db8:3::/64"}


def test_sync_without_the_rule_reports_its_entries_as_not_enforced(appliance):
    """An entry counts as enforced only while the rule using its set is in place."""
    appliance.sync({"198.51.100.7": None, "2001:db8:2::/64": None})
    appliance.shell("iptables", "-F", "SENDER_FILTER")

    flushed = appliance.call("enforced")
    appliance.shell("iptables", "-A", "SENDER_FILTER", "-j", "RETURN")
    replaced = appliance.call("enforced")

    assert flushed == ["2001:db8:2::/64"]
    assert replaced == ["2001:db8:2::/64"]


def test_established_connection_is_cut_when_sender_is_blocked(lab, appliance):
    """An open SMTP connection from a newly blocked sender is reset."""
    spammer = lab.add_host("spammer", "198.51.100.7")
    held = spammer.spawn_python(HELD_CONNECTION, APPLIANCE_V4, str(SMTP))

    appliance.sync({"198.51.100.7": None})

    assert wait_for_output(held, timeout=20) == "cut"
    assert any(argv[:2] == ["ss", "-K"] for argv in appliance.commands)


def test_rebuild_swaps_in_the_desired_state(appliance):
    """rebuild() swaps in fresh sets and leaves no spare set behind."""
    appliance.sync({"192.0.2.7": None, "2001:db8:2::/64": None})

    change = appliance.call(
        "rebuild", {"198.51.100.0/24": 3600, "2001:db8:2::/64": None}
    )

    assert change["added"] == ["198.51.100.0/24"]
    assert change["removed"] == ["192.0.2.7"]
    assert appliance.enforced() == {"198.51.100.0/24", "2001:db8:2::/64"}
    assert sorted(appliance.shell("ipset", "list", "-n").split()) == [
        "sender_filter_v4",
        "sender_filter_v6",
    ]


def test_teardown_removes_chain_and_sets(appliance):
    """teardown() leaves no chain, jump or set."""
    appliance.sync({"192.0.2.7": None})

    appliance.call("teardown")

    assert "SENDER_FILTER" not in appliance.shell("iptables", "-S")
    assert "SENDER_FILTER" not in appliance.shell("ip6tables", "-S")
    assert appliance.shell("ipset", "list", "-n") == ""


def test_dry_run_logs_what_it_would_do_and_keeps_entries(caplog):
    """Dry-run logs each would-be change and counts entries down in memory."""
    clock = FakeClock()
    backend = DryRunBackend(unused_settings(), clock=clock)
    caplog.set_level(logging.INFO, logger="enforcement.dryrun")

    backend.setup()
    backend.sync({"192.0.2.7": 3600, "198.51.100.0/24": None})

    assert backend.dry_run and backend.name == "dry-run"
    assert "DRY-RUN: would add 192.0.2.7 (timeout 3600s)" in caplog.messages
    assert "DRY-RUN: would add 198.51.100.0/24 (permanent)" in caplog.messages
    assert backend.enforced() == {"192.0.2.7", "198.51.100.0/24"}
    clock.now += 3600
    assert backend.enforced() == {"198.51.100.0/24"}
    assert backend.sync({}).removed == ["198.51.100.0/24"]
    assert "DRY-RUN: would remove 198.51.100.0/24" in caplog.messages


def test_plan_adds_removes_and_retimes():
    """plan() retimes only entries whose countdown is off by more than the slack."""
    held = {"192.0.2.7": 100, "192.0.2.8": None, "192.0.2.9": 50}

    change = plan(held, {"192.0.2.7": 103, "192.0.2.9": 500, "2001:db8:2::/64": 60})

    assert change.added == ["2001:db8:2::/64"]
    assert change.removed == ["192.0.2.8"]
    assert change.retimed == ["192.0.2.9"]
    assert change.timeouts == {"2001:db8:2::/64": 60, "192.0.2.9": 500}


def test_plan_skips_expired_and_unreadable_entries_and_caps_timeouts():
    """Expired and unreadable entries are left out; long timeouts are capped."""
    change = plan({}, {"192.0.2.7": 0, "192.0.2.300": 60, "192.0.2.8": 10**9})

    assert change.added == ["192.0.2.8"]
    assert change.timeouts == {"192.0.2.8": KERNEL_MAX_TIMEOUT}


def test_full_set_keeps_permanent_then_latest_ending_whatever_it_held():
    """fit() ranks the whole desired state; a set's history plays no part."""
    desired = {
        "192.0.2.10": 3600.4,
        "192.0.2.11": 3600.9,  # ends half a second later: same whole second
        "192.0.2.12": None,
        "192.0.2.13": 60.0,
        "192.0.2.14": 10.0**9,  # capped for the kernel, still ranked by its end
        "192.0.2.15": 10.0**9 - 1,
        "2001:db8:2::/64": 5.0,
    }

    kept, left_out = fit(desired, 4)

    assert kept == {
        "192.0.2.12": None,
        "192.0.2.14": KERNEL_MAX_TIMEOUT,
        "192.0.2.15": KERNEL_MAX_TIMEOUT,
        "192.0.2.11": 3601,
        "2001:db8:2::/64": 5,
    }
    assert left_out == ["192.0.2.10", "192.0.2.13"]
    assert fit(desired, 6) == (plan({}, desired).timeouts, [])


@pytest.mark.parametrize(
    ("text", "entry"),
    [
        ("192.0.2.7/32", "192.0.2.7"),
        ("198.51.100.0/24", "198.51.100.0/24"),
        ("2001:DB8:0:0:0:0:0:1/128", "2001:db8::1"),
        ("2001:db8:1:2:0::/64", "2001:db8:1:2::/64"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
    ],
)
def test_entry_text_gives_one_form_for_equal_entries(text, entry):
    """Equal networks written differently get one entry text."""
    assert entry_text(text) == entry


@pytest.mark.parametrize("text", ["192.0.2.9/24", "192.0.2.0/", "0.0.0.0/0", "mail"])
def test_entry_text_refuses_what_ipset_cannot_hold(text):
    """Host bits, empty prefixes, /0 and names are refused."""
    with pytest.raises(AddressError):
        entry_text(text)


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self):
        """Start at an arbitrary second."""
        self.now = 1000.0

    def __call__(self):
        """The current fake time."""
        return self.now


def unused_settings():
    """Settings with SPEC defaults and no file behind them."""
    return Settings(path="config.toml", database="unused.db")


def thousands_of_entries():
    """5,000 documentation-range entries: v4 hosts, v6 /64s, some permanent."""
    desired = {}
    for third in (2, 100):
        prefix = "192.0.2" if third == 2 else "198.51.100"
        for last in range(256):
            desired[f"{prefix}.{last}"] = None if last % 2 else 3600
    for number in range(5000 - len(desired)):
        network = ipaddress.ip_network(f"2001:db8:{number // 256:x}:{number:x}::/64")
        desired[sender_text(network)] = 600 + number
    return desired


def wait_for_output(process, timeout):
    """The last line a spawned process prints before it ends, within `timeout`."""
    try:
        output, _errors = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timed out"
    return output.strip().splitlines()[-1] if output.strip() else ""
