"""The mail-log parser runs as setup.py compiles it (mypyc), the speed SPEC §9 asks."""

import importlib

from tests.conftest import compiled_modules
from tests.conftest import require


def test_the_parser_runs_compiled():
    built = {source.stem: path for source, path in compiled_modules()}
    require(
        "correlate" in built,
        "the mail-log parser is pure Python here: no C compiler or mypy "
        "(make system-packages, then make .venv/.compiled)",
    )

    for name, path in built.items():
        module = importlib.import_module(f"appliance.sources.{name}")
        # mypyc's modules name their file oddly (the package path twice): by name
        assert module.__file__.endswith(path.name)
    # the hot path and the readers it hands lines to, as setup.py lists them
    assert set(built) == {
        "correlate",
        "timestamps",
        "postfix",
        "logline",
        "scanners",
        "maillog",
    }
