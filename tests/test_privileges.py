"""The privilege split: the daemon holds CAP_NET_ADMIN only, the console nothing.

`sender-filter run` is started in a lab namespace as the unprivileged user
`nobody` with `setpriv`, holding CAP_NET_ADMIN as its only (ambient)
capability, and must still get blocks into the kernel. The console runs as
`nobody` with no capability at all; its block request must reach the kernel
in under a second. Every database access in this test is made by those
unprivileged processes, so the files they share stay theirs.
"""

import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import pytest
from conftest import require
from conftest import require_root_tools
from netns import REPO
from netns import Lab

from tests.conftest import write_config

MX = "192.0.2.1"
SPAMMER = "198.51.100.7"
USER = "nobody"
CAP_NET_ADMIN = 1 << 12

# the console's part: log in, tick the spammer's entry, Block Permanently
CONSOLE = r"""
import json, os, re, sys, time
from appliance import addresses, config, models, service
from appliance.models import SuspiciousEntry
from web import create_app

settings = config.load(sys.argv[1])
models.connect(settings.database)
service.configure(settings)
password = service.add_admin("alice")
now = time.time()
entry = SuspiciousEntry.create(
    sender=sys.argv[2], sender_key=addresses.key_of(addresses.parse_ip(sys.argv[2])),
    threat_type="spam", first_seen=now - 60, last_seen=now, violations=3,
    messages=5, rate=60.0,
)
client = create_app(settings).test_client()
token = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', client.get("/login").text)
client.post("/login", data={"username": "alice", "password": password,
                            "csrf_token": token.group(1)})
page = client.get("/")
token = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', page.text).group(1)
clicked = time.time()
answer = client.post("/suspicious/block", data={
    "entry": str(entry.id), "action": "permanent", "csrf_token": token, "back": ""})
status = open("/proc/self/status").read()
caps = re.search(r"^CapEff:\s+(\S+)", status, re.M).group(1)
print(json.dumps({"clicked": clicked, "status": answer.status_code,
                  "caps": int(caps, 16), "uid": os.getuid()}))
"""


def python_for(user):
    """An interpreter `user` may run, and PYTHONPATH for the venv's packages.

    A venv built on an interpreter under /root (pyenv) is unreadable to other
    users; Debian's own python3 of the same version then runs the same code.
    """
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = sysconfig.get_paths()["purelib"]
    for candidate in (os.path.realpath(sys.executable), f"/usr/bin/{version}"):
        if Path(candidate).exists() and readable_by_all(candidate):
            return candidate, f"{REPO}:{site}"
    require(False, f"no {version} interpreter that {user} may run")


def readable_by_all(path):
    """Whether every directory above `path` is searchable and it is executable."""
    path = Path(path)
    if not os.stat(path).st_mode & 0o001:
        return False
    return all(os.stat(parent).st_mode & 0o001 for parent in path.parents)


def as_user(caps, *argv):
    """`setpriv` words that run argv as `nobody` holding exactly `caps`."""
    granted = ",".join(f"+{cap}" for cap in caps) or "-all"
    bounding = ",".join(["-all", *(f"+{cap}" for cap in caps)])
    return [
        "setpriv",
        f"--reuid={USER}",
        "--regid=nogroup",
        "--init-groups",
        f"--inh-caps={granted}" if caps else "--inh-caps=-all",
        f"--ambient-caps={granted}" if caps else "--ambient-caps=-all",
        f"--bounding-set={bounding}",
        "--no-new-privs",
        *argv,
    ]


@pytest.fixture
def shared_directory():
    """A directory `nobody` owns for the database; removed afterwards."""
    directory = Path(tempfile.mkdtemp(prefix="sf-privileges-", dir="/tmp"))
    directory.chmod(0o755)
    shutil.chown(directory, USER, "nogroup")
    yield directory
    shutil.rmtree(directory)


def test_daemon_with_only_net_admin_enforces_and_console_needs_nothing(
    shared_directory,
):
    require_root_tools("ip", "ipset", "iptables", "nft", "setpriv")
    python, path = python_for(USER)
    config_path = write_config(shared_directory, backend="kernel")
    shutil.chown(config_path, USER, "nogroup")
    env = ["env", f"PYTHONPATH={path}"]
    cli = [python, "-m", "appliance.cli"]

    with Lab() as lab:
        mx = lab.add_host("mx", MX)
        spammer = lab.add_host("spammer", SPAMMER)
        mx.listen(25)
        init = mx.run(
            *as_user([], *env, *cli, "init", "--config", str(config_path)),
            check=False,
        )
        assert init.returncode == 0, init.stderr
        # as the service's privileged ExecStartPre does (see docs/enforcement.md)
        setup = mx.run(
            *env,
            python,
            "-m",
            "enforcement",
            "setup",
            "--config",
            str(config_path),
            check=False,
        )
        assert setup.returncode == 0, setup.stderr
        log_path = shared_directory / "daemon.log"
        with open(log_path, "w") as output:
            daemon = mx.spawn_logged(
                output,
                *as_user(
                    ["net_admin"], *env, *cli, "run", "--config", str(config_path)
                ),
            )
        deadline = time.monotonic() + 15
        while "following" not in log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "following" in log_path.read_text(), log_path.read_text()
        daemon_status = Path(f"/proc/{daemon.pid}/status").read_text()

        console = mx.run(
            *as_user([], *env, python, "-c", CONSOLE, str(config_path), SPAMMER),
            check=False,
        )
        assert console.returncode == 0, console.stderr
        answer = json.loads(console.stdout)
        in_kernel = None
        while in_kernel is None and time.time() - answer["clicked"] < 5:
            test = mx.run("ipset", "test", "sender_filter_v4", SPAMMER, check=False)
            if test.returncode == 0:
                in_kernel = time.time()
        took = in_kernel - answer["clicked"] if in_kernel else None
        refused = not spammer.can_connect(MX, 25, timeout=1)
        rules = mx.run("iptables", "-S", "SENDER_FILTER").stdout
        print(f"console block in the kernel {took:.3f} s after the click")
        print(log_path.read_text()[-3000:])

    assert capability_line(daemon_status, "Uid") == "65534"
    assert int(capability_line(daemon_status, "CapEff"), 16) == CAP_NET_ADMIN
    assert int(capability_line(daemon_status, "CapBnd"), 16) == CAP_NET_ADMIN
    assert "enforcement: kernel" in log_path.read_text()
    assert " ERROR " not in log_path.read_text()
    assert (answer["status"], answer["caps"], answer["uid"]) == (302, 0, 65534)
    assert took is not None and took < 1.0
    assert refused
    assert "--match-set sender_filter_v4 src -j REJECT" in rules


def capability_line(status, key):
    """The first value of one `Key:` line of /proc/PID/status."""
    for line in status.splitlines():
        if line.startswith(f"{key}:"):
            return line.split()[1]
    return None


# read as `nobody`, so the database files stay theirs: each block's kernel
# status and the enforcement error the daemon published
STATUS = r"""
import json, sys
from appliance import config, models
from appliance.models import ApplianceState, Block
models.connect(config.load(sys.argv[1]).database)
error = ApplianceState.get_or_none(ApplianceState.key == "enforcement_error")
print(json.dumps({"blocks": {b.target: b.enforced for b in Block.select()},
                  "error": error.value if error else None}))
"""


def test_flushed_rule_asks_for_the_setup_step_and_shows_blocks_not_enforced(
    shared_directory,
):
    """Without CAP_NET_RAW the daemon cannot put the rule back: it asks for it.

    It writes the setup request file (on which the deployment's path unit
    runs the setup step as root); until then no block reads "in kernel"
    while the rule that uses the set is gone, new blocks included, and the
    error is published for the console. The test then does what that unit
    does: removes the request and runs `python -m enforcement setup`.
    """
    require_root_tools("ip", "ipset", "iptables", "nft", "setpriv")
    python, path = python_for(USER)
    request = shared_directory / "setup-wanted"
    config_path = write_config(
        shared_directory, f'setup_request = "{request.name}"\n', backend="kernel"
    )
    shutil.chown(config_path, USER, "nogroup")
    env = ["env", f"PYTHONPATH={path}"]
    cli = [python, "-m", "appliance.cli", "--config", str(config_path)]
    setup = [*env, python, "-m", "enforcement", "setup", "--config", str(config_path)]

    with Lab() as lab:
        mx = lab.add_host("mx", MX)
        spammer = lab.add_host("spammer", SPAMMER)
        mx.listen(25)

        def as_nobody(*argv, caps=()):
            return mx.run(*as_user(list(caps), *env, *argv), check=False)

        def status():
            return json.loads(as_nobody(python, "-c", STATUS, str(config_path)).stdout)

        def wait_for(condition, seconds):
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                seen = status()
                if condition(seen):
                    return seen
                time.sleep(0.2)
            return status()

        assert as_nobody(*cli, "init").returncode == 0
        assert mx.run(*setup, check=False).returncode == 0
        assert as_nobody(*cli, "block", SPAMMER, "--permanent").returncode == 0
        log_path = shared_directory / "daemon.log"
        with open(log_path, "w") as output:
            mx.spawn_logged(output, *as_user(["net_admin"], *env, *cli, "run"))
        before = wait_for(lambda seen: seen["blocks"][SPAMMER] is True, 15)

        mx.run("iptables", "-F", "SENDER_FILTER")
        flushed = wait_for(lambda seen: seen["blocks"][SPAMMER] is False, 5)
        assert as_nobody(*cli, "block", "198.51.100.8", "--permanent").returncode == 0
        newer = wait_for(lambda seen: seen["blocks"].get("198.51.100.8") is not None, 5)
        in_set = mx.run("ipset", "test", "sender_filter_v4", "198.51.100.8")
        connects = spammer.can_connect(MX, 25, timeout=1)
        asked = request.read_text() if request.exists() else None
        owner = request.owner() if request.exists() else None

        request.unlink(missing_ok=True)
        assert mx.run(*setup, check=False).returncode == 0
        mended = wait_for(lambda seen: all(seen["blocks"].values()), 5)
        refused = not spammer.can_connect(MX, 25, timeout=1)
        # a pass that read the rule missing during the setup may have asked
        # again; once mended, the next passes (every 2 s) ask no more
        request.unlink(missing_ok=True)
        time.sleep(2.5)
        asked_again = request.exists()
        print(log_path.read_text()[-3000:])

    assert before["blocks"] == {SPAMMER: True} and before["error"] == ""
    assert asked == flushed["error"] + "\n" and owner == USER
    assert f"asked for the privileged setup step: wrote {request}" in (
        log_path.read_text()
    )
    assert not asked_again
    assert flushed["blocks"] == {SPAMMER: False}
    assert flushed["error"].startswith(
        "IPv4 rule of chain SENDER_FILTER is missing and could not be put back"
    )
    assert "CAP_NET_RAW" in flushed["error"]
    assert newer["blocks"] == {SPAMMER: False, "198.51.100.8": False}
    assert in_set.returncode == 0 and connects
    assert mended == {"blocks": {SPAMMER: True, "198.51.100.8": True}, "error": ""}
    assert refused
