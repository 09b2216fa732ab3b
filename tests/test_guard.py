"""The lock-out guard: what no rule, console click or command may block."""

import sys

import pytest
from netns import Lab

from appliance import cli
from tests.conftest import require_root_tools
from tests.conftest import write_config


@pytest.fixture
def appliance_host(tmp_path):
    """A namespace holding 192.0.2.1 and 2001:db8::1, with an initialised appliance."""
    require_root_tools("ip")
    config_path = write_config(tmp_path)
    assert cli.main(["init", "--config", str(config_path)]) == 0
    with Lab() as lab:
        yield lab.add_host("mx", "192.0.2.1", "2001:db8::1"), config_path


def block_inside(host, config_path, target):
    """`sender-filter block TARGET` run inside the appliance's namespace."""
    return host.run(
        sys.executable,
        "-m",
        "appliance.cli",
        "block",
        target,
        "--config",
        str(config_path),
        check=False,
    )


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("192.0.2.1", "192.0.2.1 covers the appliance's own address 192.0.2.1"),
        ("192.0.2.0/24", "192.0.2.0/24 covers the appliance's own address 192.0.2.1"),
        (
            "2001:db8::/64",
            "2001:db8::/64 covers the appliance's own address 2001:db8::1",
        ),
    ],
)
def test_own_addresses_found_on_the_interfaces_are_never_blocked(
    appliance_host, target, reason
):
    host, config_path = appliance_host

    result = block_inside(host, config_path, target)

    assert result.returncode == 2
    assert result.stderr.strip() == f"sender-filter block: {reason}"


def test_a_neighbour_on_the_same_link_can_be_blocked(appliance_host):
    host, config_path = appliance_host

    result = block_inside(host, config_path, "192.0.2.77")

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("192.0.2.77 blocked 1h")
