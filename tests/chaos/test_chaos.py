"""Nothing is lost under crashes, wire faults, an outage, a full disk and hostile input.

Each scenario adds a row to the reliability table (see conftest.py). Quick
scale in the default run; full scale under scripts/chaos.sh.
"""

import gzip
import json
import random
import signal
import sqlite3
import subprocess
import time

import orjson
import pytest
import requests
from conftest import FULL, scale
from faultproxy import Fault, FaultProxy
from redisserver import RedisServer, drain_killed_mid_way
from support import (agent_env, cli_command, count, fill_queue, generate, interrupt_after, push_command, queue_stats,
                     queued_ids, run_cli, run_push, stored_checksums, wait_for)

from pushagent.inputs.reader import BOM

CHUNK_DOCS, CONCURRENCY = 1000, 2


def queue_contents(state_dir) -> dict:
    """Ids pending and dead in the retry queue, and the (file, line) of quarantined lines."""
    contents = {"pending": set(), "dead": set(), "quarantined": set()}
    path = state_dir / "queue.db"
    if path.exists():
        with sqlite3.connect(path) as db:
            for key, kind, status, input_file, line in db.execute(
                    "SELECT key, kind, status, input_file, line FROM items"):
                if kind == "quarantined":
                    contents["quarantined"].add((input_file, line))
                else:
                    contents[status].add(key.split("/", 1)[1])
    return contents


def input_lines(path):
    """(line number, id or None) of each non-blank line; a truncated tail is one more entry."""
    opener = gzip.open if str(path).endswith(".gz") else open
    number = 0
    try:
        with opener(path, "rb") as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    yield number, record_id(line.removeprefix(BOM) if number == 1 else line)
    except (EOFError, OSError):
        yield number + 1, None


def record_id(line: bytes):
    try:
        return str(orjson.loads(line)["ipa_id"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None


def account(url, index, state_dir, paths, resent=0, scenario="", injected="") -> dict:
    """The reliability row: where every input line ended up; `lost` must be 0.

    A line is accounted for when it was quarantined (by file and line), or when
    its id is in the cluster, pending in the retry queue or dead-lettered.
    """
    stored = set(stored_checksums(url, index))
    queue = queue_contents(state_dir)
    row = dict.fromkeys(("records_in", "landed", "queued", "dead", "quarantined", "lost"), 0)
    for path in paths:
        for number, doc_id in input_lines(path):
            row["records_in"] += 1
            outcome = ("quarantined" if (str(path), number) in queue["quarantined"] else
                       "landed" if doc_id in stored else "queued" if doc_id in queue["pending"] else
                       "dead" if doc_id in queue["dead"] else "lost")
            row[outcome] += 1
    return {"scenario": scenario, "injected": injected, "re_sent": resent, **row}


def kill_at_random_points(proxy, command, env, crashes, rng, max_requests, pause=0.0) -> list:
    """SIGKILL `command` `crashes` times, each after 1 to `max_requests` more bulk requests reached `proxy`.

    Waits `pause` after each kill (for leases to expire); returns the records re-sent during each run.
    """
    increments = []
    for _ in range(crashes):
        before = proxy.resent()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=agent_env(env))
        wait_for_requests(proxy, len(proxy.bulk_requests()) + rng.randint(1, max_requests))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        time.sleep(pause)
        quiet_proxy(proxy)
        increments.append(proxy.resent() - before)
    return increments


def quiet_proxy(proxy, quiet=0.5, timeout=10):
    """Wait until no request has reached `proxy` for `quiet` seconds: one the killed process wrote just before
    its end may be recorded a moment after, and must count for its own run, not the next."""
    deadline = time.monotonic() + timeout
    seen = len(proxy.requests)
    while time.monotonic() < deadline:
        time.sleep(quiet)
        if len(proxy.requests) == seen:
            return
        seen = len(proxy.requests)


def wait_for_requests(proxy, number, timeout=120):
    deadline = time.monotonic() + timeout
    while len(proxy.bulk_requests()) < number and time.monotonic() < deadline:
        time.sleep(0.01)


def test_sigkill_at_random_points_then_rerun(cluster_url, index, state_dir, tmp_path, reliability_row):
    records, crashes = scale(20_000, 100_000), scale(3, 20)
    data = generate(tmp_path / "words.jsonl", records)
    extra = ["--chunk-docs", str(CHUNK_DOCS), "--concurrency", str(CONCURRENCY), "--max-concurrency", str(CONCURRENCY)]
    rng = random.Random(20261123)
    with FaultProxy(cluster_url) as proxy:
        proxy.plan = lambda request: Fault.delay(rng.choice((0.01, 0.01, 0.2))) if request.ids else None
        increments = kill_at_random_points(proxy, push_command(proxy.url, index, state_dir, data, extra=extra),
                                           {}, crashes, rng, max_requests=6)
        before = proxy.resent()
        code, report, stderr = run_push(proxy.url, index, state_dir, data, extra=extra)
        increments.append(proxy.resent() - before)
        resent = proxy.resent()
    assert code == 0, stderr
    assert count(cluster_url, index) == records
    assert_full_verification_passes(cluster_url, state_dir, report["batch_id"])
    # Each run re-sends what the crash before it left uncommitted: at most max_concurrency x chunk_docs.
    assert max(increments[1:]) <= CONCURRENCY * CHUNK_DOCS, increments
    assert_no_version_below(cluster_url, index, data)
    row = account(cluster_url, index, state_dir, [data], resent, f"SIGKILL during push x{crashes}",
                  f"{crashes} kills at seeded random points")
    reliability_row(**row)
    assert row["lost"] == 0


def assert_full_verification_passes(url, state_dir, batch_id):
    """`verify --full`: every source id stored with its checksum, nothing extra, nothing mismatched."""
    code, result, stderr = run_cli("verify", "--batch-id", batch_id, "--full", url=url, state_dir=state_dir)
    full = result["verification"]["full"]
    assert code == 0 and (full["missing"], full["extra"], full["mismatched"]) == (0, 0, 0), (stderr, full)


def assert_no_version_below(url, index, data):
    """Sampled documents all carry the batch's version (the input's mtime in ms): none is older than its source."""
    expected = data.stat().st_mtime_ns // 1_000_000
    requests.post(f"{url}/{index}/_refresh", timeout=60)
    hits = requests.post(f"{url}/{index}/_search", json={"size": 200, "version": True, "_source": False,
                                                         "query": {"function_score": {"random_score": {}}}},
                         timeout=60).json()["hits"]["hits"]
    assert hits and {hit["_version"] for hit in hits} == {expected}


def mixed_faults(rng: random.Random, max_latency: float):
    """One fault of each kind first, then 10% 429 (half with Retry-After), 5% 503, 2% reset after
    the body was sent, 1% applied but unanswered, 1% per-item 429s, random latency."""
    first = [Fault.reply(429, retry_after="1"), Fault.reply(503), Fault.reset(after_forward=True),
             Fault.drop_answer(4), Fault.item_status(429, every=7), Fault.reply(429)]

    def plan(request):
        if not request.ids:
            return None
        if request.number < len(first):
            return first[request.number]
        draw = rng.random()
        for threshold, fault in ((0.05, Fault.reply(429, retry_after="1")), (0.10, Fault.reply(429)),
                                 (0.15, Fault.reply(503)), (0.17, Fault.reset(after_forward=True)),
                                 (0.18, Fault.drop_answer(4)), (0.19, Fault.item_status(429, every=7))):
            if draw < threshold:
                return fault
        return Fault.delay(rng.uniform(0, max_latency))
    return plan


def test_mixed_faults_on_the_wire(cluster_url, index, state_dir, tmp_path, reliability_row):
    records = scale(20_000, 200_000)
    chunk_docs = scale(500, 5000)
    data = generate(tmp_path / "words.jsonl", records)
    env = {"PUSHAGENT_TIMEOUT_SECONDS": "3", "PUSHAGENT_MAX_RETRIES": "4"}
    with FaultProxy(cluster_url) as proxy:
        proxy.plan = mixed_faults(random.Random(7), scale(0.2, 2.0))
        code, report, stderr = run_push(proxy.url, index, state_dir, data, extra=["--chunk-docs", str(chunk_docs)],
                                        env=env)
        resent = proxy.resent()
    assert code in (0, 3), stderr
    assert report["read"] == report["indexed"] + report["current"] + report["queued"] + report["dead"]
    assert report["dead"] == 0
    row = account(cluster_url, index, state_dir, [data], resent, "mixed wire faults",
                  "429 (10%), 503 (5%), resets (2%), lost answers (1%), item 429s (1%), latency")
    reliability_row(**row)
    assert row["lost"] == 0 and row["landed"] + row["queued"] == records
    code, _, stderr = run_cli("drain", "--all", url=cluster_url, state_dir=state_dir)
    assert code == 0, stderr
    assert count(cluster_url, index) == records
    assert_full_verification_passes(cluster_url, state_dir, report["batch_id"])


def test_cluster_down_stops_the_run_and_the_rerun_completes(cluster_url, index, state_dir, tmp_path,
                                                             reliability_row):
    records, outage = scale(10_000, 50_000), scale(3, 120)
    data = generate(tmp_path / "words.jsonl", records)
    extra = ["--chunk-docs", "500"]
    with FaultProxy(cluster_url) as proxy:
        proxy.plan = lambda request: Fault.delay(0.05) if request.ids else None
        # Down for longer than the outage budget (2 s here): the run stops with its checkpoint.
        first, _, stderr = interrupt_after(proxy, push_command(proxy.url, index, state_dir, data, extra=extra),
                                           requests=4, timeout=300, interrupt=lambda process: proxy.stop(),
                                           env={"PUSHAGENT_OUTAGE_SECONDS": "2",
                                                "PUSHAGENT_MAX_BACKOFF_SECONDS": "0.5"})
        time.sleep(outage)
        proxy.restart()
        code, report, rerun_stderr = run_push(proxy.url, index, state_dir, data, extra=extra)
        resent = proxy.resent()
    assert first == 1, stderr
    assert "the cluster answered nothing useful" in stderr and "run the same command again" in stderr
    assert code == 0, rerun_stderr
    assert count(cluster_url, index) == records
    row = account(cluster_url, index, state_dir, [data], resent, "cluster down mid-run",
                  f"proxy stopped for {outage} s")
    reliability_row(**row)
    assert row["lost"] == 0


@pytest.fixture
def small_disk(tmp_path):
    """A small tmpfs for the state dir (needs root), big enough for the run's own state once freed."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    size = scale("4m", "32m")  # the table of delivered documents grows with the records
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill (needs root): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def fill(directory) -> None:
    with open(directory / "filler", "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass


def test_full_disk_stops_cleanly_and_the_rerun_completes(cluster_url, index, small_disk, tmp_path,
                                                          reliability_row):
    records = scale(5_000, 50_000)
    data = generate(tmp_path / "words.jsonl", records)
    state_dir = small_disk / "state"
    extra = ["--chunk-docs", "250"]

    def fill_once_checkpointed(process):
        # The adaptive sender may send a third request before the first chunk's commit: filling the disk at
        # that moment would leave no checkpoint at all, a start over rather than the mid-run case tested here.
        wait_for(lambda: any((state_dir / "runs").glob("*.json")) or process.poll() is not None)
        fill(small_disk)

    with FaultProxy(cluster_url) as proxy:
        proxy.plan = lambda request: Fault.delay(0.1) if request.ids else None
        code, _, stderr = interrupt_after(proxy, push_command(proxy.url, index, state_dir, data, extra=extra),
                                          timeout=300, interrupt=fill_once_checkpointed)
    assert code == 1, stderr
    assert str(state_dir) in stderr and "No space left on device" in stderr
    (checkpoint,) = (state_dir / "runs").glob("*.json")
    json.loads(checkpoint.read_text())  # the last good checkpoint, whole
    (small_disk / "filler").unlink()
    code, report, stderr = run_push(cluster_url, index, state_dir, data, extra=extra)
    assert code == 0, stderr
    assert count(cluster_url, index) == records
    row = account(cluster_url, index, state_dir, [data], 0, "full disk under state_dir",
                  "tmpfs filled mid-run, then freed")
    reliability_row(**row)
    assert row["lost"] == 0


def good_lines(start, number):
    return [orjson.dumps({"ipa_id": f"g{n}", "word": "ka"}) for n in range(start, start + number)]


BIG = scale(2, 200) * 1024 * 1024
BAD_INPUTS = {
    # name: (bytes of the bad part, quarantined lines it yields, text of the warning)
    "malformed JSON": (b'{"ipa_id": "b1", "word": ', 1, "malformed JSON"),
    "invalid UTF-8": (b'{"ipa_id": "b2", "word": "\xff\xfe"}', 1, "malformed JSON"),
    "missing id": (b'{"word": "no id"}', 1, "missing id field 'ipa_id'"),
    "id of the wrong type": (b'{"ipa_id": [1, 2]}', 1, "is a list"),
    "record larger than a request": (b'{"ipa_id": "huge", "blob": "' + b"x" * BIG + b'"}', 1,
                                     "larger than chunk_bytes"),
    "not JSONL at all": (b"name,ipa\nka,/k\xc9\x91/", 2, "malformed JSON"),
    "index outside allowed_indices": (b'{"ipa_id": "b3", "target": "elsewhere"}', 1, "not in allowed_indices"),
    "NUL bytes": (b'{"ipa_id": "b4"}\x00', 1, "malformed JSON"),
    "duplicated ids": (b'{"ipa_id": "g0", "word": "ka"}', 0, None),
    "very long line": (b'{"ipa_id": "long", "blob": "' + b"y" * (BIG // 8) + b'"}', 0, None),  # < chunk_bytes
}


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_bad_input_alone_and_mixed_into_a_good_file(cluster_url, index, state_dir, tmp_path, kind,
                                                     reliability_row):
    bad, quarantined, warning = BAD_INPUTS[kind]
    alone = tmp_path / "alone.jsonl"
    alone.write_bytes(bad + b"\n")
    mixed = tmp_path / "mixed.jsonl"
    lines = good_lines(0, 50)
    mixed.write_bytes(b"\n".join(lines[:20] + [bad] + lines[20:]) + b"\n")
    env = {"PUSHAGENT_INDEX_FIELD": "target", "PUSHAGENT_CHUNK_BYTES": str(BIG // 2 if not FULL else 50 << 20)}
    for path in (alone, mixed):
        code, report, stderr = run_push(cluster_url, index, state_dir, path, env=env)
        assert code == (3 if quarantined else 0), stderr
        assert report["quarantined"] == quarantined
        if warning:
            assert f"{path}:" in stderr and warning in stderr
    row = account(cluster_url, index, state_dir, [alone, mixed], 0, f"bad input: {kind}", "alone and mixed")
    reliability_row(**{**row, "records_in": row["records_in"]})
    assert row["lost"] == 0
    assert {f"g{n}" for n in range(50)} <= set(stored_checksums(cluster_url, index))


def test_truncated_gzip_and_empty_file(cluster_url, index, state_dir, tmp_path, reliability_row):
    whole = gzip.compress(b"\n".join(good_lines(0, 2000)) + b"\n")
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(whole[: len(whole) * 6 // 10])
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    code, report, stderr = run_push(cluster_url, index, state_dir, truncated, empty)
    assert code == 3, stderr
    assert report["quarantined"] == 1 and f"{truncated}:" in stderr and "truncated or damaged" in stderr
    assert 0 < report["indexed"] < 2000
    row = account(cluster_url, index, state_dir, [truncated, empty], 0, "bad input: truncated gzip, empty file",
                  "gzip cut at 60%, a 0-byte file")
    reliability_row(**row)
    assert row["lost"] == 0


def test_a_utf8_bom_starting_a_file_is_skipped(cluster_url, index, state_dir, tmp_path, reliability_row):
    """Files saved by Windows tools start with a BOM: the first record lands like the others."""
    data = tmp_path / "bom.jsonl"
    data.write_bytes(BOM + b"\n".join(good_lines(0, 50)) + b"\n")
    code, report, stderr = run_push(cluster_url, index, state_dir, data)
    assert code == 0 and report["quarantined"] == 0, stderr
    row = account(cluster_url, index, state_dir, [data], 0, "bad input: UTF-8 BOM", "a BOM before line 1")
    reliability_row(**row)
    assert row["lost"] == 0 and row["landed"] == 50


def drain_row(url, index, queue_url, ids, resent, scenario, injected) -> dict:
    """The reliability row of a drain: every queued id is in the cluster or still queued."""
    landed = set(stored_checksums(url, index)) & ids
    still = queued_ids(queue_url)
    return {"scenario": scenario, "injected": injected, "records_in": len(ids), "landed": len(landed),
            "re_sent": resent, "queued": len(still & ids), "dead": queue_stats(queue_url)["dead"], "quarantined": 0,
            "lost": len(ids - landed - still)}


def test_sigkill_during_drain_at_random_points(cluster_url, index, tmp_path, queue_url, reliability_row):
    records, crashes, chunk_docs = scale(6_000, 40_000), scale(3, 20), scale(200, 1000)
    ids = fill_queue(queue_url, generate(tmp_path / "words.jsonl", records), index)
    lease = 2.0
    env = {"PUSHAGENT_LEASE_SECONDS": str(lease), "PUSHAGENT_CHUNK_DOCS": str(chunk_docs),
           "PUSHAGENT_MAX_CONCURRENCY": str(CONCURRENCY)}
    rng = random.Random(99)
    with FaultProxy(cluster_url) as proxy:
        proxy.plan = lambda request: Fault.delay(rng.choice((0.01, 0.05, 0.3))) if request.ids else None
        increments = kill_at_random_points(proxy, cli_command("drain", "--all", url=proxy.url, queue_url=queue_url),
                                           env, crashes, rng, max_requests=4, pause=lease + 0.2)
        before = proxy.resent()
        code, report, stderr = run_cli("drain", "--all", url=proxy.url, queue_url=queue_url, env=env)
        increments.append(proxy.resent() - before)
        resent = proxy.resent()
    assert code == 0, stderr
    assert count(cluster_url, index) == records and queue_stats(queue_url)["pending"] == 0
    # A crash leaves at most `max_concurrency` leased chunks to be sent again.
    assert max(increments[1:]) <= CONCURRENCY * chunk_docs, increments
    backend = queue_url.split(":", 1)[0]
    row = drain_row(cluster_url, index, queue_url, ids, resent, f"SIGKILL during drain ({backend}) x{crashes}",
                    f"{crashes} kills at seeded random points")
    reliability_row(**row)
    assert row["lost"] == 0


def test_redis_killed_mid_drain(cluster_url, index, tmp_path, reliability_row):
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis", persistent=True).start()
    try:
        records = scale(5_000, 50_000)
        ids = fill_queue(server.url(), generate(tmp_path / "words.jsonl", records), index)
        env = {"PUSHAGENT_LEASE_SECONDS": "2", "PUSHAGENT_CHUNK_DOCS": "500"}
        with FaultProxy(cluster_url) as proxy:
            drain_killed_mid_way(server, proxy, env)
            code, report, stderr = run_cli("drain", "--all", url=proxy.url, queue_url=server.url(), env=env)
            resent = proxy.resent()
        assert code == 0, stderr
        assert count(cluster_url, index) == records
        row = drain_row(cluster_url, index, server.url(), ids, resent, "Redis killed mid-drain",
                        "SIGKILL of redis-server at the third request, restart, rerun")
        reliability_row(**row)
        assert row["lost"] == 0
    finally:
        server.stop()
