"""One iptables view: the rules that act are the ones `iptables -S` and nft show.

The kernel evaluates the legacy xtables tables and the nf_tables chains on the
same hooks, so a rule hidden in the backend the administrator's `iptables`
does not show would still act. These tests run the backend in a lab namespace
and read every view an administrator may use.
"""

from conftest import require_root_tools
from test_enforcement import APPLIANCE_V4
from test_enforcement import SMTP
from test_enforcement import Appliance
from test_enforcement import gateway as gateway  # noqa: F401 (the fixture)
from test_enforcement import lab as lab  # noqa: F401 (the fixture)
from test_privileges import python_for

RULE_V4 = (
    "-A SENDER_FILTER -p tcp -m multiport --dports 25,465,587 "
    "-m set --match-set sender_filter_v4 src -j REJECT --reject-with tcp-reset"
)


def test_iptables_and_nft_show_the_rule_that_acts_and_legacy_holds_nothing(
    lab, gateway
):
    # the nft driver, whatever this host's `iptables` alternative points at
    # (Debian 12's default is the nft one, which `iptables-nft` always is)
    require_root_tools("nft", "iptables-nft", "iptables-legacy")
    appliance = Appliance(gateway, iptables="nft")
    spammer = lab.add_host("spammer", "198.51.100.7")

    appliance.sync({"198.51.100.7": None})

    assert not spammer.can_connect(APPLIANCE_V4, SMTP)
    shown = appliance.shell("iptables-nft", "-S").splitlines()
    assert shown[3:] == ["-N SENDER_FILTER", "-A INPUT -j SENDER_FILTER", RULE_V4]
    ruleset = appliance.shell("nft", "list", "ruleset")
    assert "jump SENDER_FILTER" in ruleset
    assert "tcp dport { 25, 465, 587 } xt match set" in ruleset
    assert "reject with tcp reset" in ruleset
    # nothing hides in the tables the default `iptables` does not show
    assert "SENDER_FILTER" not in appliance.shell("iptables-legacy-save")
    assert "SENDER_FILTER" not in appliance.shell("ip6tables-legacy-save")


def test_legacy_setting_drives_python_iptables_on_the_legacy_tables(lab, gateway):
    require_root_tools("iptables-legacy", "ip6tables-legacy")
    appliance = Appliance(gateway, iptables="legacy")
    spammer = lab.add_host("spammer", "198.51.100.7")

    appliance.sync({"198.51.100.7": None})
    appliance.call("setup")

    assert not spammer.can_connect(APPLIANCE_V4, SMTP)
    shown = appliance.shell("iptables-legacy", "-S").splitlines()
    assert shown[3:] == ["-N SENDER_FILTER", "-A INPUT -j SENDER_FILTER", RULE_V4]
    assert "SENDER_FILTER" not in appliance.shell("iptables-nft-save")
    appliance.call("teardown")
    assert "SENDER_FILTER" not in appliance.shell("iptables-legacy-save")


def test_unprivileged_check_reads_the_rule_through_nft(gateway):
    """Without CAP_NET_RAW the rule's shape is still checked with `nft list`."""
    require_root_tools("nft", "setpriv")
    appliance = Appliance(gateway)
    appliance.call("setup")
    probe = (
        "from pathlib import Path\n"
        "from appliance.config import Settings\n"
        "from enforcement.kernel import KernelBackend\n"
        "backend = KernelBackend(Settings(path=Path('c'), database=Path('d')))\n"
        "print(backend.driver.in_place(4), backend.driver.in_place(6))\n"
    )
    unprivileged = [
        "setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
        "--inh-caps=+net_admin", "--ambient-caps=+net_admin",
    ]  # fmt: skip

    before = appliance.shell(*unprivileged, *python_command(probe)).split()
    appliance.shell("iptables", "-F", "SENDER_FILTER")
    after = appliance.shell(*unprivileged, *python_command(probe)).split()

    assert before == ["True", "True"]
    assert after == ["False", "True"]


def python_command(code):
    """An interpreter `nobody` may run, with the repo and venv on its path."""
    python, path = python_for("nobody")
    return ["env", f"PYTHONPATH={path}", python, "-c", code]
