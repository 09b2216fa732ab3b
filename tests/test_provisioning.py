"""The playbook and the Vagrantfile: lint, syntax, and the config they write.

ansible-lint (production profile), `ansible-playbook --syntax-check` and
`vagrant validate` run on every CI run; each skips with the reason when its
tool is missing outside CI, and fails under CI=true.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jinja2
import yaml

from appliance import config
from tests.conftest import require

REPO = Path(__file__).resolve().parents[1]
ROLE = REPO / "provisioning/roles/sender_filter"
TOOLS = Path(sys.executable).parent


def tool(name):
    """A command from this venv (ansible-core, ansible-lint) or from PATH."""
    beside = TOOLS / name
    found = str(beside) if beside.exists() else shutil.which(name)
    require(found is not None, f"needs {name} (make test installs it)")
    return found


def run(argv, tmp_path, **env):
    """Run a tool in the checkout with its caches under tmp_path."""
    return subprocess.run(
        argv,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HOME": str(tmp_path), **env},
    )


def test_ansible_lint_production_profile_passes(tmp_path):
    result = run([tool("ansible-lint"), "--nocolor", "provisioning/"], tmp_path)

    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Profile 'production' was required, and it passed" in output


def test_playbook_syntax_check_passes(tmp_path):
    inventory = tmp_path / "inventory"
    inventory.write_text("[mail_gateways]\ngateway ansible_connection=local\n")

    result = run(
        [
            tool("ansible-playbook"),
            "--syntax-check",
            "-i",
            str(inventory),
            "provisioning/site.yml",
        ],
        tmp_path,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "playbook: provisioning/site.yml" in result.stdout


def test_vagrantfile_validates(tmp_path):
    vagrant = shutil.which("vagrant")
    require(vagrant is not None, "needs Debian's vagrant (make system-packages)")

    result = run(
        [vagrant, "validate"],
        tmp_path,
        VAGRANT_CHECKPOINT_DISABLE="1",
        VAGRANT_HOME=str(tmp_path / "vagrant.d"),
        VAGRANT_DOTFILE_PATH=str(tmp_path / "dot-vagrant"),
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "Vagrantfile validated successfully." in result.stdout


def render_config(**overrides):
    """config.toml.j2 rendered with the role's defaults and `overrides`."""
    values = yaml.safe_load((ROLE / "defaults/main.yml").read_text())
    values.update(overrides, ansible_managed="managed by Ansible")
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(ROLE / "templates"),
        trim_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    environment.filters["to_json"] = json.dumps
    # defaults made of other defaults, as Ansible renders them (facts aside)
    for name, value in values.items():
        if isinstance(value, str) and "{{ sender_filter_" in value:
            values[name] = environment.from_string(value).render(values)
    return environment.get_template("config.toml.j2").render(values)


def test_config_template_with_defaults_is_read_by_the_appliance(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(render_config())

    settings = config.load(path)

    assert settings.database == Path("/var/lib/sender-filter/sender-filter.db")
    assert settings.log_files == ("/var/log/postfix.log",)
    assert settings.secret_key_file == Path("/etc/sender-filter/secret_key")
    assert settings.enforcement == "kernel"
    assert settings.ports == (25, 465, 587)
    assert settings.iptables == "nft"
    assert settings.setup_request == Path(
        "/var/lib/sender-filter/enforcement-setup-wanted"
    )
    assert settings.rule_defaults("dha") == config.RuleDefaults()


def test_config_template_carries_rules_and_all_ports(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(
        render_config(
            sender_filter_enforcement_ports="all",
            sender_filter_own_addresses=["192.0.2.2"],
            sender_filter_rules={
                "dha": {"messages": 10, "unknown_recipients": 3},
                "virus": {"action": "permanent", "enabled": False},
            },
        )
    )

    settings = config.load(path)

    assert settings.all_ports is True
    assert settings.own_addresses == ("192.0.2.2",)
    assert settings.rule_defaults("dha").messages == 10
    assert settings.rule_defaults("dha").unknown_recipients == 3
    assert settings.rule_defaults("dha").recipients == 10
    assert settings.rule_defaults("virus").action == "permanent"
    assert settings.rule_defaults("virus").enabled is False


def test_every_role_default_is_prefixed_and_commented():
    lines = (ROLE / "defaults/main.yml").read_text().splitlines()
    names = []

    for number, text in enumerate(lines):
        match = re.match(r"([a-z_]+):", text)
        if not match:
            continue
        names.append(match.group(1))
        above = number - 1
        while above >= 0 and re.match(r"[a-z_]+:", lines[above]):
            above -= 1  # one comment may describe a pair of defaults
        assert lines[above].startswith("#"), f"{match.group(1)} has no comment"

    assert names, "no defaults found"
    assert all(name.startswith("sender_filter_") for name in names), names
