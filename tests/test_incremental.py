"""`push --incremental` and `verify --full --delete-extra` against the real OpenSearch (SPEC section 10)."""

import json

import requests
from faultproxy import FaultProxy
from support import generate, run_cli, run_push

V1 = ["--embedding-version", "v1"]
DELETES = {"PUSHAGENT_ALLOW_DELETE": "true"}


def lines_of(path) -> list:
    return path.read_bytes().splitlines(keepends=True)


def snapshot(tmp_path, name, parts) -> object:
    path = tmp_path / name
    path.write_bytes(b"".join(line for part in parts for line in part))
    return path


def push(url, index, state_dir, data, batch_id, day, *extra):
    return run_push(url, index, state_dir, data, env=DELETES,
                    extra=[*V1, "--batch-id", batch_id, "--batch-time", f"2026-01-0{day}T00:00:00Z", *extra])


def verify(url, state_dir, batch_id, *extra):
    return run_cli("verify", "--url", url, "--state-dir", state_dir, "--batch-id", batch_id, *extra,
                   env=DELETES)


def test_a_regenerated_snapshot_sends_only_what_changed_and_sheds_what_it_dropped(cluster_url, index, state_dir,
                                                                                 tmp_path):
    first = generate(tmp_path / "first.jsonl", 1_000)
    code, report, stderr = push(cluster_url, index, state_dir, first, "snap-1", 1)
    assert (code, report["status"]) == (0, "verified"), stderr
    changed = lines_of(generate(tmp_path / "changed.jsonl", 10, seed=99))            # ids 0-9, new content
    new = lines_of(generate(tmp_path / "new.jsonl", 10, seed=5, start=1_000))        # ids 1000-1009
    second = snapshot(tmp_path, "second.jsonl", [changed, lines_of(first)[10:990], new])  # 990-999 dropped
    with FaultProxy(cluster_url) as proxy:
        code, report, stderr = push(proxy.url, index, state_dir, second, "snap-2", 2, "--incremental")
        sent = proxy.id_counts()
    assert (code, report["status"], report["unchanged"], report["indexed"]) == (0, "verified", 980, 20), stderr
    assert sorted(sent) == [f"w{n:08d}" for n in [*range(10), *range(1_000, 1_010)]]
    assert report["verification"]["count"]["unchanged"] == 980
    code, result, stderr = verify(cluster_url, state_dir, "snap-2", "--full")
    full = result["verification"]["full"]
    dropped = [f"w{n:08d}" for n in range(990, 1_000)]
    assert (code, full["extra"], full["extra_ids"]) == (0, 10, dropped), stderr   # reported: not a snapshot
    code, _, stderr = verify(cluster_url, state_dir, "snap-2", "--full", "--delete-extra")
    assert code == 2 and "only for a batch that is the whole index; nothing was deleted" in stderr
    code, result, stderr = verify(cluster_url, state_dir, "snap-2", "--full", "--snapshot", "--delete-extra")
    assert (code, result["deleted_extra"]["deleted"]) == (3, 10), stderr     # the scan ran before the deletion
    code, result, stderr = verify(cluster_url, state_dir, "snap-2", "--full")
    assert (code, result["verification"]["full"]["extra"]) == (0, 0), stderr
    audit = [json.loads(line)["record"] for line in (state_dir / "audit.jsonl").read_text().splitlines()]
    assert [(e["event"], e["deleted"]) for e in audit if e.get("event") == "delete_extra"] == [("delete_extra", 10)]


def test_the_delete_guard_refuses_a_truncated_snapshot(cluster_url, index, state_dir, tmp_path):
    whole = generate(tmp_path / "whole.jsonl", 400)
    code, _, stderr = push(cluster_url, index, state_dir, whole, "whole", 1)
    assert code == 0, stderr
    truncated = snapshot(tmp_path, "truncated.jsonl", [lines_of(whole)[:300]])
    code, report, stderr = push(cluster_url, index, state_dir, truncated, "truncated", 2, "--incremental")
    assert (code, report["unchanged"]) == (0, 300), stderr
    code, result, stderr = verify(cluster_url, state_dir, "truncated", "--full", "--snapshot", "--delete-extra")
    assert code == 2 and "refusing to delete 100 extra documents: 33.3% of the batch's 300, above " \
        "max_delete_fraction (5%); nothing was deleted" in stderr
    requests.post(f"{cluster_url}/{index}/_refresh", timeout=30)
    assert requests.get(f"{cluster_url}/{index}/_count", timeout=30).json()["count"] == 400
    code, health, _ = run_cli("status", "--state-dir", state_dir)
    assert code == 1 and "the index holds 100 documents this snapshot does not" in json.dumps(health)
    code, result, stderr = verify(cluster_url, state_dir, "truncated", "--full", "--delete-extra", "--force")
    assert (code, result["deleted_extra"]["deleted"]) == (3, 100), stderr


def test_a_document_changed_by_hand_is_sent_again_by_the_next_incremental_push(cluster_url, index, state_dir,
                                                                              tmp_path):
    data = generate(tmp_path / "words.jsonl", 200)
    code, _, stderr = push(cluster_url, index, state_dir, data, "day-1", 1)
    assert code == 0, stderr
    requests.post(f"{cluster_url}/{index}/_update/w00000042", json={"doc": {"word": "edited by hand"}},
                  timeout=30).raise_for_status()
    with FaultProxy(cluster_url) as proxy:
        code, report, stderr = push(proxy.url, index, state_dir, data, "day-2", 2, "--incremental")
        sent = proxy.id_counts()
    assert (code, report["status"], report["unchanged"], list(sent)) == (0, "verified", 199, ["w00000042"]), stderr
    answer = requests.get(f"{cluster_url}/{index}/_doc/w00000042", timeout=30).json()["_source"]
    assert answer["word"] != "edited by hand" and answer["sync_batch"] == "day-2"
    # A state directory that never saw this index has no versions to expect: the stamps themselves decide.
    code, report, stderr = push(cluster_url, index, tmp_path / "elsewhere", data, "day-3", 3, "--incremental")
    assert (code, report["status"], report["unchanged"], report["requests"]) == (0, "verified", 200, 0), stderr
