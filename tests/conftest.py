"""Shared fixtures: a temporary appliance, and the guard for real-part tests."""

import os
import shutil
from pathlib import Path

import pytest

from appliance import config
from appliance import models
from appliance import service

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "public"
IN_CI = os.environ.get("CI") == "true"
APPLIANCE = Path(__file__).resolve().parents[1] / "appliance"


def compiled_modules():
    """(source, compiled file) of each module mypyc built beside its source."""
    pairs = []
    for built in sorted([*APPLIANCE.glob("*.so"), *APPLIANCE.glob("sources/*.so")]):
        source = built.with_name(built.name.split(".")[0] + ".py")
        if source.exists():
            pairs.append((source, built))
    return pairs


def pytest_sessionstart(session):
    """Stop at once when a compiled module is older than its source.

    Python would import the stale build and the tests would check old code.
    """
    stale = [
        source.name
        for source, built in compiled_modules()
        if source.stat().st_mtime > built.stat().st_mtime
    ]
    if stale:
        pytest.exit(
            f"{', '.join(stale)} changed since compiled: run `make .venv/.compiled`",
            returncode=4,
        )


def require(condition, reason):
    """Skip when a real part is missing; under CI=true fail instead."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(reason)


def require_root_tools(*tools):
    """Root and the named programs, as the kernel and Postfix tests need."""
    require(os.geteuid() == 0, "needs root for network namespaces (run as root)")
    for tool in tools:
        require(shutil.which(tool) is not None, f"needs {tool} (make system-packages)")


def write_config(directory, extra="", backend="dry-run"):
    """A config file for a throwaway appliance under `directory`."""
    path = Path(directory) / "config.toml"
    path.write_text(
        '[database]\npath = "sender-filter.db"\n'
        '[web]\nsecret_key_file = "secret_key"\n'
        f'[enforcement]\nbackend = "{backend}"\n' + extra
    )
    return path


@pytest.fixture
def make_settings(tmp_path):
    """Build settings from extra TOML and connect a fresh database."""

    def build(extra=""):
        settings = config.load(write_config(tmp_path, extra))
        models.connect(settings.database)
        service.configure(settings)
        service.seed_rules(settings)
        return settings

    yield build
    if not isinstance(models.db.obj, type(None)):
        models.db.close()


@pytest.fixture
def settings(make_settings):
    """Settings with SPEC defaults and an empty database."""
    return make_settings()
