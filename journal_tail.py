"""Incremental reader of the live JSON-lines journals (DESIGN.md §3), shared by the dashboard and the notifier.

`JournalTail(path).read_new()` returns the records appended since the previous call, so a refresh costs
what was appended, not the size of the file. Like `tail -F` it keeps the file open and remembers the
byte offset after the last complete line:

- a torn last line (a writer caught mid-append) is left for the next call, never parsed half;
- rotation (the path now names another file) drains what is left of the old file, then opens the new;
- truncation (the file shrank below the offset) starts again from the beginning;
- a line that is not a JSON object is skipped with a warning naming the file and line, and counted.

Start at the end (`from_end=True`) to see only what is appended after start-up, as the notifier does
so that journal lines written before it started are not sent again. A file created later is read
from its first line.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import BinaryIO, Iterator

import orjson

log = logging.getLogger("journal_tail")

CHUNK = 4 << 20


class JournalTail:
    """Follow one JSON-lines file. `read_new()` -> list of dict records appended since the last call."""

    def __init__(self, path: str | Path, from_end: bool = False) -> None:
        self.path = Path(path)
        self.bad_lines = 0
        self.line_no = 0
        self._fh: BinaryIO | None = None
        self._offset = 0
        if from_end and self._open():
            self._skip_to_end()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def read_new(self) -> list[dict]:
        """Records appended since the previous call; [] while the file does not exist."""
        out: list[dict] = []
        if self._fh is None and not self._open():
            return out
        assert self._fh is not None
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            current = None
        mine = os.fstat(self._fh.fileno())
        if current is not None and (current.st_ino, current.st_dev) != (mine.st_ino, mine.st_dev):
            out += self._read_complete()
            log.info("%s: rotated; reading the new file from its start", self.path)
            self.close()
            self._open()
        elif mine.st_size < self._offset:
            log.warning("%s: truncated from %d to %d bytes; reading again from the start",
                        self.path, self._offset, mine.st_size)
            self._offset, self.line_no = 0, 0
        if self._fh is not None:
            out += self._read_complete()
        return out

    def _open(self) -> bool:
        try:
            self._fh = open(self.path, "rb")
        except FileNotFoundError:
            return False
        self._offset, self.line_no = 0, 0
        return True

    def _skip_to_end(self) -> None:
        """Move past every complete line now in the file without parsing them (a torn tail stays unread)."""
        for block in self._complete_blocks():
            self.line_no += block.count(b"\n")

    def _read_complete(self) -> list[dict]:
        """Parse every complete line from the offset to the end of the open file."""
        out: list[dict] = []
        for block in self._complete_blocks():
            for raw in block[:-1].split(b"\n"):
                self.line_no += 1
                self._parse(raw, out)
        return out

    def _complete_blocks(self) -> Iterator[bytes]:
        """Blocks of whole lines (each ending in a newline) from the offset, advancing it past each."""
        assert self._fh is not None
        self._fh.seek(self._offset)
        pending = b""
        for chunk in iter(lambda: self._fh.read(CHUNK), b""):
            data = pending + chunk
            last = data.rfind(b"\n")
            if last < 0:
                pending = data
                continue
            pending = data[last + 1:]
            self._offset += last + 1
            yield data[:last + 1]

    def _parse(self, raw: bytes, out: list[dict]) -> None:
        if not raw.strip():
            return
        try:
            rec = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            rec, why = None, str(exc)
        else:
            why = f"expected a JSON object, got {type(rec).__name__}"
        if isinstance(rec, dict):
            out.append(rec)
            return
        self.bad_lines += 1
        log.warning("%s line %d: skipped, not a journal record (%s)", self.path, self.line_no, why)
