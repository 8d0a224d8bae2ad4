"""Push against the real OpenSearch, some through the fault-injecting proxy."""

import gzip
import json
import os
import re
import signal
import sqlite3
import subprocess
import time

import orjson
import pytest
import requests
from faultproxy import Fault, FaultProxy
from support import agent_env, count, generate, push_command, run_push, stored_checksums

from pushagent.documents.builder import canonical_checksum


def queue_rows(state_dir, status=None):
    with sqlite3.connect(state_dir / "queue.db") as db:
        sql = "SELECT key, kind, status, input_file, line, last_error FROM items"
        rows = db.execute(sql + (" WHERE status = ?" if status else ""), (status,) if status else ()).fetchall()
    return rows


def test_100k_records_land_exact_with_matching_checksums(cluster_url, index, state_dir, tmp_path):
    data = generate(tmp_path / "words.jsonl.gz", 100_000)
    code, report, stderr = run_push(cluster_url, index, state_dir, data, extra=["--embedding-version", "v1"])
    assert code == 0, stderr
    assert report["read"] == report["indexed"] == 100_000
    assert count(cluster_url, index) == 100_000
    assert stored_checksums(cluster_url, index) == source_checksums(data)


def source_checksums(path) -> dict:
    with gzip.open(path, "rb") as handle:
        return {record["ipa_id"]: canonical_checksum(record) for record in map(orjson.loads, handle)}


def start_slow_push(proxy, index, state_dir, data, extra, until_requests, delay, stdout=subprocess.DEVNULL):
    """Start a push through `proxy` with each bulk request delayed; return once it sent `until_requests`.

    `delay` is seconds, or a function of the request giving them (to make answers come back out of order).
    """
    delay_of = delay if callable(delay) else (lambda request: delay)
    proxy.plan = lambda request: Fault.delay(delay_of(request)) if request.ids else None
    process = subprocess.Popen(push_command(proxy.url, index, state_dir, data, extra=extra), stdout=stdout,
                               stderr=stdout, env=agent_env())
    deadline = time.monotonic() + 120
    while len(proxy.bulk_requests()) < until_requests and time.monotonic() < deadline:
        time.sleep(0.02)
    return process


def test_requests_respect_chunk_docs_and_chunk_bytes(cluster_url, index, state_dir, tmp_path):
    data = generate(tmp_path / "words.jsonl", 12_000, dims=4)
    with FaultProxy(cluster_url) as proxy:
        code, report, stderr = run_push(proxy.url, index, state_dir, data)
        assert code == 0, stderr
        assert max(len(r.ids) for r in proxy.bulk_requests()) == 5000
    small = generate(tmp_path / "big.jsonl", 2_000, dims=64, start=12_000)
    limit = 200_000
    with FaultProxy(cluster_url) as proxy:
        code, report, stderr = run_push(proxy.url, index, state_dir, small,
                                        env={"PUSHAGENT_CHUNK_BYTES": str(limit)})
        assert code == 0, stderr
        sizes = [len(r.body) for r in proxy.bulk_requests()]
        assert max(sizes) <= limit and len(sizes) > 2
        encodings = [r.headers.get("Content-Encoding") for r in proxy.bulk_requests()]
        assert encodings.count("gzip") >= 2 and encodings.count(None) >= 2   # compress: auto probed both
    assert count(cluster_url, index) == 14_000


def test_second_push_is_all_current_and_changes_nothing(cluster_url, index, state_dir, tmp_path):
    data = generate(tmp_path / "words.jsonl", 3_000)
    assert run_push(cluster_url, index, state_dir, data)[0] == 0
    before = requests.get(f"{cluster_url}/{index}/_doc/w00000007", timeout=30).json()
    code, report, stderr = run_push(cluster_url, index, state_dir, data)
    assert code == 0, stderr
    assert (report["indexed"], report["current"]) == (0, 3_000)
    after = requests.get(f"{cluster_url}/{index}/_doc/w00000007", timeout=30).json()
    assert (after["_version"], after["_seq_no"]) == (before["_version"], before["_seq_no"])


def test_regenerated_batch_wins_and_older_never_regresses(cluster_url, index, state_dir, tmp_path):
    data = generate(tmp_path / "words.jsonl", 100)
    assert run_push(cluster_url, index, state_dir, data, extra=["--batch-time", "2026-01-02T00:00:00Z"])[0] == 0
    code, report, _ = run_push(cluster_url, index, state_dir, data, extra=["--batch-time", "2026-01-01T00:00:00Z"])
    assert (code, report["current"]) == (0, 100)
    code, report, _ = run_push(cluster_url, index, state_dir, data, extra=["--batch-time", "2026-01-03T00:00:00Z"])
    assert (code, report["indexed"]) == (0, 100)


def test_sigkill_then_rerun_is_exact_and_resends_at_most_the_chunks_in_flight(cluster_url, index, state_dir,
                                                                             tmp_path):
    data = generate(tmp_path / "words.jsonl", 30_000)
    chunk_docs, concurrency = 1000, 2
    # Pinned: the chunks a crash re-sends are bounded by the limit in use, at most max_concurrency.
    extra = ["--chunk-docs", str(chunk_docs), "--concurrency", str(concurrency), "--max-concurrency", str(concurrency)]
    with FaultProxy(cluster_url) as proxy:
        # Every third answer is slow, so later chunks resolve before earlier ones and wait uncommitted.
        slow_every_third = lambda request: 0.3 if request.number % 3 == 0 else 0.02  # noqa: E731
        process = start_slow_push(proxy, index, state_dir, data, extra, until_requests=9, delay=slow_every_third)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        sent_before = len(proxy.id_counts())
        assert 0 < sent_before < 30_000
        code, report, stderr = run_push(proxy.url, index, state_dir, data, extra=extra)
        assert code == 0, stderr
        assert 0 < report["this_run"]["read"] < 30_000
        resent = proxy.resent()
    assert count(cluster_url, index) == 30_000
    assert resent <= concurrency * chunk_docs
    print(f"re-sent after SIGKILL: {resent} records")


def test_sigterm_exits_75_and_resume_does_not_reread_committed_lines(cluster_url, index, state_dir, tmp_path):
    data = generate(tmp_path / "words.jsonl", 20_000)
    extra = ["--chunk-docs", "500"]
    with FaultProxy(cluster_url) as proxy:
        process = start_slow_push(proxy, index, state_dir, data, extra, until_requests=5, delay=0.1,
                                  stdout=subprocess.PIPE)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 75, stderr
    first = json.loads(stdout)
    assert first["status"] == "interrupted"
    committed = first["position"]["line"]
    assert 0 < committed < 20_000 and first["read"] == committed
    checkpoint = json.loads((state_dir / "runs" / f"{first['batch_id']}.json").read_text())
    assert checkpoint["status"] == "interrupted" and checkpoint["position"]["line"] == committed
    code, second, stderr = run_push(cluster_url, index, state_dir, data, extra=extra)
    assert code == 0, stderr
    assert second["this_run"]["read"] == 20_000 - committed
    assert second["read"] == 20_000
    assert count(cluster_url, index) == 20_000


def test_mapping_rejections_are_dead_lettered_with_lines(cluster_url, index, state_dir, tmp_path):
    requests.put(f"{cluster_url}/{index}", json={"mappings": {"properties": {"frequency": {"type": "long"}}}},
                 timeout=30).raise_for_status()
    lines = [orjson.dumps({"ipa_id": f"m{n}", "frequency": "lots" if n in (3, 7) else n}) for n in range(10)]
    data = tmp_path / "mixed.jsonl"
    data.write_bytes(b"\n".join(lines) + b"\n")
    code, report, stderr = run_push(cluster_url, index, state_dir, data)
    assert code == 3, stderr
    assert (report["indexed"], report["dead"]) == (8, 2)
    dead = queue_rows(state_dir, "dead")
    assert sorted(row[4] for row in dead) == [4, 8]
    assert all("mapper_parsing_exception" in row[5] and row[3] == str(data) for row in dead)
    assert count(cluster_url, index) == 8


def test_malformed_lines_are_quarantined_with_line_numbers(cluster_url, index, state_dir, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(b'{"ipa_id": "a1"}\n{not json\n\n{"word": "no id"}\n[1, 2]\n{"ipa_id": ["x"]}\n'
                     b'\xff\xfe\n{"ipa_id": "a2"}')
    code, report, stderr = run_push(cluster_url, index, state_dir, data)
    assert code == 3, stderr
    assert (report["read"], report["indexed"], report["quarantined"]) == (7, 2, 5)
    rows = {row[4]: row[5] for row in queue_rows(state_dir, "dead")}
    assert sorted(rows) == [2, 4, 5, 6, 7]
    assert "malformed JSON" in rows[2] and "missing id field 'ipa_id'" in rows[4]
    assert f"{data}:2: quarantined: malformed JSON" in stderr
    assert all(row[1] == "quarantined" for row in queue_rows(state_dir))
    assert count(cluster_url, index) == 2


def test_faults_on_the_wire_are_absorbed(cluster_url, index, state_dir, tmp_path):
    data = generate(tmp_path / "words.jsonl", 5_000)
    faults = {0: Fault.reply(429, retry_after="0"), 1: Fault.reply(503), 2: Fault.reset(),
              3: Fault.reset(after_forward=True), 4: Fault.truncate_items(), 5: Fault.item_status(429)}
    with FaultProxy(cluster_url) as proxy:
        proxy.plan = lambda request: faults.get(len(proxy.bulk_requests()) - 1) if request.ids else None
        code, report, stderr = run_push(proxy.url, index, state_dir, data,
                                        extra=["--chunk-docs", "1000", "--concurrency", "1"],
                                        env={"PUSHAGENT_MAX_RETRIES": "6"})
    assert code == 0, (json.dumps(report), stderr)
    assert report["retries"] >= 5 and report["indexed"] + report["current"] == 5_000
    assert count(cluster_url, index) == 5_000


def test_exhausted_retries_go_to_the_retry_queue(cluster_url, index, state_dir, tmp_path):
    data = generate(tmp_path / "words.jsonl", 300)
    with FaultProxy(cluster_url) as proxy:
        # Every other item refused: the cluster takes the rest, so the refused ones get max_retries.
        proxy.plan = lambda request: Fault.item_status(429, every=2) if request.ids else None
        code, report, stderr = run_push(proxy.url, index, state_dir, data, env={"PUSHAGENT_MAX_RETRIES": "1"})
        assert len(proxy.bulk_requests()) == 2
    assert code == 3, stderr
    assert (report["queued"], report["retries"]) == (75, 1)
    pending = queue_rows(state_dir, "pending")
    assert len(pending) == 75 and all("429" in row[5] for row in pending)
    assert stderr.count("bulk items refused: 429 es_rejected_execution_exception") == 1


def test_items_all_refused_for_a_while_are_waited_for_not_queued(cluster_url, index, state_dir, tmp_path):
    data = generate(tmp_path / "words.jsonl", 300)
    until = time.monotonic() + 3
    with FaultProxy(cluster_url) as proxy:
        proxy.plan = lambda request: Fault.item_status(429, every=1) if request.ids and time.monotonic() < until \
            else None
        code, report, stderr = run_push(proxy.url, index, state_dir, data,
                                        env={"PUSHAGENT_MAX_RETRIES": "1", "PUSHAGENT_MAX_BACKOFF_SECONDS": "0.5"})
    assert code == 0, stderr
    # The proxy rewrites answers of requests the cluster applied: the retries find them current.
    assert (report["indexed"] + report["current"], report["queued"], report["retries"] > 1) == (300, 0, True)


def test_whole_request_413_splits_down_to_one_document(cluster_url, index, state_dir, tmp_path):
    data = generate(tmp_path / "words.jsonl", 40, dims=4)
    lines = data.read_bytes().splitlines()
    lines[17] = orjson.dumps({"ipa_id": "huge", "blob": "x" * 50_000})
    data.write_bytes(b"\n".join(lines) + b"\n")
    with FaultProxy(cluster_url) as proxy:
        proxy.plan = lambda request: Fault.reply(413) if len(request.body) > 20_000 else None
        code, report, stderr = run_push(proxy.url, index, state_dir, data)
    assert code == 3, stderr
    assert (report["indexed"], report["dead"]) == (39, 1)
    (dead,) = queue_rows(state_dir, "dead")
    assert dead[4] == 18 and "413" in dead[5]


@pytest.mark.parametrize("requeue, stopped", [("false", (1, "failed")), ("true", (75, "interrupted"))])
def test_cluster_down_past_the_outage_budget_stops_with_the_reason(cluster_url, index, state_dir, tmp_path, requeue,
                                                                   stopped):
    data = generate(tmp_path / "words.jsonl", 5_000)
    with FaultProxy(cluster_url) as proxy:
        proxy.plan = lambda request: Fault.reply(503, body=b'{"error":{"type":"unavailable","reason":"restarting"}}') \
            if request.ids else None
        started = time.monotonic()
        code, report, stderr = run_push(proxy.url, index, state_dir, data, extra=["--chunk-docs", "500"],
                                        env={"PUSHAGENT_OUTAGE_SECONDS": "3", "PUSHAGENT_MAX_BACKOFF_SECONDS": "0.5",
                                             "PUSHAGENT_REQUEUE_ON_OUTAGE": requeue})
        elapsed, attempts = time.monotonic() - started, len(proxy.bulk_requests())
    assert (code, report["status"]) == stopped, stderr  # 75 lets the Slurm templates requeue the job
    assert re.search(r"the cluster answered nothing useful for [34] s \(outage_seconds is 3\); last error: HTTP 503",
                     stderr)
    assert 3 <= elapsed < 20 and attempts > 4   # retried for the budget, not a number of attempts
    # One warning for the kind of failure, not one per attempt.
    assert stderr.count("bulk request failed: 503 unavailable: restarting (first time") == 1, stderr
    assert report["read"] == 0 and report["queued"] == 0
    code, report, stderr = run_push(cluster_url, index, state_dir, data, extra=["--chunk-docs", "500"])
    assert (code, report["indexed"]) == (0, 5_000), stderr


def test_a_45_s_outage_mid_push_is_ridden_out_exact(cluster_url, index, state_dir, tmp_path):
    data = generate(tmp_path / "words.jsonl", 6_000)
    with FaultProxy(cluster_url) as proxy:
        proxy.plan = lambda request: Fault.delay(0.2) if request.ids else None
        process = subprocess.Popen(push_command(proxy.url, index, state_dir, data, extra=["--chunk-docs", "500"]),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env=agent_env({"PUSHAGENT_MAX_BACKOFF_SECONDS": "5"}))
        while len(proxy.bulk_requests()) < 4 and process.poll() is None:
            time.sleep(0.02)
        proxy.stop()                 # the cluster is gone: connections refused for 45 s
        time.sleep(45)
        assert process.poll() is None
        proxy.restart()
        stdout, stderr = process.communicate(timeout=120)
    report = json.loads(stdout)
    assert process.returncode == 0, stderr
    assert report["read"] == report["indexed"] + report["current"] == 6_000 and report["queued"] == 0
    assert count(cluster_url, index) == 6_000
    assert "bulk request failed: - ConnectionError" in stderr


def test_a_retry_after_longer_than_the_backoff_cap_is_waited_for(cluster_url, index, state_dir, tmp_path):
    data = generate(tmp_path / "words.jsonl", 500)
    sent = []

    def plan(request):
        if request.ids:
            sent.append(time.monotonic())
            return Fault.reply(429, retry_after="4") if len(sent) == 1 else None
    with FaultProxy(cluster_url, plan) as proxy:
        code, report, stderr = run_push(proxy.url, index, state_dir, data,
                                        env={"PUSHAGENT_MAX_BACKOFF_SECONDS": "0.5"})
    assert code == 0, stderr
    assert sent[1] - sent[0] >= 4


def test_401_stops_with_exit_4_and_keeps_the_checkpoint(cluster_url, index, state_dir, tmp_path):
    data = generate(tmp_path / "words.jsonl", 2_000)
    with FaultProxy(cluster_url) as proxy:
        proxy.plan = lambda request: Fault.reply(401) if len(proxy.bulk_requests()) > 1 else None
        code, report, stderr = run_push(proxy.url, index, state_dir, data,
                                        extra=["--chunk-docs", "500", "--concurrency", "1"])
    assert code == 4, stderr
    assert "doctor" in report["error"] and report["read"] == 500
    code, report, stderr = run_push(cluster_url, index, state_dir, data, extra=["--chunk-docs", "500"])
    assert (code, report["this_run"]["read"]) == (0, 1_500), stderr


def test_dry_run_writes_the_exact_bodies_and_sends_nothing(index, state_dir, tmp_path):
    data = generate(tmp_path / "words.jsonl", 1_200)
    out = tmp_path / "dry"
    code, report, stderr = run_push("http://127.0.0.1:9", index, state_dir, data,
                                    extra=["--dry-run", str(out), "--chunk-docs", "500"])
    assert code == 0, stderr
    assert report["status"] == "dry_run"
    bodies = sorted(out.iterdir())
    assert len(bodies) == 3
    first = bodies[0].read_bytes().splitlines()
    action = orjson.loads(first[0])["index"]
    assert action["_index"] == index and action["version_type"] == "external"
    assert "sync_checksum" in orjson.loads(first[1])
    assert not (state_dir / "runs").exists()


def test_a_second_push_of_the_same_batch_is_refused_while_the_first_runs(cluster_url, index, state_dir, tmp_path):
    data = generate(tmp_path / "words.jsonl", 5_000)
    with FaultProxy(cluster_url) as proxy:
        first = start_slow_push(proxy, index, state_dir, data, ["--chunk-docs", "500"], until_requests=1, delay=0.5)
        code, report, stderr = run_push(proxy.url, index, state_dir, data, extra=["--chunk-docs", "500"])
        first.wait(timeout=120)
    assert code == 2 and "already being pushed" in stderr
    assert first.returncode == 0


@pytest.mark.parametrize("flag", ["--restart", "--from-line"])
def test_restart_and_from_line(cluster_url, index, state_dir, tmp_path, flag):
    data = generate(tmp_path / "words.jsonl", 1_000)
    assert run_push(cluster_url, index, state_dir, data)[0] == 0
    extra = [flag] if flag == "--restart" else [flag, "901"]
    code, report, stderr = run_push(cluster_url, index, state_dir, data, extra=extra)
    assert code == 0, stderr
    assert report["this_run"]["read"] == (1_000 if flag == "--restart" else 100)


def test_api_key_is_sent_and_never_printed(cluster_url, index, state_dir, tmp_path):
    data = generate(tmp_path / "words.jsonl", 50)
    secret = "c2VjcmV0LWtleS1mb3ItdGVzdHM="
    with FaultProxy(cluster_url) as proxy:
        code, report, stderr = run_push(proxy.url, index, state_dir, data, extra=["--debug"],
                                        env={"PUSHAGENT_API_KEY": secret})
        assert {r.headers.get("Authorization") for r in proxy.bulk_requests()} == {f"ApiKey {secret}"}
    assert code == 0
    written = json.dumps(report) + stderr + "".join(p.read_text(errors="replace")
                                                     for p in state_dir.rglob("*") if p.is_file())
    assert secret not in written


def test_plain_http_to_a_remote_host_is_refused(index, state_dir, tmp_path):
    data = generate(tmp_path / "words.jsonl", 5)
    code, report, stderr = run_push("http://search.example.org:9200", index, state_dir, data)
    assert code == 2 and "only loopback" in stderr


def test_unknown_index_is_refused_before_sending(cluster_url, state_dir, tmp_path):
    data = generate(tmp_path / "words.jsonl", 5)
    env = {"PUSHAGENT_ALLOWED_INDICES": "words,words-v2"}
    code, report, stderr = run_push(cluster_url, "other", state_dir, data, env=env)
    assert code == 2 and "not in allowed_indices" in stderr
    assert os.path.exists(str(tmp_path / "words.jsonl"))
