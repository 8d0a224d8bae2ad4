"""Many batches, one index (SPEC section 10), against the real OpenSearch: each batch is proved on its own."""

import json
import os
import shutil

import orjson
import requests
from support import generate, run_cli, run_push

V1 = ["--embedding-version", "v1"]
DELETES = {"PUSHAGENT_OP_FIELD": "op", "PUSHAGENT_ALLOW_DELETE": "true"}


def verify(url, state_dir, batch_id, *extra):
    return run_cli("verify", "--url", url, "--state-dir", state_dir, "--batch-id", batch_id, *extra)


def record(state_dir, batch_id) -> dict:
    return json.loads((state_dir / "sync-state" / f"{batch_id}.json").read_text())


def source(url, index, doc_id) -> dict | None:
    answer = requests.get(f"{url}/{index}/_doc/{doc_id}", timeout=30).json()
    return answer["_source"] if answer.get("found") else None


def write_lines(path, records):
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    return path


def push(url, index, state_dir, data, batch_id, batch_time, *extra, env=None):
    code, report, stderr = run_push(url, index, state_dir, data, env=env,
                                    extra=[*V1, "--batch-id", batch_id, "--batch-time", batch_time, *extra])
    return code, report, stderr


def test_batches_into_one_index_each_verify_and_the_older_stays_verified(cluster_url, index, state_dir, tmp_path):
    first = generate(tmp_path / "words-0001.jsonl", 300)
    second = generate(tmp_path / "words-0002.jsonl", 300, seed=7, start=200)   # ids 200-499, new content
    code, report, stderr = push(cluster_url, index, state_dir, first, "words-0001", "2026-01-01T00:00:00Z")
    assert (code, report["status"]) == (0, "verified"), stderr
    code, report, stderr = push(cluster_url, index, state_dir, second, "words-0002", "2026-01-02T00:00:00Z")
    assert (code, report["status"]) == (0, "verified"), stderr
    count = report["verification"]["count"]
    assert (count["expected"], count["actual"], count["superseded"], count["embedding_version_count"]) == \
        (300, 300, 0, 500)
    assert report["verification"]["timestamp"]["older"] == 0      # the first batch's documents are not ours
    code, result, stderr = verify(cluster_url, state_dir, "words-0001")
    assert code == 0, (stderr, result)
    count = result["verification"]["count"]
    assert (count["actual"], count["superseded"], count["missing"]) == (200, 100, 0)
    assert record(state_dir, "words-0001")["status"] == "verified"
    stamps = {source(cluster_url, index, f"w{n:08d}")["sync_batch"] for n in (0, 199)}
    assert stamps == {"words-0001"} and source(cluster_url, index, "w00000200")["sync_batch"] == "words-0002"
    code, result, _ = verify(cluster_url, state_dir, "words-0001", "--full")
    full = result["verification"]["full"]
    assert (code, full["missing"], full["mismatched"], full["superseded"], full["extra"]) == (0, 0, 0, 100, 200)
    code, result, _ = verify(cluster_url, state_dir, "words-0002", "--snapshot")
    assert code == 3 and "this snapshot's embedding version has 500 documents" in result["verification"]["problems"][0]


def test_a_batch_of_deletes_verifies_the_ids_absent(cluster_url, index, state_dir, tmp_path):
    words = generate(tmp_path / "words.jsonl", 300)
    code, _, stderr = push(cluster_url, index, state_dir, words, "words", "2026-01-01T00:00:00Z")
    assert code == 0, stderr
    gone = [f"w{n:08d}" for n in range(0, 300, 15)]
    deletes = write_lines(tmp_path / "deletes.jsonl", [{"ipa_id": doc_id, "op": "delete"} for doc_id in gone]
                          + [{"ipa_id": "w99999999", "op": "delete"}])     # never existed: 404 is done
    code, report, stderr = push(cluster_url, index, state_dir, deletes, "deletes", "2026-01-02T00:00:00Z", env=DELETES)
    assert (code, report["status"], report["indexed"]) == (0, "verified", 21), stderr
    count = report["verification"]["count"]
    assert (count["expected"], count["deleted"], count["still_present_ids"]) == (0, 21, [])
    assert all(source(cluster_url, index, doc_id) is None for doc_id in gone)
    code, result, stderr = verify(cluster_url, state_dir, "words", "--full")
    assert code == 0, (stderr, result)
    assert (result["verification"]["count"]["superseded"], result["verification"]["full"]["superseded"]) == (20, 20)


def test_a_repeated_id_the_last_line_wins_at_any_concurrency(cluster_url, index, state_dir, tmp_path):
    lines = [{"ipa_id": f"w{n:08d}", "word": f"first-{n}"} for n in range(40)]
    lines += [{"ipa_id": "w00000003", "word": "second"}, *({"ipa_id": f"x{n}"} for n in range(15)),
              {"ipa_id": "w00000003", "word": "third"}, {"ipa_id": "w00000005", "word": "kept"},
              {"ipa_id": "w00000005", "op": "delete"}]
    data = write_lines(tmp_path / "words.jsonl", lines)
    code, report, stderr = push(cluster_url, index, state_dir, data, "repeats", "2026-01-01T00:00:00Z",
                                "--chunk-docs", "4", "--concurrency", "4", env=DELETES)
    assert (code, report["status"], report["duplicates"]) == (0, "verified", 4), stderr
    assert f"{data}:57: id 'w00000003' repeats {data}:41 of this batch: the later line wins" in stderr
    assert source(cluster_url, index, "w00000003")["word"] == "third"
    assert source(cluster_url, index, "w00000005") is None
    assert report["verification"]["count"]["expected"] == 40 + 15 - 1


def test_records_carrying_stamp_fields_are_stamped_with_a_warning(cluster_url, index, state_dir, tmp_path):
    data = write_lines(tmp_path / "words.jsonl", [{"ipa_id": "a", "last_updated": "yesterday", "sync_batch": "x"},
                                                   {"ipa_id": "b", "last_updated": "today"}, {"ipa_id": "c"}])
    code, _, stderr = push(cluster_url, index, state_dir, data, "stamps", "2026-01-01T00:00:00Z")
    assert code == 0, stderr
    assert "their values were replaced: last_updated in 2 records, sync_batch in 1 records" in stderr
    assert source(cluster_url, index, "a")["last_updated"] == "2026-01-01T00:00:00.000Z"


def test_from_line_keeps_the_batch_history(cluster_url, index, state_dir, tmp_path):
    lines = [orjson.dumps({"ipa_id": f"w{n}"}) for n in range(12)]
    lines[5] = b"{not json"
    data = tmp_path / "words.jsonl"
    data.write_bytes(b"\n".join(lines) + b"\n")
    code, report, stderr = push(cluster_url, index, state_dir, data, "history", "2026-01-01T00:00:00Z",
                                "--chunk-docs", "5", "--on-error", "stop")
    # --on-error stop reads no line after the quarantined line 6
    assert (code, report["status"], report["read"]) == (3, "stopped", 6), stderr
    code, report, stderr = push(cluster_url, index, state_dir, data, "history", "2026-01-01T00:00:00Z",
                                "--chunk-docs", "5", "--from-line", "11")
    assert (code, report["read"], report["this_run"]["read"], report["quarantined"]) == (3, 8, 2, 1), stderr
    assert report["status"] == "verified" and report["verification"]["count"]["expected"] == 7


def test_an_index_the_cluster_will_not_create_stops_the_push_before_anything_is_recorded(
        cluster_url, state_dir, tmp_path):
    settings = f"{cluster_url}/_cluster/settings"
    requests.put(settings, json={"persistent": {"action.auto_create_index": "-noauto-*,+*"}},
                 timeout=30).raise_for_status()
    try:
        data = generate(tmp_path / "words.jsonl", 50)
        code, report, stderr = run_push(cluster_url, "noauto-words", state_dir, data)
    finally:
        requests.put(settings, json={"persistent": {"action.auto_create_index": None}}, timeout=30)
    assert code == 2, stderr
    assert "index 'noauto-words' does not exist and the cluster does not create indices" in stderr
    assert (report["dead"], report["queued"], report["read"]) == (0, 0, 0)


def test_an_empty_input_pushes_nothing_and_says_so(cluster_url, index, state_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    code, report, stderr = run_push(cluster_url, index, state_dir, empty, extra=V1)
    assert (code, report["status"], report["read"], report["requests"]) == (0, "pushed", 0, 0), stderr
    assert "the inputs hold no records: nothing was sent" in stderr


def test_repair_restores_documents_edited_and_deleted_by_hand(cluster_url, index, state_dir, tmp_path):
    data = generate(tmp_path / "words.jsonl", 200)
    code, _, stderr = push(cluster_url, index, state_dir, data, "repaired", "2026-01-01T00:00:00Z")
    assert code == 0, stderr
    original = source(cluster_url, index, "w00000007")
    requests.post(f"{cluster_url}/{index}/_update/w00000007", json={"doc": {"word": "edited"}},
                  timeout=30).raise_for_status()
    requests.delete(f"{cluster_url}/{index}/_doc/w00000009", timeout=30).raise_for_status()  # inside gc_deletes
    requests.post(f"{cluster_url}/{index}/_refresh", timeout=30)
    code, result, _ = verify(cluster_url, state_dir, "repaired", "--full", "--recompute", "--repair")
    full = result["verification"]["full"]
    assert (code, full["missing_ids"], full["mismatched_ids"], result["enqueued"]) == \
        (3, ["w00000009"], ["w00000007"], 2)
    code, drained, stderr = run_cli("drain", "--url", cluster_url, "--state-dir", state_dir, "--all")
    assert (code, drained["indexed"], drained["current"]) == (0, 2, 0), stderr
    assert source(cluster_url, index, "w00000007") == original and source(cluster_url, index, "w00000009")
    code, result, stderr = verify(cluster_url, state_dir, "repaired", "--full", "--recompute")
    assert code == 0, (stderr, result)


def test_a_restaged_copy_of_an_older_batch_keeps_its_time_and_overwrites_nothing(cluster_url, index, state_dir,
                                                                                 tmp_path):
    old = generate(tmp_path / "old.jsonl", 100)
    new = generate(tmp_path / "new.jsonl", 100, seed=9)          # the same ids, regenerated later
    os.utime(old, (1_767_225_600, 1_767_225_600))                 # 2026-01-01
    os.utime(new, (1_767_312_000, 1_767_312_000))                 # 2026-01-02
    for data in (old, new):
        code, report, stderr = run_push(cluster_url, index, state_dir, data, extra=V1)
        assert code == 0, stderr
    copy = tmp_path / "copy-of-old.jsonl"
    shutil.copyfile(old, copy)                                    # a fresh mtime, as without cp -p
    code, report, stderr = run_push(cluster_url, index, state_dir, copy, extra=V1)
    assert (code, report["status"], report["indexed"], report["current"]) == (0, "verified", 0, 100), stderr
    assert "keeping that batch time, so that this copy cannot overwrite newer data" in stderr
    assert source(cluster_url, index, "w00000001")["last_updated"] == "2026-01-02T00:00:00.000Z"
    code, report, stderr = run_push(cluster_url, index, state_dir, copy, extra=[*V1, "--batch-time",
                                                                                "2026-01-03T00:00:00Z"])
    assert (code, report["indexed"]) == (0, 100), stderr                # an explicit batch time still wins


def test_shards_share_the_first_shards_input_list_and_the_record_says_incomplete(cluster_url, index, state_dir,
                                                                                 tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for number in range(2):
        generate(folder / f"part{number}.jsonl", 100, start=100 * number)
    shard = [*V1, "--batch-id", "arrayed", "--shard"]
    code, report, stderr = run_push(cluster_url, index, state_dir, f"{folder}/*.jsonl", extra=[*shard, "0/2"])
    assert code == 0, stderr
    saved = record(state_dir, "arrayed")
    assert (saved["status"], saved["waiting_for_shards"], saved["doc_count"]) == ("incomplete", ["1/2"], None)
    code, health, _ = run_cli("status", "--state-dir", state_dir)
    assert code == 1 and "batch arrayed is incomplete: shards 1/2 have not finished" in json.dumps(health)
    generate(folder / "part2.jsonl", 100, start=200)              # appears between the two tasks' starts
    code, report, stderr = run_push(cluster_url, index, state_dir, f"{folder}/*.jsonl", extra=[*shard, "1/2"])
    assert code == 0, stderr
    assert "this shard's inputs differ from the 2 files the batch's first shard found: using those" in stderr
    assert (record(state_dir, "arrayed")["status"], record(state_dir, "arrayed")["waiting_for_shards"]) == \
        ("pushed", [])
    code, result, stderr = verify(cluster_url, state_dir, "arrayed")
    assert code == 0 and result["verification"]["count"]["expected"] == 200, stderr
    (folder / "part0.jsonl").write_bytes(b'{"ipa_id": "changed"}\n')
    code, _, stderr = run_push(cluster_url, index, state_dir, f"{folder}/*.jsonl", extra=[*shard, "1/2"])
    assert code == 2 and "the inputs of batch arrayed changed since its first shard started" in stderr

