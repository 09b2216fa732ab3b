"""The whole job with real parts: Postfix log → Suspicious IP page → kernel block.

A lab of network namespaces: Debian's Postfix in an "mx" namespace logging to a
file, `sender-filter run` in the same namespace following that file and
driving its ipset and iptables, and swaks in three sender namespaces.
"""

import re
import sys
import time

import pytest
from netns import Lab
from postfix_lab import PostfixInstance
from postfix_lab import swaks

from appliance import config
from appliance import models
from appliance import service
from appliance.models import Block
from appliance.models import SuspiciousEntry
from tests.conftest import require_root_tools
from tests.conftest import write_config
from web import create_app

MX = "192.0.2.1"
MX6 = "2001:db8::1"
HARVESTER = "192.0.2.10"
CLEAN = "198.51.100.20"
LIGHT = "192.0.2.30"
BLOCK_SECONDS = 8

RULES = f"""
[logs]
files = ["postfix/mail.log"]
[rules.dha]
window = 300
messages = 3
recipients = 3
unknown_recipients = 2
duration = {BLOCK_SECONDS}
"""


def wait_until(check, timeout, step=0.1):
    """Poll `check` until it returns something true; the value, or None on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(step)
    return None


@pytest.fixture
def gateway(tmp_path):
    """The lab, Postfix and the daemon, all removed afterwards."""
    require_root_tools("ip", "ipset", "iptables", "postfix", "swaks")
    config_path = write_config(tmp_path, RULES, backend="kernel")
    settings = config.load(config_path)
    models.connect(settings.database)
    service.configure(settings)
    service.seed_rules(settings)
    password = service.add_admin("alice")

    with Lab() as lab:
        mx = lab.add_host("mx", MX, MX6)
        senders = {
            ip: lab.add_host(name, ip)
            for name, ip in (("harvest", HARVESTER), ("clean", CLEAN), ("light", LIGHT))
        }
        postfix = PostfixInstance(mx.name, tmp_path / "postfix", [MX, MX6]).start()
        daemon_log = open(tmp_path / "daemon.log", "w")
        daemon = mx.spawn_logged(
            daemon_log,
            sys.executable,
            "-m",
            "appliance.cli",
            "run",
            "--config",
            str(config_path),
        )
        try:
            assert wait_until(
                lambda: "following" in (tmp_path / "daemon.log").read_text(), 15
            ), (tmp_path / "daemon.log").read_text()
            yield {
                "settings": settings,
                "password": password,
                "mx": mx,
                "senders": senders,
                "postfix": postfix,
                "daemon": daemon,
                "daemon_log": tmp_path / "daemon.log",
            }
        finally:
            daemon.terminate()
            daemon.wait(10)
            daemon_log.close()
            postfix.stop()
            print("--- daemon log ---")
            print((tmp_path / "daemon.log").read_text()[-4000:])


def connects(host, port=25):
    """Whether a sender's TCP connection to the gateway's SMTP port succeeds."""
    return host.can_connect(MX, port, timeout=1.5)


def test_harvester_blocked_clean_sender_not_and_admin_blocks_light_sender(gateway):
    senders = gateway["senders"]
    harvester, clean, light = senders[HARVESTER], senders[CLEAN], senders[LIGHT]
    assert connects(harvester) and connects(clean) and connects(light)

    # 1. the harvester probes unknown recipients until the DHA rule fires
    started = time.monotonic()
    attempts = 0
    for attempts in range(1, 11):
        result = swaks(
            harvester.name,
            MX,
            to=[f"nobody{attempts}a@example.test", f"nobody{attempts}b@example.test"],
            timeout=10,
        )
        if result.returncode != 24:
            break
        if wait_until(lambda: not connects(harvester), 0.5, step=0.1):
            break
    blocked = wait_until(lambda: not connects(harvester), 3)
    took = time.monotonic() - started
    print(f"harvester refused after {attempts} probing transactions, {took:.1f} s")
    assert blocked, "the harvester was never refused"
    assert 4 <= attempts <= 6

    block = Block.get(Block.target == HARVESTER)
    assert (block.threat_type, block.action, block.created_by) == (
        "dha",
        "temporary",
        "rule:dha",
    )
    assert block.expires_at - block.created_at == BLOCK_SECONDS
    sets = gateway["mx"].run("ipset", "list", gateway["settings"].set_v4).stdout
    assert re.search(rf"^{re.escape(HARVESTER)} timeout \d+$", sets, re.M), sets
    rules = gateway["mx"].run("iptables", "-S", "SENDER_FILTER").stdout
    assert "--match-set sender_filter_v4 src" in rules

    # 2. a second sender still gets through, and its mail is accepted
    assert connects(clean)
    assert swaks(clean.name, MX, to=["alice@example.test"]).returncode == 0

    # 3. the temporary block ends on time: the harvester connects again
    ended = wait_until(lambda: connects(harvester), BLOCK_SECONDS + 10, step=0.5)
    assert ended, "the temporary block never ended"
    print(
        f"harvester connects again {time.time() - block.created_at:.1f} s after block"
    )
    lifted = wait_until(
        lambda: Block.get_by_id(block.id).lift_reason == "expired", 5, step=0.2
    )
    assert lifted, "the scheduler did not record the end of the block"
    assert Block.get_by_id(block.id).lifted_at == block.expires_at

    # 4. a light sender stays under the threshold: suspicious, not blocked
    assert swaks(light.name, MX, to=["ghost@example.test"]).returncode == 24
    entry = wait_until(
        lambda: SuspiciousEntry.get_or_none(SuspiciousEntry.sender == LIGHT), 5
    )
    assert entry is not None
    assert (entry.threat_type, entry.violations, entry.messages, entry.status) == (
        "dha",
        1,
        1,
        "suspicious",
    )
    assert connects(light)

    # 5. the administrator ticks it on the Suspicious IP page and blocks it for good
    app = create_app(gateway["settings"])
    client = app.test_client()
    login = client.get("/login")
    token = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', login.text).group(1)
    response = client.post(
        "/login",
        data={
            "username": "alice",
            "password": gateway["password"],
            "csrf_token": token,
        },
    )
    assert response.status_code == 302
    page = client.get(f"/?ip={LIGHT}&type=dha")
    assert page.status_code == 200
    assert f">{LIGHT}<" in page.text
    token = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', page.text).group(1)
    clicked = time.monotonic()
    response = client.post(
        "/suspicious/block",
        data={
            "entry": str(entry.id),
            "action": "permanent",
            "csrf_token": token,
            "back": f"ip={LIGHT}&type=dha",
        },
        follow_redirects=True,
    )
    assert response.status_code == 200
    assert f"{LIGHT}" in response.text and "blocked" in response.text
    manual = Block.get(Block.target == LIGHT)
    assert (manual.action, manual.expires_at, manual.created_by) == (
        "permanent",
        None,
        "admin:alice",
    )
    refused = wait_until(lambda: not connects(light), 5)
    print(f"light sender refused {time.monotonic() - clicked:.2f} s after the click")
    assert refused, "the console's block never reached the kernel"
    assert connects(clean)
