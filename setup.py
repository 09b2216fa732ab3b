"""Compile the ingest hot path with mypyc where a C compiler is at hand.

Everything else about the package is in pyproject.toml. The modules below,
the mail-log parser and the profiler it feeds, are plain Python that mypyc
compiles to C extensions (one shared library, `appliance/hot__mypyc`, and a
small module per source file). When mypyc or a working compiler with
Python's headers (Debian: gcc, python3-dev) is missing, or
SENDER_FILTER_PURE=1 is set, the package installs as pure Python, which
counts the same, slower. A type error in these modules stops the build: it
is a mistake in the code, not in the machine.
"""

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

# the mail-log parser, then the profiler that counts its events
HOT_PATH = [
    "appliance/sources/correlate.py",
    "appliance/sources/timestamps.py",
    "appliance/sources/postfix.py",
    "appliance/sources/logline.py",
    "appliance/sources/scanners.py",
    "appliance/sources/maillog.py",
    "appliance/profiler.py",
]


class OptionalBuildExt(build_ext):
    """build_ext that leaves the package pure Python when compiling fails.

    All or nothing: extensions are copied in only after all of them built, so
    a failure leaves no shim that would import a missing shared library.
    """

    def run(self):
        try:
            super().run()
        except Exception as error:  # any failure: pure Python
            print(
                f"mypyc build failed, installing pure Python: {error}", file=sys.stderr
            )
            self.extensions = []


def compiled():
    """The mypyc extensions, or none when mypyc is absent or not wanted."""
    if os.environ.get("SENDER_FILTER_PURE") == "1":
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        print("mypyc not installed: installing pure Python", file=sys.stderr)
        return []
    return mypycify(HOT_PATH, opt_level="3", group_name="appliance.hot")


setup(ext_modules=compiled(), cmdclass={"build_ext": OptionalBuildExt})
