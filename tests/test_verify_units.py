"""Sync-state, audit log, document table and the Elasticsearch PIT shape, without a cluster."""

import dataclasses
import hashlib
import json
import random

import orjson
import pytest
import responses
from click.testing import CliRunner

from pushagent.cli import cli
from pushagent.cluster.client import ClusterClient
from pushagent.cluster.scan import stamped_checksum
from pushagent.config import Config, load_config
from pushagent.documents.builder import Builder, BuildSettings
from pushagent.errors import PushAgentError
from pushagent.runs.checks import settled_count
from pushagent.runs.fullscan import full_scan
from pushagent.runs.sharded import check_finished, shard_states
from pushagent.state.checkpoint import CheckpointStore, RunState
from pushagent.state.doctable import DocTable, combined_sample
from pushagent.state.records import AuditLog, SyncStateStore

pytestmark = pytest.mark.fast

SETTINGS = BuildSettings("id", "words", None, frozenset({"words"}), 1000, "2026-01-01T00:00:00.000Z",
                         embedding_version="v1")


def docs(*records, version=1000, line=1):
    builder = Builder(dataclasses.replace(SETTINGS, batch_version=version))
    return [builder.build(orjson.dumps(record), "in.jsonl", line + n) for n, record in enumerate(records)]


@pytest.fixture
def audit(tmp_path):
    log = AuditLog(tmp_path)
    for number in range(1, 6):
        log.append({"batch_id": f"b{number}", "status": "verified"})
    return log


def audit_cli(state_dir):
    return CliRunner().invoke(cli, ["state", "audit", "--state-dir", str(state_dir), "--json"])


def rewrite(path, change):
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(change(lines)))


def test_intact_audit_log_passes(audit, tmp_path):
    result = audit_cli(tmp_path)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"ok": True, "lines": 5, "bad_line": None, "problem": "", "records": 0,
                                         "record_problems": []}


@pytest.mark.parametrize("change, bad_line, problem", [
    (lambda lines: lines[:2] + [lines[2].replace('"b3"', '"bX"')] + lines[3:], 3, "edited"),
    (lambda lines: lines[:1] + lines[2:], 2, "chain broken"),
    (lambda lines: [lines[0], lines[2], lines[1], *lines[3:]], 2, "chain broken"),
    (lambda lines: lines[:4], 5, "lines were removed from the end"),
    (lambda lines: lines[:4] + [lines[4].replace("verified", "pushed")], 5, "edited"),
])
def test_state_audit_names_the_first_bad_line(audit, tmp_path, change, bad_line, problem):
    rewrite(audit.path, change)
    result = audit_cli(tmp_path)
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert (report["ok"], report["bad_line"]) == (False, bad_line) and problem in report["problem"]


def test_audit_appends_continue_the_chain_after_a_check(audit):
    audit.append({"batch_id": "b6"})
    assert audit.check().ok and audit.check().lines == 6
    entries = list(audit.entries())
    assert all(entries[n]["prev_sha256"] == entries[n - 1]["sha256"] for n in range(1, 6))


def test_an_append_killed_before_moving_the_head_is_repaired_by_the_next(audit, tmp_path):
    head = audit.head.read_bytes()
    audit.append({"batch_id": "b6", "status": "pushed"})
    audit.head.write_bytes(head)                       # killed between the line and the head's move
    assert audit.check().ok and "one entry behind" in audit.check().problem
    audit.append({"batch_id": "b7", "status": "pushed"})
    result = audit_cli(tmp_path)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["lines"] == 7 and json.loads(result.output)["problem"] == ""
    assert [entry["seq"] for entry in audit.entries()] == list(range(1, 8))


def test_an_append_killed_mid_line_is_cut_off_by_the_next(audit, tmp_path):
    with open(audit.path, "ab") as handle:
        handle.write(b'{"seq":6,"prev_sha256":"ab')   # the line never completed, the head never moved
    assert audit.check().ok and "incomplete" in audit.check().problem
    audit.append({"batch_id": "b6", "status": "pushed"})
    check = audit.check()
    assert (check.ok, check.lines, check.problem) == (True, 6, "")


def test_a_sync_state_record_edited_to_say_verified_fails_the_audit(tmp_path):
    from pushagent.runs.record import save_record
    save_record(tmp_path, {"batch_id": "b1", "status": "pushing", "doc_count": 10})
    save_record(tmp_path, {"batch_id": "b1", "status": "verification_failed", "doc_count": 10})
    save_record(tmp_path, {"batch_id": "b2", "status": "verified", "doc_count": 5})
    AuditLog(tmp_path).append({"event": "queue_purge", "batch_id": "b2", "purged": 3})
    assert audit_cli(tmp_path).exit_code == 0
    store = SyncStateStore(tmp_path)
    forged = {**store.load("b1"), "status": "verified"}
    store.save(forged)
    result = audit_cli(tmp_path)
    report = json.loads(result.output)
    assert result.exit_code == 1 and (report["ok"], report["records"]) == (False, 2)
    assert report["record_problems"] == [
        "sync-state/b1.json: differs from the batch's last audit entry (line 2) in status"]
    (tmp_path / "sync-state" / "b3.json").write_text(json.dumps({"batch_id": "b3", "status": "verified"}))
    report = json.loads(audit_cli(tmp_path).output)
    assert "sync-state/b3.json: no audit entry for this batch" in report["record_problems"]


def test_state_list_and_show(tmp_path):
    store = SyncStateStore(tmp_path)
    store.save({"batch_id": "b1", "status": "verified", "started_at": "2026-01-01T00:00:00Z"})
    store.save({"batch_id": "b0", "status": "pushed", "started_at": "2026-01-02T00:00:00Z"})
    listed = CliRunner().invoke(cli, ["state", "list", "--state-dir", str(tmp_path), "--json"])
    assert [row["batch_id"] for row in json.loads(listed.output)] == ["b1", "b0"]
    shown = CliRunner().invoke(cli, ["state", "show", "b0", "--state-dir", str(tmp_path), "--json"])
    assert json.loads(shown.output)["status"] == "pushed"
    missing = CliRunner().invoke(cli, ["state", "show", "nope", "--state-dir", str(tmp_path)])
    assert missing.exit_code == 1 and "no sync-state record for batch 'nope'" in missing.output


def test_doc_table_keeps_the_acknowledged_duplicate_and_counts_repeats(tmp_path):
    table = DocTable(tmp_path / "t.db", sample_size=2, seed="s")
    first, second = docs({"id": "a", "x": 1}, {"id": "a", "x": 2})
    table.add([first])
    table.add([], [second])     # 409: the cluster kept the first
    table.add([first])       # re-sent after a crash: same line, no new duplicate
    newer = docs({"id": "a", "x": 3}, version=2000, line=9)
    table.add([], newer)        # a higher version always wins
    assert table.counts() == {"per_index": {"words": 1}, "distinct": 1, "deleted": 0, "duplicates": 2}
    assert table.sample() == [("words", "a", newer[0].checksum, 2000)] * 2
    assert table.checksum() == hashlib.sha256(newer[0].checksum.encode() + b"\n").hexdigest()


def test_reservoir_sample_is_uniform_and_reproducible(tmp_path):
    records = [{"id": str(n)} for n in range(2_000)]
    built = docs(*records)
    picks = []
    for run in range(2):
        table = DocTable(tmp_path / f"r{run}.db", sample_size=100, seed="batch-1")
        for start in range(0, 2_000, 500):
            table.add(built[start:start + 500])
        picks.append([doc_id for _, doc_id, _, _ in table.sample()])
    assert picks[0] == picks[1] and len(set(picks[0])) == 100
    assert sum(int(doc_id) >= 1_000 for doc_id in picks[0]) in range(30, 71)  # both halves represented


@responses.activate
def test_full_scan_speaks_the_elasticsearch_pit_api(tmp_path):
    url = "http://127.0.0.1:9201"
    table = DocTable(tmp_path / "s.db")
    built = docs({"id": "a"}, {"id": "b"}, {"id": "c"})
    table.add([], built)
    responses.post(f"{url}/words/_pit", json={"id": "PIT-1"},
                   match=[responses.matchers.query_param_matcher({"keep_alive": "5m"})])
    pages = [{"pit_id": "PIT-2", "hits": {"hits": [
        {"_id": "a", "_source": {"sync_checksum": built[0].checksum}, "sort": [0]},
        {"_id": "b", "_source": {"sync_checksum": "0" * 64}, "sort": [1]}]}},
        {"pit_id": "PIT-2", "hits": {"hits": [{"_id": "z", "_source": {"sync_checksum": "1" * 64}, "sort": [2]}]}},
        {"pit_id": "PIT-2", "hits": {"hits": []}}]
    responses.post(f"{url}/_search", json={"_shards": {"total": 2}, "hits": {"total": {"value": 3}, "hits": []}})
    for page in pages:
        responses.post(f"{url}/_search", json=page)
    responses.delete(f"{url}/_pit", json={"succeeded": True})
    client = ClusterClient(Config(url=url))
    result = full_scan(client, table, ["words"], "elasticsearch", stamped_checksum("sync_checksum", "sync_batch"), 10)
    assert (result["missing_ids"], result["extra_ids"], result["mismatched_ids"]) == (["c"], ["z"], ["b"])
    searches = [json.loads(call.request.body) for call in responses.calls if call.request.url.startswith(
        f"{url}/_search")]
    assert searches[0] == {"size": 0, "pit": {"id": "PIT-1", "keep_alive": "5m"}, "track_total_hits": True}
    assert searches[1]["pit"]["id"] == "PIT-1" and searches[2]["pit"]["id"] == "PIT-2"
    assert searches[1]["sort"] == [{"_shard_doc": "asc"}] and searches[2]["search_after"] == [1]
    assert searches[1]["_source"] == ["sync_checksum", "sync_batch"] and "slice" not in searches[1]
    assert json.loads(responses.calls[-1].request.body) == {"id": "PIT-2"}


@responses.activate
def test_verification_requests_ride_out_429_and_503():
    url = "http://127.0.0.1:9201"
    responses.post(f"{url}/words/_count", status=429, headers={"Retry-After": "0"})
    responses.post(f"{url}/words/_count", status=503)
    responses.post(f"{url}/words/_count", json={"count": 7})
    client = ClusterClient(Config(url=url, retry_backoff_seconds=0.01))
    assert client.request("POST", "/words/_count", {"query": {"match_all": {}}}) == {"count": 7}
    responses.post(f"{url}/other/_count", status=429)
    with pytest.raises(PushAgentError, match="HTTP 429"):
        client.request("POST", "/other/_count")


def test_records_carry_the_slurm_job_and_array_ids():
    from pushagent.state.records import runtime_fields
    fields = runtime_fields({"SLURM_JOB_ID": "4242", "SLURM_ARRAY_JOB_ID": "4200", "SLURM_ARRAY_TASK_ID": "7",
                             "SLURM_RESTART_COUNT": "2", "SLURMD_NODENAME": "cn7"})
    assert fields["slurm"] == {"job_id": 4242, "array_job_id": 4200, "array_task_id": 7, "restart_count": 2,
                               "node": "cn7", "job_name": None}
    assert fields["host"] and fields["agent_version"]


def shard_tables(tmp_path, parts) -> list:
    """One table per shard, each with the documents of its part, and its path."""
    paths = []
    for number, part in enumerate(parts):
        table = DocTable(tmp_path / f"shard{number}.db", sample_size=100, seed="b")
        table.add(part)
        table.close()
        paths.append(tmp_path / f"shard{number}.db")
    return paths


def test_merged_shard_tables_hold_the_batch_as_one_table_would(tmp_path):
    built = docs(*({"id": str(n)} for n in range(300)))
    repeated = docs({"id": "7", "x": "again"}, line=900)       # an id the input repeats in another shard
    newer = docs({"id": "8", "x": "newer"}, version=2000, line=901)
    whole = DocTable(tmp_path / "whole.db", sample_size=100, seed="b")
    for part in (built, repeated, newer):
        whole.add([], part)
    merged = DocTable(tmp_path / "merged.db", sample_size=100, seed="b")
    merged.merge(shard_tables(tmp_path, [built[:250], built[250:] + repeated, newer, []]), "b")
    assert merged.counts() == whole.counts() == {"per_index": {"words": 300}, "distinct": 300, "deleted": 0,
                                                        "duplicates": 2}
    assert merged.checksum() == whole.checksum()
    rows = {doc_id: (checksum, version) for doc_id, checksum, version in whole.query(
        "SELECT id, checksum, version FROM docs")}
    sample = merged.sample()   # of input lines, like a push's: a repeated id may be drawn twice
    assert len(sample) == 100 and len({doc_id for _, doc_id, _, _ in sample}) >= 98
    assert all(rows[doc_id] == (checksum, version) for _, doc_id, checksum, version in sample)
    with pytest.raises(PushAgentError, match="this table of a shard's documents is missing"):
        merged.merge([tmp_path / "shard0.db", tmp_path / "gone.db"], "b")


def test_combined_sample_draws_from_each_shard_in_proportion_to_its_size():
    big = (9_000, [("words", f"big{n}") for n in range(100)])
    small = (1_000, [("words", f"small{n}") for n in range(100)])
    picks = [row for seed in range(50) for row in combined_sample([big, small, (0, [])], 100, random.Random(seed))]
    assert len(picks) == 5_000
    assert sum(doc_id.startswith("big") for _, doc_id in picks) in range(4_350, 4_650)   # 90 %, within 3 sigma
    few = (3, [("words", "a"), ("words", "b"), ("words", "c")])
    assert sorted(combined_sample([few, (0, [])], 100, random.Random(1))) == few[1]


def test_verify_refuses_a_sharded_batch_until_every_shard_of_one_split_has_finished(tmp_path):
    store = CheckpointStore(tmp_path)
    # bb's shard 2 is another batch's.
    for key, status in (("b.shard-0-of-3", "pushed"), ("b.shard-1-of-3", "interrupted"), ("bb.shard-2-of-3", "pushed")):
        store.save(RunState("b", [], {}, status=status, key=key))
    with pytest.raises(PushAgentError, match="shard 1/3 is interrupted; shard 2/3 never ran") as refused:
        check_finished("b", shard_states(tmp_path, "b"))
    assert "--batch-id b --shard K/3" in refused.value.hint
    store.save(RunState("b", [], {}, status="pushed", key="b.shard-0-of-2"))
    with pytest.raises(PushAgentError, match="pushed in 2 and in 3 shards"):
        check_finished("b", shard_states(tmp_path, "b"))


def test_a_count_off_the_expected_one_is_final_once_unchanged_for_count_settle_seconds():
    """The count is polled until it equals the expectation, or until it has not moved for the configured
    settle time (several refresh intervals of the index), not a fixed 5 s."""
    class Counting:
        def __init__(self, counts):
            self.counts, self.asked = list(counts), 0

        def request(self, method, path, body):
            self.asked += 1
            return {"count": self.counts.pop(0) if len(self.counts) > 1 else self.counts[0]}

    assert load_config(environ={"PUSHAGENT_COUNT_SETTLE_SECONDS": "30s"}).count_settle_seconds == 30
    moving = Counting([7, 8, 9, 10])
    assert settled_count(moving, "i", {"match_all": {}}, 10, settle_seconds=60) == 10 and moving.asked == 4
    stuck = Counting([9])
    assert settled_count(stuck, "i", {"match_all": {}}, 10, settle_seconds=0.2) == 9 and stuck.asked <= 3
    with pytest.raises(PushAgentError, match="count_settle_seconds must be a positive duration, got 0"):
        load_config(environ={"PUSHAGENT_COUNT_SETTLE_SECONDS": "0"})
