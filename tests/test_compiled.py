"""Ingest's parser and profiler run as setup.py compiles them (mypyc), for SPEC §9."""

import importlib

from tests.conftest import APPLIANCE
from tests.conftest import compiled_modules
from tests.conftest import require


def test_the_parser_and_profiler_run_compiled():
    built = {
        ".".join(source.relative_to(APPLIANCE.parent).with_suffix("").parts): path
        for source, path in compiled_modules()
    }
    require(
        "appliance.sources.correlate" in built,
        "the mail-log parser is pure Python here: no C compiler or mypy "
        "(make system-packages, then make .venv/.compiled)",
    )

    for name, path in built.items():
        module = importlib.import_module(name)
        # mypyc's modules name their file oddly (the package path twice): by name
        assert module.__file__.endswith(path.name)
    # the hot path, the readers it hands lines to and the profiler, as setup.py
    # lists them
    assert set(built) == {
        "appliance.sources.correlate",
        "appliance.sources.timestamps",
        "appliance.sources.postfix",
        "appliance.sources.logline",
        "appliance.sources.scanners",
        "appliance.sources.maillog",
        "appliance.profiler",
    }
