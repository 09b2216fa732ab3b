"""Read a log file from a saved position, following it like `tail -F`."""

import hashlib
import logging
import os

log = logging.getLogger(__name__)

FINGERPRINT_BYTES = 256


def fingerprint(path, length=FINGERPRINT_BYTES):
    """`N:hash` of a file's first N bytes: tells a new file from the one we read."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(length)
    except OSError:
        return ""
    return f"{len(head)}:{hashlib.sha1(head).hexdigest()}" if head else ""


def same_file(saved, path):
    """Whether `path` still starts with the bytes the saved fingerprint hashed."""
    if not saved:
        return True
    length = int(saved.split(":", 1)[0])
    return fingerprint(path, length) == saved


class LogFile:
    """One log path: its open handle, the position read so far, and rotation."""

    def __init__(self, path, inode=0, offset=0, head=""):
        self.path = path
        self.inode = inode
        self.offset = offset
        self.head = head
        self.handle = None
        self.partial = b""

    def _open(self):
        """Open the path; on another file than the saved one, start at 0."""
        try:
            handle = open(self.path, "rb")
        except OSError:
            return False
        stat = os.fstat(handle.fileno())
        same = stat.st_ino == self.inode and same_file(self.head, self.path)
        if not same or stat.st_size < self.offset:
            if self.inode:
                log.info("%s is a new file; reading it from the start", self.path)
            self.offset = 0
        self.inode = stat.st_ino
        handle.seek(self.offset)
        self.handle = handle
        self.partial = b""
        return True

    def lines(self, limit):
        """Up to `limit` complete lines as (text, offset after the line)."""
        if self.handle is None and not self._open():
            return []
        read = []
        while len(read) < limit:
            raw = self.handle.readline()
            if not raw:
                break
            if not raw.endswith(b"\n"):
                self.partial += raw
                break
            raw = self.partial + raw
            self.partial = b""
            self.offset += len(raw)
            read.append((raw.decode("utf-8", "replace"), self.offset))
        if not read:
            self._check_rotation()
        return read

    def _check_rotation(self):
        """Reopen when the path now names another file or was truncated."""
        try:
            stat = os.stat(self.path)
        except OSError:
            return
        if stat.st_ino != self.inode:
            log.info("%s was rotated (renamed); following the new file", self.path)
            self.handle.close()
            self.handle = None
            self.inode = 0
        elif stat.st_size < self.offset:
            log.info("%s was truncated; reading it from the start", self.path)
            self.handle.seek(0)
            self.offset = 0
            self.partial = b""

    def identity(self):
        """(inode, fingerprint of the open file's head) to save beside the offset."""
        if self.handle is not None:
            head = os.pread(self.handle.fileno(), FINGERPRINT_BYTES, 0)
            self.head = f"{len(head)}:{hashlib.sha1(head).hexdigest()}" if head else ""
        return self.inode, self.head

    def size(self):
        """The file's current size in bytes (0 when missing)."""
        try:
            return os.stat(self.path).st_size
        except OSError:
            return 0

    def close(self):
        """Close the handle."""
        if self.handle is not None:
            self.handle.close()
            self.handle = None
