"""From log lines to counts: read, decode, profile, and persist as one step.

A source is one log as the administrator names it (`/var/log/mail.log`)
with its rotated files. Its read position (which file, by inode and content
fingerprint, and the offset in it), the files it read before, and the line
decoder's state are saved in the same transaction as the counts they
produced, so a crash or restart neither loses nor double-counts a line.
"""

import fcntl
import gc
import itertools
import json
import logging
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass

from tqdm import tqdm

from appliance.events import MailEvent
from appliance.models import Block
from appliance.models import SourceCounter
from appliance.models import SourcePosition
from appliance.models import SuspiciousEntry
from appliance.models import db
from appliance.profiler import Profiler
from appliance.sources.correlate import Correlator
from appliance.sources.follow import LogFile
from appliance.sources.follow import rotation_of

log = logging.getLogger(__name__)

BATCH_LINES = 5000
CATCH_UP_LINES = 10000
PART_LINES = 4000
PIPE_BYTES = 1 << 20
FILES_READ = "files-read:"
# what an ingest stopped half-way has done, and what to do about it
RESUME = "what was read before is counted, run it again to go on"
# compressed logs read as text would count as garbage: refused by name
OTHER_COMPRESSIONS = {
    ".xz": "xz",
    ".lzma": "lzma",
    ".bz2": "bzip2",
    ".zst": "zstd",
    ".lz4": "lz4",
    ".z": "compress",
    ".zip": "zip",
}


class LogsBusy(OSError):
    """Another process is reading logs into the same database."""


class ReadingFailed(OSError):
    """The process reading ahead stopped: what was committed before is kept."""

    def __str__(self):
        return f"{super().__str__()}; {RESUME}"


class ReaderLock:
    """Only one process at a time reads logs into a database (the daemon or ingest).

    Two readers would each count the lines of a log they both follow; the lock
    is an flock on a file beside the database, released when the process ends.
    """

    def __init__(self, settings, role):
        self.path = f"{settings.database}.reader.lock"
        self.role = role
        self.handle = None

    def acquire(self):
        """Take the lock or raise LogsBusy naming the process that holds it."""
        try:
            handle = open(self.path, "a+")
        except PermissionError:
            # another user made the file; a lock needs no write access
            handle = open(self.path)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise LogsBusy(
                f"{holder} is reading logs into this database; stop it first"
            ) from None
        if handle.writable():
            handle.truncate(0)
            handle.write(f"{self.role} (pid {os.getpid()})\n")
            handle.flush()
        self.handle = handle
        return self

    def release(self):
        """Let another process read."""
        if self.handle is not None:
            self.handle.close()
            self.handle = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *_exc):
        self.release()


def decoder_for(path, state):
    """The line decoder of a log: JSON lines for `*.jsonl`, else the mail-log one."""
    if path.endswith(".jsonl"):
        try:
            from appliance.sources.jsonlines import JsonLinesDecoder
        except ImportError:
            log.warning("%s: no JSON-lines decoder; reading it as a mail log", path)
        else:
            return JsonLinesDecoder.restore(state)
    return Correlator.restore(state)


class Source:
    """One log and its rotated files, read in order by one decoder.

    With `files` (oldest first) it catches up on exactly those files;
    without, it follows the path like `tail -F`.
    """

    def __init__(self, path, files=None):
        self.path = str(path)
        saved = SourcePosition.get_or_none(SourcePosition.path == self.path)
        state = json.loads(saved.state) if saved else {}
        self.known = self._files_read()
        self.file = LogFile(
            self.path,
            inode=saved.inode if saved else 0,
            offset=saved.offset if saved else 0,
            head=state.get("head", ""),
            known=self.known,
            files=files,
        )
        decoder_state = state.get("decoder", state.get("correlator", {}))
        self.decoder = decoder_for(self.path, decoder_state)
        self.counted_lines = self.decoder.lines
        self.counted_skipped = self.decoder.skipped

    def _files_read(self):
        """The (fingerprint, offset) of files read before, oldest first."""
        saved = SourcePosition.get_or_none(
            SourcePosition.path == FILES_READ + self.path
        )
        return json.loads(saved.state) if saved else []

    def snapshot(self):
        """Where reading stands after the lines decoded so far, ready to save."""
        inode, head, offset = self.file.position()
        state = {"head": head, "decoder": self.decoder.dump()}
        return Snapshot(
            inode=inode,
            offset=offset,
            state=json.dumps(state, separators=(",", ":")),
            known=[list(entry) for entry in self.file.known],
            lines=self.decoder.lines,
            skipped=self.decoder.skipped,
        )

    def save(self, snapshot):
        """Write a snapshot: position, decoder state, line counters (in a transaction).

        The files read before go to a row of their own, written when it changes.
        """
        SourcePosition.replace(
            path=self.path,
            inode=snapshot.inode,
            offset=snapshot.offset,
            state=snapshot.state,
            updated_at=time.time(),
        ).execute()
        if snapshot.known != self.known:
            self.known = snapshot.known
            SourcePosition.replace(
                path=FILES_READ + self.path,
                inode=0,
                offset=len(self.known),
                state=json.dumps(self.known, separators=(",", ":")),
                updated_at=time.time(),
            ).execute()
        lines = snapshot.lines - self.counted_lines
        skipped = snapshot.skipped - self.counted_skipped
        SourceCounter.insert(path=self.path, lines=lines, skipped=skipped).on_conflict(
            conflict_target=[SourceCounter.path],
            update={
                SourceCounter.lines: SourceCounter.lines + lines,
                SourceCounter.skipped: SourceCounter.skipped + skipped,
            },
        ).execute()
        self.counted_lines = snapshot.lines
        self.counted_skipped = snapshot.skipped

    def close(self):
        """Close the file being read."""
        self.file.close()


class Pipeline:
    """Feeds sources' lines through their decoders into the profiler."""

    def __init__(self, profiler):
        self.profiler = profiler

    def step(self, source, limit=BATCH_LINES):
        """Read up to `limit` lines of a source and commit them; returns lines read."""
        lines = source.file.lines(limit)
        if not lines:
            return 0
        events = source.decoder.feed_lines(lines)
        self.commit(source, (events,), source.snapshot)
        return len(lines)

    def commit(self, source, parts, snapshot):
        """Count a batch's events and save where its source stands, in one go.

        `parts` are the batch's events in lists, which may still be arriving
        while the first are counted; `snapshot` gives the source's position
        after them, asked for once they are all in.
        """
        process = self.profiler.process
        self.profiler.source = source.path
        with db.atomic():
            for events in parts:
                for event in events:
                    process(event)
            self.profiler.flush()
            source.save(snapshot())


@dataclass(slots=True)
class Snapshot:
    """A source after a batch: its read position and decoder, as saved."""

    inode: int
    offset: int
    state: str
    known: list
    lines: int
    skipped: int


@dataclass(slots=True)
class BatchEnd:
    """The last part of a batch read ahead: where the source stands after it."""

    lines: int
    events: list
    snapshot: Snapshot
    progress: tuple
    reading: list


class ReadAhead:
    """Reads and decodes a source in a child process, ahead of counting.

    Catching up is one long stream: on two or more cores, decoding goes on
    while the parent counts. A batch of `limit` lines, committed as one,
    arrives in parts of `part` lines, so the parent counts the first part
    while the child decodes the next one: neither waits for a whole batch at
    the start or the end. The batch's last part (a BatchEnd) carries the
    source's position and decoder state after it, which the parent saves with
    the batch's counts, so exactly-once holds as in `Pipeline.step`. The child
    touches no database; it stops when the parent goes away.
    """

    def __init__(self, source, limit=CATCH_UP_LINES, part=PART_LINES):
        context = multiprocessing.get_context("fork")
        self.receiving, sending = context.Pipe(duplex=False)
        _widen(sending)
        self.child = context.Process(
            target=_decode_ahead,
            args=(source, self.receiving, sending, limit, part),
            daemon=True,
        )
        self.child.start()
        sending.close()
        self.end = None

    def batches(self):
        """Each batch's parts as they arrive, until the source is read to its end.

        A batch's BatchEnd is `self.end` once its parts have been iterated.
        """
        while (first := self._receive()) is not None:
            yield self._parts(first)

    def _parts(self, message):
        """One batch's events, a part at a time, up to and including its end."""
        while not isinstance(message, BatchEnd):
            yield _mail_events(message)
            message = self._receive()
        self.end = message
        yield _mail_events(message.events)

    def _receive(self):
        """The child's next message: a part's events, a BatchEnd, or None at the end."""
        try:
            message = self.receiving.recv()
        except EOFError:
            raise ReadingFailed("the log reading process died") from None
        if isinstance(message, str):
            raise ReadingFailed(f"reading the log failed: {message}")
        return message

    def close(self):
        """Stop the child if it still runs."""
        self.receiving.close()
        if self.child.is_alive():
            self.child.terminate()
        self.child.join()


def _widen(sending):
    """Let the pipe hold several parts, so the child reads on while the parent commits.

    A part is larger than a pipe's default 64 KiB: the child would wait for
    the parent at every batch's commit. A system that refuses the size
    (fs.pipe-max-size, per-user limits) keeps the default, only slower.
    """
    try:
        fcntl.fcntl(sending.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    except OSError as exc:
        log.debug("pipe to the reading process left at its default size: %s", exc)


def _decode_ahead(source, receiving, sending, limit, part):
    """The child's loop: read a batch, decode it in parts; the last has its snapshot."""
    # the parent's end, inherited: kept open here, it would leave this process
    # blocked on a full pipe for ever (holding the reader lock) once the
    # parent is killed, where now its next send fails and it ends
    receiving.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # the objects inherited from the parent stay as they are: the collector
    # need not walk them (nor copy their pages, shared until written)
    gc.freeze()
    try:
        while lines := source.file.lines(limit):
            parts = [lines[at : at + part] for at in range(0, len(lines), part)]
            for some in parts[:-1]:
                sending.send(_plain(source.decoder.feed_lines(some)))
            end = BatchEnd(
                len(lines),
                _plain(source.decoder.feed_lines(parts[-1])),
                source.snapshot(),
                source.file.progress(),
                source.file.queued()[:1],
            )
            sending.send(end)
        sending.send(None)
    except BrokenPipeError:
        return
    except Exception as exc:  # reported to the parent, which stops with it
        log.exception("reading %s failed", source.path)
        sending.send(f"{type(exc).__name__}: {exc}")


def _plain(events):
    """MailEvents as plain tuples, which pickle several times faster."""
    return list(map(tuple, events))


def _mail_events(plain):
    """Plain tuples back into MailEvents, without a Python call for each."""
    return list(map(tuple.__new__, itertools.repeat(MailEvent), plain))


class LinesProgress:
    """A terminal progress bar in lines per second, its total estimated from bytes."""

    def __init__(self, label, enabled):
        self.bar = tqdm(desc=label, unit=" lines", unit_scale=True, disable=not enabled)

    def advance(self, lines, bytes_read, bytes_left, reading=()):
        """Count lines read; re-estimate the total lines from the bytes still left."""
        if self.bar.disable:
            return
        self.bar.update(lines)
        if bytes_read:
            self.bar.total = self.bar.n + int(bytes_left * self.bar.n / bytes_read)
        for path in reading:
            self.bar.set_postfix_str(os.path.basename(path), refresh=False)
        self.bar.refresh()

    def close(self):
        """Leave the bar's last state on the terminal."""
        if not self.bar.disable:
            self.bar.total = self.bar.n
            self.bar.refresh()
        self.bar.close()


def rotation_order(paths):
    """Files grouped by the log they were rotated from, each group oldest first."""
    groups = {}
    for path in paths:
        files = groups.setdefault(rotation_of(path)[0], [])
        if path not in files:
            files.append(path)
    for files in groups.values():
        files.sort(key=lambda path: rotation_of(path)[1])
    return groups


def read_files(settings, paths, progress=False):
    """Catch up on log files, rotated ones oldest first; returns what was done.

    Files rotated from one log (`mail.log.2.gz`, `mail.log.1`, `mail.log`)
    are one source, read in age order whatever order they are given in;
    content read before under this path (or a symlink to it, or rotated from
    it) is not read again.
    """
    files = []
    for path in paths:
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            raise FileNotFoundError(f"{path} is not a readable file")
        compression = os.path.splitext(path)[1].lower()
        if compression in OTHER_COMPRESSIONS:
            raise OSError(
                f"{path} is {OTHER_COMPRESSIONS[compression]}-compressed: only plain "
                "and .gz logs are read; decompress it first"
            )
        # a symlink or another spelling of the same path is the same source
        files.append(os.path.realpath(path))

    with ReaderLock(settings, "sender-filter ingest"):
        profiler = Profiler(settings)
        profiler.load()
        pipeline = Pipeline(profiler)
        blocks_before = Block.select().count()
        sources = [
            catch_up(pipeline, Source(path, files=group), progress)
            for path, group in rotation_order(files).items()
        ]

    return {
        "lines": sum(s["lines"] for s in sources),
        "skipped": sum(s["skipped"] for s in sources),
        "sources": sources,
        "blocks": Block.select().count() - blocks_before,
        "entries": SuspiciousEntry.select().count(),
    }


def catch_up(pipeline, source, progress):
    """Read one source's queued files to their end; returns its counts."""
    first_lines, first_skipped = source.counted_lines, source.counted_skipped
    files = source.file.queued()
    # the reading process starts before the progress bar's thread does
    ahead = ReadAhead(source)
    bar = LinesProgress(source.path, progress)
    try:
        for parts in ahead.batches():
            pipeline.commit(source, parts, lambda: ahead.end.snapshot)
            end = ahead.end
            bar.advance(end.lines, *end.progress, end.reading)
            # what the profiler holds after a batch (window events, histories)
            # lives long and forms no cycles: frozen, the collector's full
            # passes stop walking all of it (15% of this process's CPU)
            gc.freeze()
    finally:
        gc.unfreeze()
        ahead.close()
        bar.close()
        source.close()
    return {
        "path": source.path,
        "files": files,
        "lines": source.counted_lines - first_lines,
        "skipped": source.counted_skipped - first_skipped,
    }


def source_status():
    """Per source: lines read and not understood, and where reading stands."""
    positions = {p.path: p for p in SourcePosition.select()}
    status = []
    for counter in SourceCounter.select().order_by(SourceCounter.path):
        position = positions.get(counter.path)
        status.append(
            {
                "path": counter.path,
                "lines": counter.lines,
                "skipped": counter.skipped,
                "offset": position.offset if position else 0,
                "behind": _bytes_behind(counter.path, position),
                "updated_at": position.updated_at if position else None,
            }
        )
    return status


def _bytes_behind(path, position):
    """Bytes of the log file at `path` not read yet; None when it is another file."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    if position is None or status.st_ino != position.inode:
        return None
    return max(0, status.st_size - position.offset)
