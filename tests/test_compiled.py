"""Ingest's parser and profiler run as setup.py compiles them (mypyc), for SPEC §9."""

import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from appliance import config
from appliance import ingest
from appliance import loggen
from appliance import models
from appliance import profiler
from appliance import service
from appliance.config import THREAT_TYPES
from appliance.sources import correlate
from tests.conftest import APPLIANCE
from tests.conftest import CORPUS
from tests.conftest import compiled_modules
from tests.conftest import require
from tests.conftest import write_config
from tests.test_ground_truth import RULES_TOML


def require_compiled():
    """Skip (fail under CI=true) where the mail-log parser was not compiled."""
    require(
        any(source.name == "correlate.py" for source, _built in compiled_modules()),
        "the mail-log parser is pure Python here: no C compiler or mypy "
        "(make system-packages, then make .venv/.compiled)",
    )


def test_the_parser_and_profiler_run_compiled():
    built = {
        ".".join(source.relative_to(APPLIANCE.parent).with_suffix("").parts): path
        for source, path in compiled_modules()
    }
    require_compiled()

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


def decisions(log, corpus, workdir, now):
    """What the loaded build makes of `log` and the corpus, as plain JSON.

    Each file through one Correlator (the events, the lines not understood,
    the state left); then `log` ingested into a fresh database in a new
    directory `workdir`: the entries and blocks the profiler made. Run in this
    process and, by `decide_in_copy`, in one that loads another build.
    """
    parsed = {}
    for path in [log, *sorted(corpus.glob("*"))]:
        correlator = correlate.Correlator(now=lambda: now)
        with open(path, errors="surrogateescape") as lines:
            events = correlator.feed_lines(lines.readlines())
        state = correlator.dump()
        parsed[path.name] = [events, correlator.lines, correlator.skipped, state]

    workdir.mkdir()
    # the ground-truth thresholds: a generated log makes blocks of every type
    settings = config.load(write_config(workdir, RULES_TOML))
    models.connect(settings.database)
    try:
        service.configure(settings)
        service.seed_rules(settings)
        summary = ingest.read_files(settings, [str(log)])
        entries = models.SuspiciousEntry.select().order_by(models.SuspiciousEntry.id)
        blocks = models.Block.select().order_by(models.Block.id)
        profiled = {
            "counts": [summary[key] for key in ("lines", "skipped", "blocks")],
            "entries": list(entries.dicts()),
            # changed_at is when the row was written, by the wall clock
            "blocks": [block | {"changed_at": None} for block in blocks.dicts()],
        }
    finally:
        models.db.close()

    loaded = {module.__name__: module.__file__ for module in (correlate, profiler)}
    decided = {"loaded": loaded, "parsed": parsed, "profiled": profiled}
    return json.loads(json.dumps(decided))


def decide_in_copy(package_parent, log, workdir, now):
    """`decisions` in a new interpreter that loads the package in `package_parent`.

    The copy's directory is the working directory and comes first on
    PYTHONPATH, before this tree (which gives the tests package) and the venv's
    editable install of this tree.
    """
    program = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from tests.test_compiled import decisions\n"
        "log, corpus, workdir, now = sys.argv[1:]\n"
        "print(json.dumps(decisions(Path(log), Path(corpus), Path(workdir), "
        "float(now))))\n"
    )
    environment = os.environ | {
        "PYTHONPATH": os.pathsep.join([str(package_parent), str(APPLIANCE.parent)])
    }
    done = subprocess.run(
        [sys.executable, "-c", program, str(log), str(CORPUS), str(workdir), str(now)],
        cwd=package_parent,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_pure_python_decides_what_the_compiled_build_decides(tmp_path):
    require_compiled()
    require(CORPUS.exists(), f"no public corpus at {CORPUS}")
    copy = tmp_path / "pure" / "appliance"
    shutil.copytree(
        APPLIANCE, copy, ignore=shutil.ignore_patterns("*.so", "__pycache__")
    )
    log = tmp_path / "mail.log"
    now = time.time()
    loggen.generate(log, seed=7, hours=6, end=now - 60)

    pure = decide_in_copy(copy.parent, log, tmp_path / "pure-db", now)
    compiled = decisions(log, CORPUS, tmp_path / "compiled-db", now)

    for name, path in pure.pop("loaded").items():
        assert path.endswith(".py") and Path(path).is_relative_to(copy), name
    for name, path in compiled.pop("loaded").items():
        assert path.endswith(".so") and Path(path).is_relative_to(APPLIANCE), name
    # the comparison means something only if there was much to decide
    assert len(compiled["parsed"]) == 1 + len(list(CORPUS.glob("*")))
    assert len(compiled["parsed"][log.name][0]) > 1000
    blocks = compiled["profiled"]["blocks"]
    assert {block["threat_type"] for block in blocks} == set(THREAT_TYPES)
    assert pure == compiled
