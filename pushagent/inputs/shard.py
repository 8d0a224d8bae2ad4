"""`--shard K/N`: a deterministic split of a batch's inputs between the N tasks of a Slurm array.

Every task computes the same split from the same file list, so together the
N tasks read each line exactly once, and each reads only its own part:

- at least N files: whole files, the largest first to the least loaded shard;
- fewer files: the bytes of all files, taken end to end, cut into N equal
  ranges. A shard owns the lines that *start* in its range, so a line
  crossing a boundary belongs to the shard it starts in. Gzip files cannot be
  split this way (an offset inside them cannot be reached without
  decompressing everything before it).

All tasks share the batch id (documents, retry queue, sync-state); each keeps
its own run state and lock, named by `run_key`.
"""

from typing import NamedTuple

from pushagent.errors import ConfigError


class Shard(NamedTuple):
    index: int      # K, 0-based: $SLURM_ARRAY_TASK_ID of --array=0-(N-1)
    count: int      # N

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


class FileRange(NamedTuple):
    """The part of input file `file_index` a run reads: the lines starting in [start, end)."""

    file_index: int
    start: int
    end: int | None     # None: to the end of the file


def parse_shard(text: str) -> Shard:
    """'K/N' with 0 <= K < N."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard must be K/N, e.g. 0/4, got {text!r}") from None
    if not 0 <= index < count:
        raise ConfigError(f"--shard K/N needs 0 <= K < N, got {text!r}",
                          hint="use --array=0-(N-1) and --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT")
    return Shard(index, count)


def run_key(batch_id: str, shard: Shard | None) -> str:
    """Name of a run's state file and lock: the batch id, plus the shard for one task of an array."""
    return f"{batch_id}.shard-{shard.index}-of-{shard.count}" if shard else batch_id


def file_ranges(files, shard: Shard | None) -> list[FileRange]:
    """What a run reads of `files` (InputFile list, in reading order), in reading order.

    Only the first range may start inside a file; later ones start at 0.
    """
    if shard is None or shard.count == 1:
        return [FileRange(number, 0, None) for number in range(len(files))]
    if len(files) >= shard.count:
        return _whole_files(files, shard)
    return _byte_ranges(files, shard)


def _whole_files(files, shard: Shard) -> list[FileRange]:
    loads = [0] * shard.count
    owner = {}
    for number in sorted(range(len(files)), key=lambda n: (-files[n].size, n)):
        lightest = min(range(shard.count), key=lambda k: (loads[k], k))
        owner[number] = lightest
        loads[lightest] += files[number].size
    return [FileRange(number, 0, None) for number in range(len(files)) if owner[number] == shard.index]


def _byte_ranges(files, shard: Shard) -> list[FileRange]:
    for input_file in files:
        if input_file.is_gzip:
            raise ConfigError(f"cannot split {input_file.path} between {shard.count} shards: a gzip file can only "
                              "be read from its start",
                              hint=f"give at least {shard.count} input files (each shard then reads whole files), "
                                   "or decompress it")
    total = sum(input_file.size for input_file in files)
    low, high = total * shard.index // shard.count, total * (shard.index + 1) // shard.count
    ranges, base = [], 0
    for number, input_file in enumerate(files):
        start, end = max(low - base, 0), min(high - base, input_file.size)
        if start < end:
            ranges.append(FileRange(number, start, end))
        base += input_file.size
    return ranges
