"""Input files: expand globs, fingerprint them, stream their lines with positions.

A position is (byte offset after the line, 1-based line number). For `.gz`
files the offset counts uncompressed bytes: a resume must decompress up to
it again, but sends nothing twice.
"""

import glob
import gzip
import hashlib
import os
import zlib
from typing import Iterator, NamedTuple

from pushagent.errors import ConfigError, PushAgentError
from pushagent.inputs.source import InputFile

BOM = b"\xef\xbb\xbf"
_HEAD_BYTES = 64 * 1024


class InputReadError(PushAgentError):
    """The rest of a file cannot be read (truncated gzip, I/O error)."""


class Line(NamedTuple):
    """One raw input line and where it ends."""

    data: bytes
    number: int
    end_offset: int


def expand_inputs(patterns, s3_endpoint_url: str | None = None) -> list[InputFile]:
    """Resolve paths, globs and s3:// URLs to existing inputs, in the order given, each once."""
    paths = []
    for pattern in patterns:
        if pattern.startswith("s3://"):
            from pushagent.inputs import s3  # boto3 is imported only when an input needs it
            paths.extend(s3.list_inputs(pattern, s3_endpoint_url))
            continue
        matches = sorted(glob.glob(os.path.expanduser(pattern))) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise ConfigError(f"no input matches {pattern!r}")
        paths.extend(matches)
    seen, files = set(), []
    for path in paths:
        described = path if isinstance(path, InputFile) else describe_file(os.path.abspath(os.path.expanduser(path)))
        if described.path not in seen:
            seen.add(described.path)
            files.append(described)
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


def open_input(input_file: InputFile, offset: int = 0):
    """Binary stream of the input's uncompressed bytes, positioned at `offset`."""
    if input_file.source == "s3":
        from pushagent.inputs import s3
        return s3.open_object(input_file, offset)
    if input_file.is_gzip:
        stream = gzip.open(input_file.path, "rb")
    else:
        stream = open(input_file.path, "rb", buffering=1024 * 1024)
    if offset:
        stream.seek(offset)
    return stream


def read_lines(input_file: InputFile, offset: int = 0, line: int = 0, end: int | None = None) -> Iterator[Line]:
    """Yield the lines after `offset` (which ends line number `line`) that start before `end`.

    Blank lines are skipped but counted, so line numbers match an editor's.
    """
    try:
        with open_input(input_file, offset) as stream:
            for data in stream:
                if end is not None and offset >= end:
                    return
                offset += len(data)
                line += 1
                if line == 1 and data.startswith(BOM):
                    data = data[len(BOM):]
                if data.strip():
                    yield Line(data, line, offset)
    except (EOFError, OSError, zlib.error) as error:
        raise InputReadError(f"cannot read past line {line}, the file is truncated or damaged: {error}",
                             file=input_file.path, line=line + 1, hint="regenerate the file") from None


def next_line_start(input_file: InputFile, offset: int) -> tuple[int, int]:
    """The first line start at or after byte `offset` of a plain input, and how many lines come before it.

    Counting those lines reads the file up to `offset`: line numbers stay the
    file's own, so a shard's dead-letter entries name the right line.
    """
    if offset == 0:
        return 0, 0
    lines, remaining = 0, offset - 1
    with open_input(input_file) as handle:
        while remaining:
            block = handle.read(min(remaining, 1024 * 1024))
            if not block:
                break
            lines += block.count(b"\n")
            remaining -= len(block)
        rest = handle.readline()    # from offset - 1: just b"\n" when offset already starts a line
    return offset - 1 + len(rest), lines + (1 if rest else 0)
