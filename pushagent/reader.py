"""Input files: expand globs, fingerprint them, stream their lines with positions.

A position is (byte offset after the line, 1-based line number). For `.gz`
files the offset counts uncompressed bytes: a resume must decompress up to
it again, but sends nothing twice.
"""

import dataclasses
import glob
import gzip
import hashlib
import os
import zlib
from typing import Iterator, NamedTuple

from .errors import ConfigError, PushAgentError

BOM = b"\xef\xbb\xbf"
_HEAD_BYTES = 64 * 1024


@dataclasses.dataclass(frozen=True)
class InputFile:
    path: str
    size: int
    mtime_ns: int
    head_sha256: str

    @property
    def is_gzip(self) -> bool:
        return self.path.endswith(".gz")

    def fingerprint(self) -> dict:
        return dataclasses.asdict(self)


class InputReadError(PushAgentError):
    """The rest of a file cannot be read (truncated gzip, I/O error)."""


class Line(NamedTuple):
    """One raw input line and where it ends."""

    data: bytes
    number: int
    end_offset: int


def expand_inputs(patterns) -> list[InputFile]:
    """Resolve paths and globs to existing files, in the order given, each once."""
    paths = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern))) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise ConfigError(f"no input matches {pattern!r}")
        paths.extend(matches)
    seen, files = set(), []
    for path in paths:
        absolute = os.path.abspath(os.path.expanduser(path))
        if absolute not in seen:
            seen.add(absolute)
            files.append(describe_file(absolute))
    return files


def describe_file(path: str) -> InputFile:
    if not os.path.exists(path):
        raise ConfigError(f"input file not found: {path}")
    if not os.path.isfile(path):
        raise ConfigError(f"input is not a regular file: {path}", hint="pass files or globs such as 'dir/*.jsonl'")
    stat = os.stat(path)
    with open(path, "rb") as handle:
        head = hashlib.sha256(handle.read(_HEAD_BYTES)).hexdigest()
    return InputFile(path, stat.st_size, stat.st_mtime_ns, head)


def open_input(input_file: InputFile):
    """Binary stream of the file's uncompressed bytes."""
    if input_file.is_gzip:
        return gzip.open(input_file.path, "rb")
    return open(input_file.path, "rb", buffering=1024 * 1024)


def read_lines(input_file: InputFile, offset: int = 0, line: int = 0) -> Iterator[Line]:
    """Yield the lines after `offset` (which ends line number `line`).

    Blank lines are skipped but counted, so line numbers match an editor's.
    """
    with open_input(input_file) as stream:
        try:
            if offset:
                stream.seek(offset)
            for data in stream:
                offset += len(data)
                line += 1
                if line == 1 and data.startswith(BOM):
                    data = data[len(BOM):]
                if data.strip():
                    yield Line(data, line, offset)
        except (EOFError, OSError, zlib.error) as error:
            raise InputReadError(f"cannot read past line {line}, the file is truncated or damaged: {error}",
                                 file=input_file.path, line=line + 1, hint="regenerate the file") from None
