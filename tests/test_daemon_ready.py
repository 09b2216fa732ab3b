"""`sender-filter run` tells systemd when it is ready (a `Type=notify` unit).

The deployment orders Postfix after the daemon, so mail is accepted only once
the blocks are back in the kernel (the daemon's first pass, before it loads
its windows and schedules the temporary blocks); systemd learns that from one
`READY=1`
datagram on $NOTIFY_SOCKET. Here the test itself listens on that socket, a
path or an abstract name, as systemd would.
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import write_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_daemon_says_ready_once_the_blocks_are_back(tmp_path, abstract):
    config_path = write_config(tmp_path)
    subprocess.run(
        [sys.executable, "-m", "appliance.cli", "init", "--config", str(config_path)],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    name = f"@sf-ready-test-{os.getpid()}" if abstract else str(tmp_path / "notify")
    address = "\0" + name[1:] if abstract else name
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(address)
    listener.settimeout(30)
    log_path = tmp_path / "daemon.log"
    with open(log_path, "w") as output:
        daemon = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "appliance.cli",
                "run",
                "--config",
                str(config_path),
            ],
            cwd=ROOT,
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, "NOTIFY_SOCKET": name},
        )
    try:
        message = listener.recv(64)
        deadline = time.monotonic() + 30
        while "following" not in log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        said = log_path.read_text()
    finally:
        daemon.terminate()
        daemon.wait(10)
        listener.close()

    assert message == b"READY=1"
    assert "following" in said and "enforcement: dry-run" in said
    assert daemon.returncode == 0
