"""Sync-state, audit log, document table and the Elasticsearch PIT shape, without a cluster."""

import dataclasses
import hashlib
import json

import orjson
import pytest
import responses
from click.testing import CliRunner

from pushagent.builder import Builder, BuildSettings
from pushagent.cli import cli
from pushagent.cluster import ClusterClient
from pushagent.config import Config
from pushagent.doctable import DocTable
from pushagent.errors import PushAgentError
from pushagent.fullscan import full_scan, stamped_checksum
from pushagent.state import AuditLog, SyncStateStore

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
    assert json.loads(result.output) == {"ok": True, "lines": 5, "bad_line": None, "problem": ""}


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
    table.add([first], replace_equal=True)
    table.add([second], replace_equal=False)     # 409: the cluster kept the first
    table.add([first], replace_equal=True)       # re-sent after a crash: same line, no new duplicate
    newer = docs({"id": "a", "x": 3}, version=2000, line=9)
    table.add(newer, replace_equal=False)        # a higher version always wins
    assert table.counts() == {"per_index": {"words": 1}, "distinct": 1, "duplicates": 2}
    assert table.sample() == [("words", "a", newer[0].checksum, 2000)] * 2
    assert table.checksum() == hashlib.sha256(newer[0].checksum.encode() + b"\n").hexdigest()


def test_reservoir_sample_is_uniform_and_reproducible(tmp_path):
    records = [{"id": str(n)} for n in range(2_000)]
    built = docs(*records)
    picks = []
    for run in range(2):
        table = DocTable(tmp_path / f"r{run}.db", sample_size=100, seed="batch-1")
        for start in range(0, 2_000, 500):
            table.add(built[start:start + 500], replace_equal=True)
        picks.append([doc_id for _, doc_id, _, _ in table.sample()])
    assert picks[0] == picks[1] and len(set(picks[0])) == 100
    assert sum(int(doc_id) >= 1_000 for doc_id in picks[0]) in range(30, 71)  # both halves represented


@responses.activate
def test_full_scan_speaks_the_elasticsearch_pit_api(tmp_path):
    url = "http://127.0.0.1:9201"
    table = DocTable(tmp_path / "s.db")
    built = docs({"id": "a"}, {"id": "b"}, {"id": "c"})
    table.add(built, replace_equal=False)
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
    result = full_scan(client, table, ["words"], "elasticsearch", stamped_checksum("sync_checksum"), 10)
    assert (result["missing_ids"], result["extra_ids"], result["mismatched_ids"]) == (["c"], ["z"], ["b"])
    searches = [json.loads(call.request.body) for call in responses.calls if call.request.url.startswith(
        f"{url}/_search")]
    assert searches[0] == {"size": 0, "pit": {"id": "PIT-1", "keep_alive": "5m"}, "track_total_hits": True}
    assert searches[1]["pit"]["id"] == "PIT-1" and searches[2]["pit"]["id"] == "PIT-2"
    assert searches[1]["sort"] == [{"_shard_doc": "asc"}] and searches[2]["search_after"] == [1]
    assert searches[1]["_source"] == ["sync_checksum"] and "slice" not in searches[1]
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
    from pushagent.state import runtime_fields
    fields = runtime_fields({"SLURM_JOB_ID": "4242", "SLURM_ARRAY_JOB_ID": "4200", "SLURM_ARRAY_TASK_ID": "7"})
    assert fields["slurm"] == {"job_id": "4242", "array_job_id": "4200", "array_task_id": "7"}
    assert fields["host"] and fields["agent_version"]
