"""build_workers: documents built in other processes are the same documents, in the same order, with the
same checkpoints, ledger, table of documents, resume and incremental counts as when built in one."""

import json
import signal
import sqlite3
import time
from pathlib import Path

import orjson
import pytest
from faultproxy import FaultProxy
from support import count, generate, run_push
from test_push_cluster import start_slow_push

from pushagent.documents import buildpool
from pushagent.documents.buildpool import BuildPool, default_build_workers, job_cores
from pushagent.documents.builder import Builder, BuildSettings, Rejected
from pushagent.documents.chunker import Position

WORKERS = {"PUSHAGENT_BUILD_WORKERS": "3"}
ONE = {"PUSHAGENT_BUILD_WORKERS": "1"}
SETTINGS = BuildSettings(id_field="ipa_id", default_index="words", index_field=None,
                         allowed_indices=frozenset({"words"}), batch_version=1_767_225_600_000,
                         batch_time_iso="2026-01-01T00:00:00.000Z", embedding_version="v1", batch_id="b")


def mixed_lines(path, count_=700) -> list:
    """Records with some problems among them: malformed, not an object, no id, a stamp field to replace."""
    lines = generate(path, count_).read_bytes().splitlines(keepends=True)
    lines[10], lines[300], lines[301] = b'{"broken\n', b"[1, 2]\n", b'{"word": "no id"}\n'
    lines[500] = lines[500][:-2] + b', "sync_checksum": "mine"}\n'
    return lines


def as_lines(lines, fail_after=None):
    for number, raw in enumerate(lines, 1):
        if number == fail_after:
            raise OSError("the input went away")
        yield raw, "in.jsonl", number, Position(0, number * 10, number)


def built(workers: int, lines, fail_after=None) -> tuple:
    """(items as comparable tuples, positions, replaced stamps, the error raised after them or None)."""
    builder, out, error = Builder(SETTINGS), [], None
    with BuildPool(builder, workers) as pool:
        try:
            out.extend(pool.build(as_lines(lines, fail_after)))
        except OSError as raised:
            error = str(raised)
    items = [(item.reason, item.line) if isinstance(item, Rejected)
             else (item.doc_id, item.line, item.checksum, bytes(item.action), bytes(item.source))
             for item, _ in out]
    return items, [position for _, position in out], builder.replaced_stamps, error


@pytest.mark.fast
def test_workers_build_the_same_items_in_input_order(tmp_path, monkeypatch):
    monkeypatch.setattr(buildpool, "BATCH_LINES", 64)      # many batches, answered out of order
    monkeypatch.setattr(buildpool, "BATCH_BYTES", 40_000)   # some cut by their bytes
    lines = mixed_lines(tmp_path / "in.jsonl")
    alone, several = built(1, lines), built(3, lines)
    assert several == alone
    items, positions, replaced, _ = several
    assert [position.line for position in positions] == list(range(1, 701))
    assert sum(isinstance(item[0], str) and item[0].startswith(("malformed", "not a JSON", "missing"))
               for item in items) == 3
    assert replaced["sync_checksum"] == 1


@pytest.mark.fast
def test_a_reader_error_comes_after_every_line_read_before_it(tmp_path, monkeypatch):
    monkeypatch.setattr(buildpool, "BATCH_LINES", 64)
    lines = mixed_lines(tmp_path / "in.jsonl")
    items, positions, _, error = built(3, lines, fail_after=200)
    assert error == "the input went away"
    assert [position.line for position in positions] == list(range(1, 200))
    assert items == built(1, lines, fail_after=200)[0]


@pytest.mark.fast
def test_a_batch_is_bounded_by_lines_and_by_bytes():
    lines = [(b"x" * 100, "in.jsonl", number, None) for number in range(10)]
    assert [len(batch) for batch in buildpool.batched(iter(lines), 4, 250)] == [3, 3, 3, 1]
    assert [len(batch) for batch in buildpool.batched(iter(lines), 4, 10_000)] == [4, 4, 2]
    assert [len(batch) for batch in buildpool.batched(iter([(b"y" * 1000, "in.jsonl", 1, None)]), 4, 250)] == [1]


@pytest.mark.fast
def test_the_default_follows_the_cores_the_job_may_use(monkeypatch):
    monkeypatch.setattr(buildpool.os, "sched_getaffinity", lambda pid: set(range(32)))
    assert job_cores({}) == 32 and default_build_workers({}) == buildpool.MAX_DEFAULT_WORKERS
    assert job_cores({"SLURM_CPUS_PER_TASK": "4"}) == 4 and default_build_workers({"SLURM_CPUS_PER_TASK": "4"}) == 3
    assert default_build_workers({"SLURM_CPUS_PER_TASK": "2"}) == 1
    monkeypatch.setattr(buildpool.os, "sched_getaffinity", lambda pid: {0, 1})
    assert default_build_workers({"SLURM_CPUS_PER_TASK": "32"}) == 1   # Slurm's count, capped by the affinity


@pytest.mark.fast
def test_dry_run_bodies_are_byte_identical_with_workers(tmp_path):
    data = tmp_path / "in.jsonl"
    lines = mixed_lines(data, 2_000)
    data.write_bytes(b"".join(lines + [lines[42]]))          # a repeated id: the later line wins
    bodies = {}
    for name, env in (("one", ONE), ("several", WORKERS)):
        out = tmp_path / name
        code, report, stderr = run_push("http://127.0.0.1:9", "words", tmp_path / f"state-{name}", data, env=env,
                                        extra=["--dry-run", str(out), "--chunk-docs", "300", "--concurrency", "1",
                                               "--max-concurrency", "1",
                                               "--batch-time", "2026-01-01T00:00:00Z"])
        assert code == 3 and report["quarantined"] == 3, stderr
        bodies[name] = [path.read_bytes() for path in sorted(out.iterdir())]
    assert len(bodies["one"]) == 7 and bodies["several"] == bodies["one"]


def table_rows(state_dir, batch_id) -> list:
    with sqlite3.connect(state_dir / "runs" / f"{batch_id}.docs.db") as db:
        return db.execute("SELECT idx, id, version, checksum, fno, line, op FROM docs ORDER BY id").fetchall()


def test_a_push_with_workers_records_what_one_process_records(cluster_url, index, state_dir, tmp_path):
    data = generate(tmp_path / "words.jsonl", 6_000)
    results = {}
    for name, env in (("one", ONE), ("several", WORKERS)):
        where = state_dir / name
        code, report, stderr = run_push(cluster_url, index, where, data, env=env,
                                        extra=["--chunk-docs", "700", "--batch-id", "same", "--batch-time",
                                               f"2026-01-0{1 + len(results)}T00:00:00Z"])
        assert (code, report["status"], report["indexed"]) == (0, "verified", 6_000), stderr
        checkpoint = json.loads((where / "runs" / "same.json").read_text())
        record = json.loads((where / "sync-state" / "same.json").read_text())
        results[name] = (checkpoint["position"], checkpoint["counters"], record["checksum"], record["doc_count"],
                         [row[1:2] + row[3:] for row in table_rows(where, "same")])
    assert results["several"] == results["one"]


def stat_fields(pid) -> list:
    """/proc/PID/stat after the command name: state, parent pid, ... ([] once the process is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def children(pid: int) -> list:
    return [int(path.name) for path in Path("/proc").glob("[0-9]*") if stat_fields(path.name)[1:2] == [str(pid)]]


def gone(pids, seconds: float = 10) -> bool:
    """Every one of `pids` has ended (a zombie waiting to be reaped counts as ended)."""
    deadline = time.monotonic() + seconds
    while any(stat_fields(pid)[:1] not in ([], ["Z"]) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_sigkill_mid_push_with_workers_then_rerun_is_exact(cluster_url, index, state_dir, tmp_path):
    data = generate(tmp_path / "words.jsonl", 20_000)
    config = tmp_path / "pushagent.yaml"
    config.write_text("build_workers: 3\nmax_concurrency: 2\n")   # a crash re-sends at most 2 chunks
    extra = ["--chunk-docs", "1000", "--config", str(config)]
    with FaultProxy(cluster_url) as proxy:
        process = start_slow_push(proxy, index, state_dir, data, extra, until_requests=6, delay=0.2)
        workers = children(process.pid)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        assert len(workers) >= 3 and gone(workers)          # none is left waiting for work forever
        code, report, stderr = run_push(proxy.url, index, state_dir, data, extra=extra)
        resent = proxy.resent()
    assert (code, report["read"], report["indexed"] + report["current"]) == (0, 20_000, 20_000), stderr
    assert 0 < report["this_run"]["read"] < 20_000 and resent <= 2 * 1000
    assert count(cluster_url, index) == 20_000


def test_incremental_with_workers_counts_unchanged_exactly(cluster_url, index, state_dir, tmp_path):
    first = generate(tmp_path / "first.jsonl", 3_000)
    lines = first.read_bytes().splitlines(keepends=True)
    changed = generate(tmp_path / "changed.jsonl", 30, seed=99).read_bytes().splitlines(keepends=True)
    second = tmp_path / "second.jsonl"
    second.write_bytes(b"".join(changed + lines[30:]))
    extra = ["--embedding-version", "v1", "--chunk-docs", "400"]
    code, _, stderr = run_push(cluster_url, index, state_dir, first, env=WORKERS,
                               extra=[*extra, "--batch-time", "2026-01-01T00:00:00Z"])
    assert code == 0, stderr
    with FaultProxy(cluster_url) as proxy:
        code, report, stderr = run_push(proxy.url, index, state_dir, second, env=WORKERS,
                                        extra=[*extra, "--batch-time", "2026-01-02T00:00:00Z", "--incremental"])
        sent = proxy.id_counts()
    assert (code, report["status"], report["unchanged"], report["indexed"]) == (0, "verified", 2_970, 30), stderr
    assert sorted(sent) == [orjson.loads(line)["ipa_id"] for line in changed]
