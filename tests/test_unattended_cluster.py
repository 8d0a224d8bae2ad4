"""Unattended runs against the real OpenSearch: drain backoff under --all, --wait, purge and resolution."""

import json
import time

import orjson
import requests
from bench_queue import queue_items
from faultproxy import Fault, FaultProxy
from support import count, fill_queue, generate, queue_stats, run_cli, run_push

from pushagent.state.records import AuditLog
from pushagent.state.retry_queue import open_queue


def test_a_5_s_burst_of_item_429s_during_drain_all_dead_letters_nothing(cluster_url, index, tmp_path, queue_url):
    data = generate(tmp_path / "words.jsonl", 500)
    fill_queue(queue_url, data, index)
    until = []

    def plan(request):
        if request.ids and not until:
            until.append(time.monotonic() + 5)
        return Fault.item_status(429, every=1) if request.ids and time.monotonic() < until[0] else None
    with FaultProxy(cluster_url, plan) as proxy:
        code, report, stderr = run_cli("drain", "--all", url=proxy.url, queue_url=queue_url,
                                       env={"PUSHAGENT_MAX_ATTEMPTS": "2", "PUSHAGENT_CHUNK_DOCS": "100",
                                            "PUSHAGENT_MAX_BACKOFF_SECONDS": "1"})
        sends = len(proxy.bulk_requests())
    assert code == 0, stderr
    assert (report["dead"], report["queued"], report["acked"]) == (0, 0, 500)
    assert sends > 5 and report["remaining"] == {"due": 0, "later": 0, "leased": 0, "dead": 0}
    assert "bulk items refused: 429 es_rejected_execution_exception" in stderr
    assert count(cluster_url, index) == 500


def test_drain_all_does_not_take_again_an_item_it_just_failed(cluster_url, index, tmp_path, queue_url):
    data = generate(tmp_path / "words.jsonl", 2)
    fill_queue(queue_url, data, index)
    with FaultProxy(cluster_url) as proxy:
        # The first item of every request refused, the other taken: a partial answer, so max_retries applies.
        proxy.plan = lambda request: Fault.item_status(429, every=2) if request.ids else None
        code, report, stderr = run_cli("drain", "--all", url=proxy.url, queue_url=queue_url,
                                       env={"PUSHAGENT_MAX_RETRIES": "0", "PUSHAGENT_MAX_ATTEMPTS": "8"})
        sent = proxy.id_counts()
    assert code == 3, stderr
    assert (report["read"], report["acked"], report["queued"], report["dead"]) == (2, 1, 1, 0)
    assert sorted(sent.values()) == [1, 1]            # the refused item was not taken again at once
    (item,) = open_queue(queue_url).list()
    assert item.attempts == 1 and item.next_attempt_at > time.time() + 60


def test_drain_wait_sends_items_once_they_fall_due(cluster_url, index, tmp_path, queue_url):
    data = generate(tmp_path / "words.jsonl", 50)
    items = queue_items(data, index)
    for item in items:
        item.next_attempt_at = time.time() + 3
    queue = open_queue(queue_url)
    queue.put(items)
    queue.close()
    code, report, stderr = run_cli("drain", url=cluster_url, queue_url=queue_url)
    assert (code, report["read"], report["remaining"]["later"]) == (3, 0, 50), stderr
    started = time.monotonic()
    code, report, stderr = run_cli("drain", "--wait", "60", url=cluster_url, queue_url=queue_url)
    assert (code, report["acked"]) == (0, 50), stderr
    assert 2 < time.monotonic() - started < 30


def mapping_errors(path, good_frequency: bool):
    """20 records; two of them (lines 4 and 8) do not fit a `long` field unless `good_frequency`."""
    path.write_bytes(b"\n".join(orjson.dumps({"ipa_id": f"m{n}", "frequency": n if good_frequency or n not in (3, 7)
                                              else "lots"}) for n in range(20)) + b"\n")
    return path


def dead_reasons(state_dir) -> list:
    code, health, _ = run_cli("status", "--state-dir", state_dir)
    return [r["message"] for r in health["reasons"] if "dead" in r["message"]]


def test_a_later_write_of_the_same_id_resolves_its_dead_items(cluster_url, index, state_dir, tmp_path):
    requests.put(f"{cluster_url}/{index}", json={"mappings": {"properties": {"frequency": {"type": "long"}}}},
                 timeout=30).raise_for_status()
    code, report, stderr = run_push(cluster_url, index, state_dir, mapping_errors(tmp_path / "bad.jsonl", False),
                                    extra=["--batch-time", "2026-01-01T00:00:00Z"])
    assert (code, report["dead"]) == (3, 2), stderr
    assert queue_stats(f"sqlite://{state_dir / 'queue.db'}")["dead"] == 2 and dead_reasons(state_dir)
    code, report, stderr = run_push(cluster_url, index, state_dir, mapping_errors(tmp_path / "fixed.jsonl", True),
                                    extra=["--batch-time", "2026-01-02T00:00:00Z"])
    assert code == 0, stderr
    assert queue_stats(f"sqlite://{state_dir / 'queue.db'}")["dead"] == 0 and not dead_reasons(state_dir)


def test_an_acknowledged_delete_resolves_the_older_queued_index_item(cluster_url, index, state_dir, tmp_path):
    data = generate(tmp_path / "words.jsonl", 40)
    env = {"PUSHAGENT_MAX_RETRIES": "0", "PUSHAGENT_OP_FIELD": "op", "PUSHAGENT_ALLOW_DELETE": "true"}
    with FaultProxy(cluster_url) as proxy:
        proxy.plan = lambda request: Fault.item_status(429, every=2) if request.ids else None
        code, report, stderr = run_push(proxy.url, index, state_dir, data, env=env,
                                        extra=["--batch-time", "2026-01-01T00:00:00Z"])
    assert (code, report["queued"]) == (3, 20), stderr
    deletes = tmp_path / "deletes.jsonl"
    deletes.write_bytes(b"".join(orjson.dumps({"ipa_id": json.loads(line)["ipa_id"], "op": "delete"}) + b"\n"
                                 for line in data.read_bytes().splitlines()))
    code, report, stderr = run_push(cluster_url, index, state_dir, deletes, env=env,
                                    extra=["--batch-time", "2026-01-02T00:00:00Z", "--no-verify"])
    assert (code, report["indexed"]) == (0, 40), stderr
    queue_url = f"sqlite://{state_dir / 'queue.db'}"
    assert queue_stats(queue_url)["pending"] == 0          # nothing left that could bring a deleted id back
    code, report, stderr = run_cli("drain", "--all", url=cluster_url, queue_url=queue_url)
    assert (code, report["read"]) == (0, 0), stderr
    assert count(cluster_url, index) == 0


def test_queue_purge_by_reason_batch_and_age_is_audited(cluster_url, index, state_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"ipa_id": "a"}\n{not json\n{"word": "no id"}\n{"ipa_id": "b"}\n')
    code, report, stderr = run_push(cluster_url, index, state_dir, bad)
    assert (code, report["quarantined"]) == (3, 2), stderr
    assert dead_reasons(state_dir)
    code, result, stderr = run_cli("queue", "purge", "--older-than", "1h", state_dir=state_dir)
    assert (code, result["purged"]) == (0, 0), stderr
    code, result, stderr = run_cli("queue", "purge", "--reason", "malformed JSON", "--batch-id", report["batch_id"],
                                   state_dir=state_dir)
    assert (code, result["purged"]) == (0, 1), stderr
    code, result, stderr = run_cli("queue", "purge", state_dir=state_dir)
    assert (code, result["purged"]) == (0, 1), stderr
    assert not dead_reasons(state_dir)
    purges = [entry["record"] for entry in AuditLog(state_dir).entries() if entry["record"].get("event")]
    assert [(p["event"], p["purged"], p["reason_contains"]) for p in purges] == [
        ("queue_purge", 0, None), ("queue_purge", 1, "malformed JSON"), ("queue_purge", 1, None)]
    code, audit, stderr = run_cli("state", "audit", "--state-dir", state_dir)
    assert code == 0 and audit["ok"], (audit, stderr)


def test_array_tasks_split_the_keys_budget(cluster_url, index, state_dir, tmp_path):
    data = generate(tmp_path / "words.jsonl", 100)
    code, report, stderr = run_push(cluster_url, index, state_dir, data,
                                    env={"PUSHAGENT_REQUESTS_PER_MINUTE": "600", "SLURM_ARRAY_TASK_COUNT": "4"})
    assert (code, report["rate_per_minute"]) == (0, 150), stderr


def test_the_first_warning_of_an_error_never_shows_the_key(cluster_url, index, state_dir, tmp_path):
    key = "c2VjcmV0LWtleS1pZDpzZWNyZXQta2V5LXZhbHVl"
    echoed = orjson.dumps({"error": {"type": "too_many_requests", "reason": f"rejected ApiKey {key} for now"}})
    sent = []

    def plan(request):
        if request.ids:
            sent.append(request.number)
            return Fault.reply(429, body=echoed) if len(sent) == 1 else None
    with FaultProxy(cluster_url, plan) as proxy:
        code, report, stderr = run_push(proxy.url, index, state_dir, generate(tmp_path / "words.jsonl", 50),
                                        env={"PUSHAGENT_API_KEY": key})
    assert code == 0, stderr
    assert "bulk request failed: 429 too_many_requests: rejected ApiKey [REDACTED] for now" in stderr
    assert key not in stderr and key not in json.dumps(report)
