"""From log lines to counts: read, correlate, profile, and persist as one step.

The read position and the correlator's state are saved in the same
transaction as the counts they produced, so a crash or restart neither
loses nor double-counts a line.
"""

import json
import logging
import os

from tqdm import tqdm

from appliance.models import Block
from appliance.models import SourceCounter
from appliance.models import SourcePosition
from appliance.models import SuspiciousEntry
from appliance.models import db
from appliance.profiler import Profiler
from appliance.sources.correlate import Correlator
from appliance.sources.follow import LogFile

log = logging.getLogger(__name__)

BATCH_LINES = 5000


class Source:
    """One followed log file with its own correlator."""

    def __init__(self, path):
        self.path = str(path)
        saved = SourcePosition.get_or_none(SourcePosition.path == self.path)
        state = json.loads(saved.state) if saved else {}
        self.file = LogFile(
            self.path,
            inode=saved.inode if saved else 0,
            offset=saved.offset if saved else 0,
            head=state.get("head", ""),
        )
        self.correlator = Correlator.restore(state.get("correlator", {}))
        self.counted_lines = self.correlator.lines
        self.counted_skipped = self.correlator.skipped

    def save(self):
        """Write the position, correlator state and line counters (in a transaction)."""
        inode, head = self.file.identity()
        state = {"head": head, "correlator": self.correlator.dump()}
        SourcePosition.replace(
            path=self.path,
            inode=inode,
            offset=self.file.offset,
            state=json.dumps(state, separators=(",", ":")),
        ).execute()
        lines = self.correlator.lines - self.counted_lines
        skipped = self.correlator.skipped - self.counted_skipped
        SourceCounter.insert(path=self.path, lines=lines, skipped=skipped).on_conflict(
            conflict_target=[SourceCounter.path],
            update={
                SourceCounter.lines: SourceCounter.lines + lines,
                SourceCounter.skipped: SourceCounter.skipped + skipped,
            },
        ).execute()
        self.counted_lines = self.correlator.lines
        self.counted_skipped = self.correlator.skipped


class Pipeline:
    """Feeds sources' lines through their correlators into the profiler."""

    def __init__(self, profiler):
        self.profiler = profiler

    def step(self, source, limit=BATCH_LINES):
        """Read up to `limit` lines of a source and commit them; returns lines read."""
        lines = source.file.lines(limit)
        if not lines:
            return 0

        with db.atomic():
            for text, _offset in lines:
                for event in source.correlator.feed(text):
                    self.profiler.process(event)
            self.profiler.flush()
            source.save()
        return len(lines)


def read_files(settings, paths, progress=False):
    """Catch up on files to their end; returns what was read and decided."""
    profiler = Profiler(settings)
    profiler.load()
    pipeline = Pipeline(profiler)
    blocks_before = Block.select().count()
    lines = skipped = 0

    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is not a readable file")
        source = Source(path)
        first_lines, first_skipped = source.counted_lines, source.counted_skipped
        total = source.file.size()
        with tqdm(
            total=total,
            initial=source.file.offset,
            unit="B",
            unit_scale=True,
            desc=str(path),
            disable=not progress,
        ) as bar:
            while pipeline.step(source):
                bar.update(source.file.offset - bar.n)
        lines += source.correlator.lines - first_lines
        skipped += source.correlator.skipped - first_skipped
        source.file.close()

    return {
        "lines": lines,
        "skipped": skipped,
        "blocks": Block.select().count() - blocks_before,
        "entries": SuspiciousEntry.select().count(),
    }
