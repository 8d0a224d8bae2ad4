"""Verification and sync-state against the real OpenSearch."""

import hashlib
import json
import signal
import sqlite3
import subprocess
import time

import orjson
import pytest
import requests
from faultproxy import Fault, FaultProxy
from support import agent_env, cli_command, generate, interrupt_after, push_command, run_cli, run_push, wait_for

from pushagent.documents.builder import canonical_checksum

V1 = ["--embedding-version", "v1"]


def verify(url, state_dir, batch_id, *extra):
    return run_cli("verify", "--url", url, "--state-dir", state_dir, "--batch-id", batch_id, *extra)


def record(state_dir, batch_id) -> dict:
    return json.loads((state_dir / "sync-state" / f"{batch_id}.json").read_text())


def refresh(url, index) -> None:
    """Make direct edits searchable now, as if verify ran a while later (the agent itself never refreshes)."""
    requests.post(f"{url}/{index}/_refresh", timeout=60).raise_for_status()


def pushed(cluster_url, index, state_dir, tmp_path, count=3_000, extra=()):
    data = generate(tmp_path / "words.jsonl", count)
    code, report, stderr = run_push(cluster_url, index, state_dir, data, extra=[*V1, *extra])
    assert code == 0, stderr
    return data, report


def test_clean_push_verifies_and_records_every_field(cluster_url, index, state_dir, tmp_path):
    data, report = pushed(cluster_url, index, state_dir, tmp_path)
    assert report["status"] == "verified"
    check = report["verification"]
    assert check["ok"] and check["count"]["expected"] == check["count"]["actual"] == 3_000
    assert check["sample"]["size"] == 100 and not check["sample"]["mismatched"]
    assert check["timestamp"]["older"] == 0
    saved = record(state_dir, report["batch_id"])
    assert saved["status"] == "verified" and saved["doc_count"] == 3_000 and saved["index"] == index
    assert saved["counters"]["indexed"] == 3_000 and saved["cluster"]["version"] == "2.19.1"
    assert {"host", "agent_version", "slurm", "checksum", "started_at", "embedding_version"} <= set(saved)
    assert saved["checksum"] == batch_checksum(data)
    code, listed, _ = run_cli("state", "list", "--state-dir", state_dir)
    assert code == 0 and [r["status"] for r in listed] == ["verified"]
    code, audit, _ = run_cli("state", "audit", "--state-dir", state_dir)
    assert code == 0 and audit["ok"] and audit["lines"] == 3  # pushing, pushed, verified


def batch_checksum(data) -> str:
    """sha256 over the sorted checksums of every record of `data`, one hex digest and newline each."""
    checksums = sorted(canonical_checksum(orjson.loads(line)) for line in data.read_bytes().splitlines())
    return hashlib.sha256("".join(c + "\n" for c in checksums).encode()).hexdigest()


def test_no_verify_leaves_the_batch_pushed(cluster_url, index, state_dir, tmp_path):
    _, report = pushed(cluster_url, index, state_dir, tmp_path, count=200, extra=["--no-verify"])
    assert report["status"] == "pushed" and "verification" not in report
    assert record(state_dir, report["batch_id"])["status"] == "pushed"


def test_duplicated_ids_are_counted_once_and_reported(cluster_url, index, state_dir, tmp_path):
    data = generate(tmp_path / "words.jsonl", 500)
    lines = data.read_bytes().splitlines()
    data.write_bytes(b"\n".join(lines + lines[:7]) + b"\n")
    code, report, stderr = run_push(cluster_url, index, state_dir, data, extra=V1)
    assert code == 0, stderr
    # The later lines win over the earlier ones (external_gte at the same version): all acknowledged.
    assert (report["indexed"], report["current"], report["duplicates"]) == (507, 0, 7)
    count = report["verification"]["count"]
    assert (count["ok"], count["expected"], count["actual"], count["duplicates"]) == (True, 500, 500, 7)


def test_changed_document_is_caught_by_the_sample_and_the_full_scan(cluster_url, index, state_dir, tmp_path):
    _, report = pushed(cluster_url, index, state_dir, tmp_path)
    batch_id = report["batch_id"]
    edited, rewritten = report["verification"]["sample"]["ids"][:2]  # the seeded sample of this batch
    requests.post(f"{cluster_url}/{index}/_update/{edited}", json={"doc": {"word": "changed"}},
                  timeout=30).raise_for_status()
    # Another writer replacing a document with its own content and stamp.
    requests.put(f"{cluster_url}/{index}/_doc/{rewritten}", json={"ipa_id": rewritten, "embedding_version": "v1"},
                 timeout=30).raise_for_status()
    refresh(cluster_url, index)
    code, result, stderr = verify(cluster_url, state_dir, batch_id)
    assert code == 3, stderr
    assert sorted(result["verification"]["sample"]["mismatched"]) == sorted([edited, rewritten])
    assert result["verification"]["count"]["replaced_ids"] == [rewritten]  # it lost the batch stamp
    assert "sample: 2 of 100 sampled documents differ" in result["verification"]["problems"][1]
    code, result, _ = verify(cluster_url, state_dir, batch_id, "--full")
    assert code == 3 and result["verification"]["full"]["mismatched_ids"] == [rewritten]
    code, result, _ = verify(cluster_url, state_dir, batch_id, "--full", "--recompute")
    assert code == 3 and result["verification"]["full"]["mismatched_ids"] == sorted([edited, rewritten])
    assert record(state_dir, batch_id)["status"] == "verification_failed"


def test_deleted_documents_fail_the_count_and_are_enqueued_then_repaired(cluster_url, index, state_dir, tmp_path):
    # Deleted documents leave a tombstone one version above ours for gc_deletes (60 s): a repair inside that
    # window is answered 409. Zero here, so the repair can be shown right away.
    requests.put(f"{cluster_url}/{index}", json={"settings": {"index.gc_deletes": "0s"}}, timeout=30)
    data, report = pushed(cluster_url, index, state_dir, tmp_path)
    batch_id = report["batch_id"]
    deleted = [f"w{n:08d}" for n in range(100, 3_000, 290)]
    for doc_id in deleted:
        requests.delete(f"{cluster_url}/{index}/_doc/{doc_id}", timeout=30).raise_for_status()
    refresh(cluster_url, index)
    code, result, stderr = verify(cluster_url, state_dir, batch_id)
    assert code == 3, stderr
    assert (result["verification"]["count"]["expected"], result["verification"]["count"]["actual"]) == (3_000, 2_990)
    assert "count: 2990 documents carry this batch, 0 were superseded by later batches and 0 were unchanged, " \
        "of 3000" in \
        result["verification"]["problems"][0]
    assert result["verification"]["count"]["missing_ids"] == deleted
    code, result, _ = verify(cluster_url, state_dir, batch_id, "--full", "--enqueue-missing")
    full = result["verification"]["full"]
    assert (code, full["missing_ids"], full["extra"], full["mismatched"]) == (3, deleted, 0, 0)
    assert result["enqueued"] == 10
    items = queued_items(state_dir)
    assert sorted(items) == deleted
    sources = {record["ipa_id"]: record for record in map(orjson.loads, data.read_bytes().splitlines())}
    for doc_id, (version, source) in items.items():
        stamped = orjson.loads(source)
        assert canonical_checksum(stamped, ("embedding_version", "last_updated", "sync_checksum", "sync_batch")) == \
            stamped["sync_checksum"] == canonical_checksum(sources[doc_id])
    assert (drain(cluster_url, state_dir)["indexed"]) == 10
    code, result, stderr = verify(cluster_url, state_dir, batch_id, "--full")
    assert code == 0, (stderr, result)
    assert record(state_dir, batch_id)["status"] == "verified"


def queued_items(state_dir) -> dict:
    with sqlite3.connect(state_dir / "queue.db") as db:
        rows = db.execute("SELECT doc_id, version, source FROM items WHERE kind = 'retryable' AND status = 'pending'"
                          " AND next_attempt_at <= ?", (time.time(),)).fetchall()
    return {doc_id: (version, source) for doc_id, version, source in rows}


def drain(cluster_url, state_dir) -> dict:
    code, report, stderr = run_cli("drain", "--url", cluster_url, "--state-dir", state_dir, "--all")
    assert code == 0, stderr
    return report


def test_records_left_in_the_retry_queue_are_verified_after_the_drain(cluster_url, index, state_dir, tmp_path):
    data = generate(tmp_path / "words.jsonl", 2_000)
    with FaultProxy(cluster_url) as proxy:
        # Every other item of the first chunk refused with 429 and, without in-run retries, queued.
        proxy.plan = lambda request: Fault.item_status(429, every=2) if request.ids[:1] == ["w00000000"] else None
        code, report, stderr = run_push(proxy.url, index, state_dir, data, extra=[*V1, "--chunk-docs", "500"],
                                        env={"PUSHAGENT_MAX_RETRIES": "0"})
    assert (code, report["queued"], report["status"], "verification" in report) == (3, 250, "pushed", False), stderr
    assert "can be verified after `pushagent drain` has sent the 250 records" in stderr
    assert record(state_dir, report["batch_id"])["doc_count"] == 2_000
    assert drain(cluster_url, state_dir)["acked"] == 250
    code, result, stderr = verify(cluster_url, state_dir, report["batch_id"])
    assert code == 0 and result["verification"]["count"]["actual"] == 2_000, stderr


def test_an_older_batch_pushed_after_a_newer_one_verifies(cluster_url, index, state_dir, tmp_path):
    newer = generate(tmp_path / "newer.jsonl", 300, seed=1)
    older = generate(tmp_path / "older.jsonl", 300, seed=2)
    code, _, stderr = run_push(cluster_url, index, state_dir, newer,
                               extra=[*V1, "--batch-time", "2026-01-02T00:00:00Z"])
    assert code == 0, stderr
    code, report, stderr = run_push(cluster_url, index, state_dir, older,
                                    extra=[*V1, "--batch-time", "2026-01-01T00:00:00Z"])
    assert code == 0, stderr
    sample = report["verification"]["sample"]
    assert (report["current"], len(sample["superseded"]), sample["mismatched"]) == (300, 100, [])
    count = report["verification"]["count"]
    assert (count["actual"], count["superseded"], count["missing"]) == (0, 300, 0)


def test_verify_from_sources_without_a_record(cluster_url, index, state_dir, tmp_path):
    data, _ = pushed(cluster_url, index, state_dir, tmp_path, count=1_000, extra=["--no-verify"])
    common = ["--url", cluster_url, "--state-dir", state_dir, "--embedding-version", "v1", "--index", index]
    code, result, stderr = run_cli("verify", *common, "--source", data, "--id-field", "ipa_id", "--full")
    assert code == 0, stderr
    assert result["verification"]["full"]["scanned"] == 1_000 and result["verification"]["sample"]["size"] == 100
    code, result, _ = run_cli("verify", *common, "--expected-count", 1_001)
    assert code == 3 and result["verification"]["count"]["actual"] == 1_000
    code, _, stderr = run_cli("verify", "--url", cluster_url, "--state-dir", state_dir, "--embedding-version", "v1")
    assert code == 2 and "verify needs --batch-id" in stderr


def test_full_scan_of_a_multi_shard_index_sees_every_document(cluster_url, index, state_dir, tmp_path):
    # OpenSearch has no _shard_doc: the scan goes slice by shard, where _doc is unique (two pages a shard).
    requests.put(f"{cluster_url}/{index}", json={"settings": {"number_of_shards": 3, "number_of_replicas": 0}},
                 timeout=30).raise_for_status()
    _, report = pushed(cluster_url, index, state_dir, tmp_path, count=36_000, extra=["--no-verify"])
    code, result, stderr = verify(cluster_url, state_dir, report["batch_id"], "--full")
    assert code == 0, stderr
    assert result["verification"]["full"]["scanned"] == 36_000


def test_interrupted_push_writes_an_interrupted_record(cluster_url, index, state_dir, tmp_path):
    data = generate(tmp_path / "words.jsonl", 6_000)
    with FaultProxy(cluster_url) as proxy:
        proxy.plan = lambda request: Fault.delay(0.2) if request.ids else None
        code, interrupted, stderr = interrupt_after(
            proxy, push_command(proxy.url, index, state_dir, data, extra=["--chunk-docs", "500"]))
    assert code == 75, stderr
    batch_id = interrupted["batch_id"]
    saved = record(state_dir, batch_id)
    assert saved["status"] == "interrupted" and 0 < saved["doc_count"] < 6_000
    code, report, stderr = run_push(cluster_url, index, state_dir, data, extra=["--chunk-docs", "500"])
    assert code == 0 and report["status"] == "verified", stderr
    assert record(state_dir, batch_id)["doc_count"] == 6_000


def test_a_batch_pushed_in_three_shards_is_verified_as_one(cluster_url, index, state_dir, tmp_path):
    data = generate(tmp_path / "words.jsonl", 3_000)
    shard = [*V1, "--batch-id", "words-sharded", "--chunk-docs", "400", "--shard"]
    reports = []
    for part in ("0/3", "1/3"):
        code, report, stderr = run_push(cluster_url, index, state_dir, data, extra=[*shard, part])
        assert (code, report["status"], "verification" in report) == (0, "pushed", False), stderr
        assert f"can be verified after its other shards have finished (this is shard {part})" in stderr
        reports.append(report)
    code, _, stderr = verify(cluster_url, state_dir, "words-sharded")
    assert code == 1 and "cannot be verified before all its shards have finished: shard 2/3 never ran" in stderr
    code, report, stderr = run_push(cluster_url, index, state_dir, data, extra=[*shard, "2/3"])
    assert code == 0, stderr
    reports.append(report)
    code, result, stderr = verify(cluster_url, state_dir, "words-sharded")
    assert code == 0, stderr
    check = result["verification"]
    assert (check["count"]["expected"], check["count"]["actual"], check["sample"]["size"]) == (3_000, 3_000, 100)
    assert result["read"] == sum(r["read"] for r in reports) == 3_000
    saved = record(state_dir, "words-sharded")
    assert (saved["status"], saved["doc_count"], saved["checksum"]) == ("verified", 3_000, batch_checksum(data))
    assert [(s["shard"], s["status"], s["counters"]["read"]) for s in saved["shards"]] == [
        (r["shard"], "pushed", r["read"]) for r in reports]
    code, result, stderr = verify(cluster_url, state_dir, "words-sharded", "--full")
    assert code == 0 and result["verification"]["full"]["scanned"] == 3_000, stderr


def test_full_scan_through_the_elasticsearch_pit_api(es_url, es_index, state_dir, tmp_path):
    # The integ-test zip has no module serving GET / (HTTP 405), so the agent does not know the distribution:
    # the scan tries OpenSearch's PIT API, is refused, and goes on with Elasticsearch's.
    requests.put(f"{es_url}/{es_index}", json={"settings": {"number_of_shards": 3, "number_of_replicas": 0}},
                 timeout=60).raise_for_status()
    _, report = pushed(es_url, es_index, state_dir, tmp_path, count=25_000)
    assert report["status"] == "verified"
    requests.delete(f"{es_url}/{es_index}/_doc/w00000042", timeout=30).raise_for_status()
    refresh(es_url, es_index)
    code, result, _ = verify(es_url, state_dir, report["batch_id"], "--full")
    full = result["verification"]["full"]
    assert (code, full["scanned"], full["missing_ids"]) == (3, 24_999, ["w00000042"])


def test_push_and_full_verify_on_elasticsearch_8(es_url, es_index, state_dir, tmp_path):
    # A proxy answers GET / as a full Elasticsearch would, so the agent knows the distribution and
    # opens Elasticsearch's PIT at once; repeated ids are sent with external_gte, which ES 8 accepts.
    data = generate(tmp_path / "words.jsonl", 2_000)
    lines = data.read_bytes().splitlines()
    data.write_bytes(b"\n".join(lines + lines[:5]) + b"\n")
    root = elasticsearch_root(es_url)
    root_answer = Fault.reply(200, body=orjson.dumps(root))
    with FaultProxy(es_url, plan=lambda request: root_answer if request.path == "/" else None) as proxy:
        code, report, stderr = run_push(proxy.url, es_index, state_dir, data, extra=V1)
        assert (code, report["status"], report["indexed"], report["duplicates"]) == (0, "verified", 2_005, 5), stderr
        code, result, stderr = verify(proxy.url, state_dir, report["batch_id"], "--full")
    assert code == 0 and result["verification"]["full"]["scanned"] == 2_000, stderr
    assert record(state_dir, report["batch_id"])["cluster"] == {
        "name": root["cluster_name"], "version": root["version"]["number"], "distribution": "elasticsearch"}
    scan_paths = [r.path.split("?")[0] for r in proxy.requests if "_pit" in r.path or "point_in_time" in r.path]
    assert scan_paths == [f"/{es_index}/_pit", "/_pit"]


def elasticsearch_root(url) -> dict:
    """What GET / answers on a full Elasticsearch of the node's version (in 8.x, without `distribution`)."""
    nodes = requests.get(f"{url}/_nodes/_local", params={"filter_path": "cluster_name,nodes.*.version"},
                         timeout=30).json()
    version = next(iter(nodes["nodes"].values()))["version"]
    return {"cluster_name": nodes["cluster_name"], "version": {"number": version}}


@pytest.mark.parametrize("name", ["SIGUSR1", "SIGTERM", "SIGINT"])
def test_verify_stops_on_each_signal_with_exit_75(cluster_url, index, state_dir, tmp_path, name):
    _, report = pushed(cluster_url, index, state_dir, tmp_path, count=200)
    with FaultProxy(cluster_url, plan=lambda request: Fault.delay(0.5) if "_count" in request.path else None) as proxy:
        process = subprocess.Popen(cli_command("verify", "--batch-id", report["batch_id"], url=proxy.url,
                                               state_dir=state_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, env=agent_env())
        wait_for(lambda: any("_count" in r.path for r in proxy.requests) or process.poll() is not None)
        process.send_signal(getattr(signal, name))
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 75, stderr
    assert f"verification interrupted by {name}: nothing was recorded; run the same command again" in stderr
    assert record(state_dir, report["batch_id"])["status"] == "verified"    # the push's verification stands


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGKILL"])
def test_a_push_stopped_while_it_verifies_verifies_only_when_run_again(cluster_url, index, state_dir, tmp_path,
                                                                        stop):
    data = generate(tmp_path / "words.jsonl", 500)
    slow_count = lambda request: Fault.delay(1.0) if "_count" in request.path else None  # noqa: E731
    with FaultProxy(cluster_url, plan=slow_count) as proxy:
        code, report, stderr = interrupt_after(
            proxy, push_command(proxy.url, index, state_dir, data, extra=V1), requests=0,
            interrupt=lambda process: (wait_for(lambda: any("_count" in r.path for r in proxy.requests)),
                                       process.send_signal(getattr(signal, stop))))
        assert code == (75 if stop == "SIGTERM" else -9), stderr
        if stop == "SIGTERM":
            assert report["status"] == "pushed" and "verification interrupted; the batch is pushed" in stderr
        sent = len(proxy.bulk_requests())
        code, report, stderr = run_push(proxy.url, index, state_dir, data, extra=V1)
    assert (code, report["status"], report["read"], report["this_run"]["read"]) == (0, "verified", 500, 0), stderr
    assert len(proxy.bulk_requests()) == sent and "is not verified yet: verifying it" in stderr


def test_verify_says_when_missing_records_wait_in_the_retry_queue(cluster_url, index, state_dir, tmp_path):
    _, report = pushed(cluster_url, index, state_dir, tmp_path, count=300)
    for doc_id in ("w00000001", "w00000002"):
        requests.delete(f"{cluster_url}/{index}/_doc/{doc_id}", timeout=30).raise_for_status()
    refresh(cluster_url, index)
    code, result, _ = verify(cluster_url, state_dir, report["batch_id"], "--full", "--enqueue-missing")
    assert (code, result["enqueued"]) == (3, 2)
    code, result, _ = verify(cluster_url, state_dir, report["batch_id"])
    assert code == 3 and result["verification"]["count"]["waiting_in_queue"] == 2
    assert "2 records of this batch are waiting in the retry queue: `pushagent drain --all` sends them" in \
        result["verification"]["problems"][0]
