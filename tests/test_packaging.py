"""The wheel ships every file the console reads: pyproject.toml's package-data.

Building a wheel needs setuptools from PyPI in an isolated environment, so
this test reads the package-data globs instead and checks them against the
tree; `.venv/bin/pip wheel --no-deps -w DIR .` is the full check by hand.
"""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def package_data():
    """pyproject.toml's [tool.setuptools.package-data]: package -> globs."""
    with open(ROOT / "pyproject.toml", "rb") as file:
        project = tomllib.load(file)
    return project["tool"]["setuptools"]["package-data"]


def data_files(package):
    """Every file of a package that is not Python source, bytecode or a build of it.

    The mail-log modules mypyc compiles (setup.py) are built beside their
    sources: the wheel gets its own build of them.
    """
    directory = ROOT / package
    return {
        path.relative_to(directory).as_posix()
        for path in directory.rglob("*")
        if path.is_file()
        and path.suffix not in {".py", ".pyc", ".so"}
        and "__pycache__" not in path.parts
    }


def test_every_data_file_of_the_console_is_in_the_wheel():
    globs = package_data()["web"]
    shipped = {
        path.relative_to(ROOT / "web").as_posix()
        for pattern in globs
        for path in (ROOT / "web").glob(pattern)
        if path.is_file()
    }

    assert data_files("web") - shipped == set()
    # the files the console cannot run without, named so a move shows here
    assert {
        "openapi.json",
        "templates/base.html",
        "static/style.css",
        "static/vendor/chart.js/chart.umd.min.js",
    } <= shipped


def test_the_core_and_enforcement_have_no_data_files_to_ship():
    assert data_files("appliance") == set()
    assert data_files("enforcement") == set()
