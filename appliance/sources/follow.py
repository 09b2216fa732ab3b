"""Read a log and its rotated files in order, from where reading last stopped.

A file is known by its content, not its name: the fingerprint of its first
bytes (up to HEAD_BYTES, never past what was read) and the offset read so
far. So `mail.log` renamed to `mail.log.1`, copied there before a truncation,
or compressed to `mail.log.2.gz` is recognised and read on from that offset,
never again from its start. Offsets in a `.gz` file count decompressed bytes.

A damaged `.gz` is read up to the damage and left with a warning; a line
longer than LINE_BYTES is passed over, handed out as one stand-in line that
no decoder understands.
"""

import gzip
import hashlib
import io
import logging
import os
import re
import struct
import time
import zlib

log = logging.getLogger(__name__)

HEAD_BYTES = 256
READ_BYTES = 1 << 20
# the longest line read; no smaller than READ_BYTES, so a line within one
# chunk is never too long and a longer one is always seen across chunks
LINE_BYTES = 1 << 20
LONG_LINE = f"(a line longer than {LINE_BYTES} bytes, passed over)"
KNOWN_FILES = 1000
# what reading a damaged `.gz` raises (gzip.BadGzipFile is an OSError)
DAMAGE = (EOFError, OSError, zlib.error)
ROTATION_GRACE = 0.5
ROTATED_NAME = re.compile(
    r"(?P<base>.+?)(?:\.(?P<number>\d+)|-(?P<date>\d{8}))?(?P<gz>\.gz)?"
)


def fingerprint(head):
    """`N:sha1` of a file's first N bytes, or "" when nothing was read."""
    return f"{len(head)}:{hashlib.sha1(head).hexdigest()}" if head else ""


def rotation_of(path):
    """(the log a rotated file comes from, its age rank; older ranks sort first)."""
    directory, name = os.path.split(path)
    match = ROTATED_NAME.fullmatch(name)
    base = os.path.join(directory, match["base"])
    if match["date"]:
        return base, (0, int(match["date"]), 0)
    if match["number"]:
        return base, (1, -int(match["number"]), 0)
    return base, (2, 0, 0 if match["gz"] else 1)


def rotated_files(path):
    """The rotated files of a log path in its directory, oldest first."""
    directory, name = os.path.split(path)
    try:
        names = os.listdir(directory or ".")
    except OSError:
        return []
    found = [
        os.path.join(directory, other)
        for other in names
        if other != name
        and other.startswith(name)
        and rotation_of(os.path.join(directory, other))[0] == path
    ]
    return sorted(found, key=lambda other: rotation_of(other)[1])


def _changed_since(path, moment):
    """Whether a file changed after `moment` (epoch ns), allowing coarse file times."""
    try:
        return os.stat(path).st_mtime_ns >= moment - 1_000_000_000
    except OSError:
        return False


class OpenedLog:
    """One log file open for reading (decompressed when it ends in `.gz`)."""

    def __init__(self, path, live=False):
        self.path = path
        self.raw = open(path, "rb")
        status = os.fstat(self.raw.fileno())
        self.identity = (status.st_dev, status.st_ino)
        self.opened_at = time.time_ns()
        self.compressed = path.endswith(".gz")
        self.stream = self.raw
        if self.compressed:
            self.stream = gzip.GzipFile(fileobj=self.raw)
        self.live = live
        self.settled = self.compressed
        self.offset = 0
        self.consumed = 0
        self.seen = b""
        self.held = b""
        # bytes of a line too long passed over so far; None outside one
        self.passing = None
        self.damage = ""
        self.heads = {}

    def first_bytes(self, length):
        """The first `length` bytes of the content, without moving the reader."""
        if length <= 0:
            return b""
        if length in self.heads:
            return self.heads[length]
        if self.compressed:
            start = os.pread(self.raw.fileno(), 65536, 0)
            try:
                head = gzip.GzipFile(fileobj=io.BytesIO(start)).read(length)
            except DAMAGE:
                head = b""
        else:
            head = os.pread(self.raw.fileno(), length, 0)
        if len(head) == length:
            self.heads[length] = head
        return head

    def matches(self, head):
        """Whether this file's content starts as the saved fingerprint says."""
        if not head:
            return False
        length = int(head.split(":", 1)[0])
        return fingerprint(self.first_bytes(length)) == head

    def start_at(self, offset):
        """Go to an offset already read (a line boundary), at most the file's end."""
        if not self.compressed:
            offset = min(offset, self.size())
        if offset:
            self._content(self.stream.seek, offset)
        # a `.gz` damaged before `offset` stays read to there: nothing more is read
        self.offset = offset if self.damage else self.stream.tell()
        self.held = b""
        self.passing = None
        self.seen = self.first_bytes(min(HEAD_BYTES, self.offset))

    def head(self):
        """The fingerprint of the first bytes read: saved with the offset."""
        return fingerprint(self.seen)

    def size(self):
        """The size of the file on disk."""
        return os.fstat(self.raw.fileno()).st_size

    def content_size(self):
        """The size of the content; for `.gz` the one its trailer gives."""
        size = self.size()
        if not self.compressed or size < 18:
            return size
        return struct.unpack("<I", os.pread(self.raw.fileno(), 4, size - 4))[0]

    def truncated(self):
        """None, or how the file changed under the lines read so far.

        "rewritten": its first bytes are not the ones read (copy-truncate);
        "cut": the same start, but shorter than what was read (a writer took
        back a failed write).
        """
        # Limitation: lines written and truncated away before one line of the
        # file was read leave nothing to know their copy by; they are not read.
        if self.compressed or not self.seen:
            return None
        if os.pread(self.raw.fileno(), len(self.seen), 0) != self.seen:
            return "rewritten"
        return "cut" if self.size() < self.offset else None

    def read(self, limit, final=False):
        """Up to `limit` complete lines, as text without their line ends.

        A line still being written is left for the next read (kept, not
        counted in `offset`), unless `final`: the file is done with, and an
        unterminated last line is taken as it is. A `.gz` file is complete,
        up to its damage if it is damaged (a line torn there is not taken).
        Bytes are read in chunks and held back past the last line handed
        out, so reading never seeks back (costly in a `.gz` file). A line
        longer than LINE_BYTES ends the lines handed out before it; the next
        read passes over it.
        """
        if self.passing is not None:
            return self._pass_long_line(final)
        chunks = [self.held]
        newlines = self.held.count(b"\n")
        unended = len(self.held) - 1 - self.held.rfind(b"\n")
        while newlines < limit:
            more = self._more()
            if not more:
                break
            first_end = more.find(b"\n")
            if unended + (len(more) if first_end < 0 else first_end) > LINE_BYTES:
                # the bytes of the long line read so far are let go of
                self.passing = unended
                break
            chunks.append(more)
            if first_end < 0:
                unended += len(more)
            else:
                newlines += more.count(b"\n")
                unended = len(more) - 1 - more.rfind(b"\n")
        data = b"".join(chunks)
        if newlines >= limit:
            taken = _end_of_line(data, limit, newlines)
        elif self.passing is not None or not self._whole(final):
            taken = len(data) - unended
        else:
            taken = len(data)
        self.held = data[taken:] if self.passing is None else more
        if not taken:
            return [] if self.passing is None else self._pass_long_line(final)
        if len(self.seen) < HEAD_BYTES:
            self.seen += data[: min(taken, HEAD_BYTES - len(self.seen))]
        self.offset += taken
        self.consumed += taken
        # decoded through a view and split as it is: no copy of the batch's bytes
        # or text (several times faster than decoding a slice)
        text = str(memoryview(data)[:taken], "utf-8", "replace")
        lines = text.split("\n")
        if text.endswith("\n"):
            lines.pop()
        return lines

    def _pass_long_line(self, final):
        """Read past the line longer than LINE_BYTES at `offset`, holding none of it.

        It is handed out as one stand-in line, LONG_LINE, which no decoder
        understands: counted once as a line not understood. [] while its end
        is still to be written.
        """
        more = self.held or self._more()
        self.held = b""
        while (end := more.find(b"\n")) < 0 and more:
            self.passing += len(more)
            more = self._more()
        if end < 0 and not self._whole(final):
            return []
        # the line's bytes without its line end, then with it (what was read)
        text_length = self.passing + max(end, 0)
        length = self.passing + end + 1
        self.held = more[end + 1 :]
        self.passing = None
        log.warning(
            "%s: the line at byte %d is %d bytes long, over %d; "
            "counted as a line not understood",
            self.path,
            self.offset,
            text_length,
            LINE_BYTES,
        )
        self.offset += length
        self.consumed += length
        if len(self.seen) < HEAD_BYTES:
            self.seen = self.first_bytes(min(HEAD_BYTES, self.offset))
        return [LONG_LINE]

    def _whole(self, final):
        """Whether the content read is complete: an unterminated last line is taken."""
        return (final or self.compressed) and not self.damage

    def _more(self):
        """The next chunk of the content; b"" at its end or where a `.gz` is damaged.

        A `.gz` is read a decompressed block at a time (read1): a read of
        more would lose the bytes it had when it meets the damage.
        """
        read = self.stream.read1 if self.compressed else self.stream.read
        return self._content(read, READ_BYTES)

    def _content(self, action, *args):
        """`action(*args)` on the content; b"" once a `.gz` met damage (kept)."""
        if not self.compressed:
            return action(*args)
        if self.damage:
            return b""
        try:
            return action(*args)
        except DAMAGE as exc:
            self.damage = str(exc) or type(exc).__name__
            return b""

    def close(self):
        """Close the file."""
        self.stream.close()
        self.raw.close()


def _end_of_line(data, number, newlines):
    """The offset just past the `number`th line end of `data`, which has `newlines`.

    The line ends past it are few (read in the last chunk): found from the end.
    """
    end = len(data)
    for _ in range(newlines - number + 1):
        end = data.rfind(b"\n", 0, end)
    return end + 1


def open_log(path, live=False):
    """The file at `path` opened for reading, or None when it cannot be."""
    try:
        return OpenedLog(path, live)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("%s cannot be read: %s", path, exc)
        return None


class LogFile:
    """A log path read in order through its rotations, from a saved position.

    Following (no `files`), it works like `tail -F`: a renamed file is read
    to its end (and for ROTATION_GRACE seconds more, for a writer that has not
    reopened yet) before the new one; a file truncated under us is read on
    from its rotated copy when one holds our offset; a missing path is waited
    for. After a restart, files rotated meanwhile are read from the saved
    position on. Catching up (`files`, oldest first), each is read to its end.
    """

    def __init__(
        self, path, inode=0, offset=0, head="", known=(), files=None, grace=None
    ):
        self.path = path
        self.known = [list(entry) for entry in known]
        if head and offset:
            self.known.append([head, offset])
        self.following = files is None
        self.pending = [opened for opened in map(open_log, files or ()) if opened]
        self.grace = ROTATION_GRACE if grace is None else grace
        self.planned = not self.following
        self.current = None
        self.quiet_since = 0.0
        self.bytes_read = 0
        self.waiting = False

    def lines(self, limit):
        """Up to `limit` complete lines of one file, as text without line ends."""
        if not self.planned:
            self._plan()
        while True:
            if self.current is None and not self._open_next():
                return []
            read = self._read(limit)
            if read is None:
                continue
            if not read:
                if not self._moved_on():
                    return []
                final = self.following or self.current.path != self.path
                read = self.current.read(limit, final=final)
                if not read:
                    self._leave()
                    continue
            self.quiet_since = time.monotonic()
            return read

    def _plan(self):
        """After a start, queue the files rotated since the saved position."""
        self.planned = True
        if not self.known:
            return
        head, offset = self.known[-1]
        candidate = open_log(self.path)
        if candidate is not None:
            found = candidate.matches(head)
            candidate.close()
            if found:
                return
        rotated, index = self._find_rotated(None, head)
        if index is None:
            log.warning(
                "%s: the file read up to byte %d is gone; reading %s from its start",
                self.path,
                offset,
                self.path,
            )
            return
        self.pending = self._open_all(rotated[index:])
        log.info("%s was rotated; reading on in %s first", self.path, rotated[index])

    def _open_all(self, paths):
        """Open files to read next: held open, later renames do not matter."""
        return [opened for opened in map(open_log, paths) if opened is not None]

    def _find_rotated(self, identity, head):
        """(rotated files oldest first, index of the one with this identity or head)."""
        rotated = rotated_files(self.path)
        for index in range(len(rotated) - 1, -1, -1):
            try:
                status = os.stat(rotated[index])
            except OSError:
                continue
            if (status.st_dev, status.st_ino) == identity:
                return rotated, index
        for index in range(len(rotated) - 1, -1, -1):
            candidate = open_log(rotated[index])
            if candidate is None:
                continue
            found = candidate.matches(head)
            candidate.close()
            if found:
                return rotated, index
        return rotated, None

    def _open_next(self):
        """Open the next file: a queued rotated one, else the path itself."""
        if self.pending:
            self._start(self.pending.pop(0))
            return True
        if not self.following:
            return False
        opened = open_log(self.path, live=True)
        if opened is None:
            if not self.waiting:
                log.info("%s does not exist yet; waiting for it", self.path)
            self.waiting = True
            return False
        self.waiting = False
        self._start(opened)
        return True

    def _start(self, opened):
        """Make a file current, from the offset its content was read to (if any)."""
        offset = 0
        for index in range(len(self.known) - 1, -1, -1):
            head, saved = self.known[index]
            if opened.matches(head):
                del self.known[index]
                offset = saved
                break
        opened.start_at(offset)
        if opened.offset < offset:
            log.warning(
                "%s is shorter than the %d bytes read from it before; "
                "reading on from its end",
                opened.path,
                offset,
            )
        elif offset >= opened.content_size():
            log.debug("%s was read to its end before", opened.path)
        elif offset:
            log.info("%s: reading on from byte %d", opened.path, offset)
        self.current = opened
        self.quiet_since = time.monotonic()

    def _read(self, limit):
        """Lines of the current file; None when it changed under us and was reset."""
        current = self.current
        if not (self.following and current.live):
            return current.read(limit)
        seen, offset = current.seen, current.offset
        change = current.truncated()
        if change is None:
            read = current.read(limit)
            change = current.truncated()
            if change is None:
                return read
        if change == "rewritten":
            self._after_truncation(seen, offset)
            return None
        if current.size() < offset:
            log.warning(
                "%s was cut to %d bytes, before byte %d already read",
                self.path,
                current.size(),
                offset,
            )
        current.start_at(offset)
        return None

    def _after_truncation(self, seen, offset):
        """The path was truncated (copy-truncate): read on in its copy if found."""
        head = fingerprint(seen)
        self._close_current()
        if head:
            self._remember(head, offset)
        rotated, index = self._find_rotated(None, head)
        if index is not None:
            self.pending = self._open_all(rotated[index : index + 1])
            for copy in self.pending:
                copy.settled = True
            log.info("%s was truncated; reading on in its copy", self.path)
            return
        log.warning(
            "%s was truncated and no rotated copy holds it past byte %d; "
            "reading the new content from its start",
            self.path,
            offset,
        )

    def _moved_on(self):
        """At the end of the current file: whether to leave it for the next one."""
        if not self.following or self.pending or self.current.settled:
            return True
        try:
            status = os.stat(self.path)
        except OSError:
            return False
        if (status.st_dev, status.st_ino) == self.current.identity:
            return False
        if time.monotonic() - self.quiet_since < self.grace:
            return False
        log.info("%s was rotated; following the new file", self.path)
        return True

    def _leave(self):
        """Done with the current file: remember it, and queue the ones rotated after.

        A damaged `.gz` is remembered as read up to its damage: read again,
        it gives nothing more (and is reported again).

        The file we leave may have been rotated again since (mail.log.1 is
        mail.log.2 now): the rotated files newer than it come before the path.
        """
        current = self.current
        head = current.head()
        if head:
            self._remember(head, current.offset)
        if current.damage:
            log.warning(
                "%s is damaged (%s): read up to byte %d of its content, the rest left",
                current.path,
                current.damage,
                current.offset,
            )
        self._close_current()
        if self.following and not self.pending:
            rotated, index = self._find_rotated(current.identity, head)
            if index is None:
                rotated = [p for p in rotated if _changed_since(p, current.opened_at)]
                index = -1
            self.pending = self._open_all(rotated[index + 1 :])

    def _close_current(self):
        """Close the file being read, keeping the count of bytes read from it."""
        self.bytes_read += self.current.consumed
        self.current.close()
        self.current = None

    def _remember(self, head, offset):
        """Add a file's (fingerprint, offset) to the files known, newest last."""
        self.known.append([head, offset])
        del self.known[:-KNOWN_FILES]

    def position(self):
        """(inode, fingerprint, offset) of the file being read, to save."""
        if self.current is None:
            return 0, "", 0
        current = self.current
        return current.identity[1], current.head(), current.offset

    def progress(self):
        """(bytes read so far, bytes still to read in the files queued)."""
        read = self.bytes_read
        left = sum(opened.content_size() for opened in self.pending)
        if self.current is not None:
            read += self.current.consumed
            left += max(0, self.current.content_size() - self.current.offset)
        return read, left

    def queued(self):
        """The paths of the files still to read, the current one first."""
        files = [self.current] if self.current is not None else []
        return [opened.path for opened in files + self.pending]

    def close(self):
        """Close the file being read and the ones queued."""
        if self.current is not None:
            self._close_current()
        for opened in self.pending:
            opened.close()
        self.pending = []
