"""`sender-filter run` holding the kernel to the database through what a gateway meets.

Each test builds a lab (tests/netns.py): an "mx" namespace where the daemon
runs with the kernel backend, and sender namespaces on the same bridge. The
database is written from the test process, as the console and the CLI do.
"""

import json
import re
import signal
import sys
import time

import pytest
from conftest import require_root_tools
from netns import Lab
from postfix_lab import PostfixInstance
from test_end_to_end import wait_until

from appliance import cli
from appliance import config
from appliance import models
from appliance import service
from appliance.models import Block
from tests.conftest import write_config

MX = "192.0.2.1"
MX6 = "2001:db8:1::1"
SPAMMER = "198.51.100.7"
SMTP = 25
RULES = """
[rules.spam]
window = 300
messages = 3
"""

# connects to SMTP, says EHLO, then prints when the server side cut it off
HELD_SESSION = r"""
import smtplib, socket, sys, time
session = smtplib.SMTP(sys.argv[1], int(sys.argv[2]), timeout=5)
session.ehlo("held.example.test")
print("ready", flush=True)
session.sock.settimeout(20)
try:
    data = session.sock.recv(100)
except ConnectionResetError:
    data = b""
except TimeoutError:
    print("alive", flush=True)
    sys.exit()
print(f"cut {time.time():.3f}" if data == b"" else "data", flush=True)
"""


class Gateway:
    """The mx namespace, its database and the daemon run in it."""

    def __init__(self, lab, tmp_path, settings, config_path):
        """An mx host on the lab's bridge; no daemon yet."""
        self.lab = lab
        self.tmp_path = tmp_path
        self.settings = settings
        self.config_path = config_path
        self.mx = lab.add_host("mx", MX, MX6)
        self.daemon = None
        self.log_path = tmp_path / "daemon.log"

    def start(self):
        """Spawn `sender-filter run` in the mx namespace; returns when it follows."""
        output = open(self.log_path, "a")
        self.daemon = self.mx.spawn_logged(
            output,
            sys.executable,
            "-m",
            "appliance.cli",
            "run",
            "--config",
            str(self.config_path),
        )
        output.close()
        assert wait_until(lambda: "following" in self.log(), 15), self.log()
        return self.daemon

    def log(self):
        """Everything the daemon has logged so far."""
        return self.log_path.read_text() if self.log_path.exists() else ""

    def entries(self):
        """The IPv4 and IPv6 set entries with their timeouts (0: permanent)."""
        saved = self.mx.run("ipset", "save").stdout
        return {
            entry: int(timeout)
            for entry, timeout in re.findall(
                r"^add \S+ (\S+) timeout (\d+)", saved, re.M
            )
        }


@pytest.fixture
def gateway(tmp_path, request):
    """The lab with the mx host and a fresh database; the daemon is stopped after.

    Parametrized indirectly, the parameter is more of the [enforcement] section.
    """
    require_root_tools("ip", "ipset", "iptables", "ip6tables", "ss", "conntrack")
    enforcement = getattr(request, "param", "")
    config_path = write_config(tmp_path, enforcement + RULES, backend="kernel")
    settings = config.load(config_path)
    models.connect(settings.database)
    service.configure(settings)
    service.seed_rules(settings)
    with Lab() as lab:
        host = Gateway(lab, tmp_path, settings, config_path)
        try:
            yield host
        finally:
            if host.daemon is not None and host.daemon.poll() is None:
                host.daemon.send_signal(signal.SIGTERM)
                host.daemon.wait(10)
            print("--- daemon log ---")
            print(host.log()[-4000:])
    models.db.close()


def refused(host, port=SMTP, timeout=0.5):
    """Whether a sender's connection to the mx is refused (reset or dropped)."""
    target = MX6 if ":" in host.addresses[0] else MX
    return not host.can_connect(target, port, timeout=timeout)


def blocked_spammer(gateway):
    """The daemon running, SPAMMER blocked for good and refused: (host, block)."""
    spammer = gateway.lab.add_host("spammer", SPAMMER)
    gateway.mx.listen(SMTP)
    gateway.start()
    block = service.block(SPAMMER, duration=None, actor="cli")
    assert wait_until(lambda: refused(spammer), 3)
    return spammer, block


def seconds_to_repair(spammer, *damage):
    """Run `damage` in the mx; seconds until the spammer is refused again (≤ 5)."""
    mx = spammer.lab.hosts["mx"]
    mx.run(*damage)
    damaged = time.monotonic()
    assert not refused(spammer), f"`{' '.join(damage)}` did not let the spammer in"
    if not wait_until(lambda: refused(spammer), 5):
        return None
    return time.monotonic() - damaged


def test_set_flushed_by_hand_is_repaired_within_5_seconds(gateway):
    spammer, block = blocked_spammer(gateway)

    took = seconds_to_repair(spammer, "ipset", "flush", gateway.settings.set_v4)

    print(f"flushed set repaired in {took:.2f} s")
    assert took is not None, "the flushed set was not repaired within 5 s"
    assert wait_until(
        lambda: "1 missing entries put back (198.51.100.7)" in gateway.log(), 2
    )
    status = Block.get_by_id(block.id)
    assert status.enforced is True
    assert status.enforced_checked_at is not None


def test_rule_deleted_by_hand_is_repaired_within_5_seconds(gateway):
    spammer, _block = blocked_spammer(gateway)
    rule = gateway.mx.run("iptables", "-S", "SENDER_FILTER").stdout.splitlines()[1]

    took = seconds_to_repair(
        spammer, "iptables", *rule.replace("-A ", "-D ", 1).split()
    )

    print(f"deleted rule repaired in {took:.2f} s")
    assert took is not None, "the deleted rule was not repaired within 5 s"
    expected = "IPv4 rule of chain SENDER_FILTER was missing and is back"
    assert expected in gateway.log()
    assert gateway.mx.run("iptables", "-S", "SENDER_FILTER").stdout.splitlines()[
        1:
    ] == [rule]


def test_extra_entry_added_by_hand_is_removed(gateway):
    gateway.start()
    gateway.mx.run("ipset", "add", gateway.settings.set_v4, "198.51.100.99")

    removed = wait_until(lambda: "198.51.100.99" not in gateway.entries(), 5)

    assert removed, gateway.entries()
    assert "1 extra entries removed (198.51.100.99)" in gateway.log()


def test_entry_swapped_for_another_by_hand_is_repaired_within_5_seconds(gateway):
    """The count stays the same, so only a full comparison finds it."""
    spammer, _block = blocked_spammer(gateway)
    name = gateway.settings.set_v4
    swap = f"del {name} {SPAMMER}\nadd {name} 198.51.100.99 timeout 0\n"

    took = seconds_to_repair(spammer, "sh", "-c", f"printf '{swap}' | ipset restore")

    print(f"swapped entry repaired in {took:.2f} s")
    assert took is not None, "the swapped entry was not repaired within 5 s"
    assert wait_until(lambda: "198.51.100.99" not in gateway.entries(), 2)
    assert gateway.entries() == {SPAMMER: 0}


def test_temporary_block_ends_on_time_with_the_daemon_killed(gateway):
    spammer = gateway.lab.add_host("spammer", SPAMMER)
    gateway.mx.listen(SMTP)
    daemon = gateway.start()
    block = service.block(SPAMMER, duration=4, actor="cli")
    assert wait_until(lambda: refused(spammer), 3)

    daemon.send_signal(signal.SIGKILL)
    daemon.wait(5)
    assert refused(spammer, timeout=0.3)
    ended = wait_until(lambda: not refused(spammer, timeout=0.3), 8)
    late = time.time() - block.expires_at

    print(f"kernel lifted the block {late:+.2f} s from its end, no daemon running")
    assert ended, "the kernel never lifted the block"
    assert -0.5 <= late <= 1.5
    assert gateway.entries() == {}


def test_reboot_restores_active_blocks_within_2_seconds(gateway):
    now = time.time()
    service.block(SPAMMER, duration=None, actor="cli")
    service.block("198.51.100.8", duration=3600, actor="cli")
    service.block("2001:db8:2::/64", duration=None, actor="cli")
    expired = service.block("198.51.100.9", duration=60, actor="cli")
    Block.update(created_at=now - 7200, expires_at=now - 3600).where(
        Block.id == expired.id
    ).execute()
    service.block("198.51.100.10", duration=None, actor="cli")
    service.unblock("198.51.100.10", actor="cli")
    assert gateway.entries() == {}

    started = time.monotonic()
    gateway.start()
    wanted = {SPAMMER, "198.51.100.8", "2001:db8:2::/64"}
    back = wait_until(lambda: set(gateway.entries()) == wanted, 5, step=0.02)
    took = time.monotonic() - started

    print(f"active blocks back {took:.2f} s after the daemon was started")
    assert back, gateway.entries()
    entries = gateway.entries()
    assert entries[SPAMMER] == entries["2001:db8:2::/64"] == 0
    assert 3590 <= entries["198.51.100.8"] <= 3600
    assert took < 2.0


def test_open_smtp_session_is_cut_within_1_second_of_the_block(gateway):
    require_root_tools("postfix")
    spammer = gateway.lab.add_host("spammer", SPAMMER)
    postfix = PostfixInstance(gateway.mx.name, gateway.tmp_path / "pf", [MX]).start()
    try:
        gateway.start()
        held = spammer.spawn_python(HELD_SESSION, MX, str(SMTP))

        blocked_at = time.time()
        service.block(SPAMMER, duration=3600, actor="admin:alice")
        output, _errors = held.communicate(timeout=25)
    finally:
        postfix.stop()

    last = output.strip().splitlines()[-1]
    assert last.startswith("cut "), output
    took = float(last.split()[1]) - blocked_at
    print(f"open SMTP session cut {took:.3f} s after the block was written")
    assert took < 1.0


def test_ipv6_sender_is_blocked_per_64(gateway):
    first = gateway.lab.add_host("first", ipv6="2001:db8:2::7")
    neighbour = gateway.lab.add_host("neighbour", ipv6="2001:db8:2::8")
    outsider = gateway.lab.add_host("outsider", ipv6="2001:db8:3::9")
    gateway.mx.listen(SMTP)
    gateway.start()
    spool = gateway.settings.database.parent / "events.jsonl"
    now = time.time()
    events = [
        {"time": now + i, "ip": "2001:db8:2::7", "message": True, "verdicts": ["spam"]}
        for i in range(5)
    ]

    with open(spool, "a") as file:
        file.writelines(json.dumps(event) + "\n" for event in events)

    assert wait_until(lambda: refused(first, timeout=0.3), 5)
    block = Block.get(Block.created_by == "rule:spam")
    assert block.target == "2001:db8:2::/64"
    assert refused(neighbour)
    assert not refused(outsider)
    assert set(gateway.entries()) == {"2001:db8:2::/64"}


def test_block_of_an_address_that_became_our_own_is_left_out_of_the_kernel(gateway):
    block = service.block("192.0.2.77", duration=None, actor="cli")
    other = service.block("198.51.100.9", duration=None, actor="cli")
    gateway.mx.run("ip", "addr", "add", "192.0.2.77/32", "dev", "eth0")

    gateway.start()

    assert wait_until(lambda: Block.get_by_id(block.id).enforced is False, 5)
    assert set(gateway.entries()) == {"198.51.100.9"}
    assert Block.get_by_id(other.id).enforced is True
    assert gateway.log().count("192.0.2.77 (block #1) left out of the kernel") == 1
    assert (
        "it covers the appliance's own address 192.0.2.77, which the guard "
        "refuses now" in gateway.log()
    )


def enforced_entries():
    """The targets of the active blocks the database records as in the kernel."""
    rows = Block.select(Block.target).where(
        Block.lifted_at.is_null() & (Block.enforced == True)  # noqa: E712
    )
    return {row.target for row in rows}


@pytest.mark.parametrize("gateway", ["set_size = 1024\n"], indirect=True)
def test_full_set_holds_the_same_blocks_running_and_restarted(gateway, capsys):
    # 1,030 temporary blocks whose ends are not in the order they are made
    ends = {n: 3600 + 10 * (n * 7919 % 1030) for n in range(1030)}
    temporary = {f"2001:db8:a:{n + 1:x}::/64": ends[n] for n in range(1030)}
    permanent = [f"2001:db8:b:{n + 1:x}::/64" for n in range(10)]
    soonest = sorted(temporary, key=temporary.get)
    gateway.start()

    for target, duration in temporary.items():
        service.block(target, duration=duration, actor="api:test")
    held_before = wait_until(lambda: set(gateway.entries()) == set(soonest[6:]), 10)
    for target in permanent:
        service.block(target, duration=None, actor="api:test")
    wanted = set(permanent) | set(soonest[16:])
    held_running = wait_until(lambda: set(gateway.entries()) == wanted, 10)
    recorded_running = wait_until(lambda: enforced_entries() == wanted, 5)
    assert cli.main(["blocks", "--json", "--config", str(gateway.config_path)]) == 0
    listed = json.loads(capsys.readouterr().out)

    gateway.daemon.send_signal(signal.SIGTERM)
    gateway.daemon.wait(10)
    gateway.mx.run("ipset", "flush", gateway.settings.set_v6)
    gateway.start()
    held_restarted = wait_until(lambda: set(gateway.entries()) == wanted, 10)

    assert held_before, len(gateway.entries())
    assert held_running, sorted(set(gateway.entries()) ^ wanted)
    assert recorded_running, sorted(enforced_entries() ^ wanted)
    assert held_restarted
    assert enforced_entries() == wanted
    left_out = {b["target"] for b in listed["blocks"] if b["kernel"] == "NOT in kernel"}
    assert left_out == set(soonest[:16])
    error = "16 blocks NOT enforced: the kernel sets are full"
    assert listed["enforcement"]["error"] == error
    assert "kernel sets full (maxelem 1024): 16 blocks NOT enforced" in gateway.log()
