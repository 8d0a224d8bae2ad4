"""`pushagent status` verdicts from crafted state files, and the small pieces of progress, logs and metrics."""

import dataclasses
import gzip
import json
import logging
import os
import re
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner

from pushagent.cli import cli
from pushagent.config import load_config
from pushagent.documents.chunker import Position
from pushagent.errors import ConfigError
from pushagent.ops.logs import JsonFormatter, redact
from pushagent.ops.metrics import RunFacts, chunk_size_label, registry_for
from pushagent.ops.progress import Snapshot, bytes_done, estimated_size
from pushagent.state.checkpoint import CheckpointStore, RunState
from pushagent.state.ledger import Ledger
from pushagent.state.records import SyncStateStore
from pushagent.state.retry_queue import QueueItem
from pushagent.state.retry_queue.sqlite_backend import SqliteQueue
from support import generate, run_cli, run_push

HOUR = 3600
DASHBOARD = Path(__file__).resolve().parent.parent / "config" / "grafana" / "pushagent.json"


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def write_run(state_dir, batch_id="words-1", status="pushed", age_s=60, position=Position(1, 0, 0), inputs=None,
              read=100):
    inputs = inputs or [{"path": "/data/words.jsonl", "size": 1000, "mtime_ns": 0, "head_sha256": ""}]
    state = RunState(batch_id, inputs, {}, position=position, status=status, started_at=iso(time.time() - age_s - 5),
                     updated_at=iso(time.time() - age_s))
    state.counters = Ledger(read=read, indexed=read)
    CheckpointStore(state_dir).save(state)


def write_sync_state(state_dir, batch_id, status, age_s):
    """The time fields of a batch's sync-state record, pushed `age_s` ago and verified now."""
    SyncStateStore(state_dir).save({"batch_id": batch_id, "status": status, "started_at": iso(time.time() - age_s - 5),
                                    "finished_at": iso(time.time() - age_s), "updated_at": iso(time.time())})


def dead_items(state_dir, count, pending=0, due=0):
    queue = SqliteQueue(str(Path(state_dir) / "queue.db"))
    make = [QueueItem(f"words/{n}", "words-1", "words", str(n), 1, "index", b"{}", "f", n, "permanent", "mapping")
            for n in range(count + pending)]
    queue.dead_letter(make[:count])
    for number, item in enumerate(make[count:]):
        item.next_attempt_at = time.time() - 10 if number < due else time.time() + HOUR
    queue.put(make[count:])
    queue.close()


def status(state_dir, *extra, env=None):
    result = CliRunner().invoke(cli, ["status", "--json", "--state-dir", str(state_dir), *extra], env=env or {})
    return result.exit_code, json.loads(result.output) if result.output.startswith("{") else result.output


@pytest.mark.parametrize("lag_hours, dead, health, exit_code", [
    (1, 0, "healthy", 0),
    (7, 0, "warning", 1),        # lag > 6 h
    (25, 0, "critical", 2),      # lag > 24 h
    (1, 1, "warning", 1),        # dead > 0
    (1, 1000, "warning", 1),
    (1, 1001, "critical", 2),    # dead > 1000
    (25, 1, "critical", 2),      # the worst check wins
])
def test_status_verdict_for_each_threshold(state_dir, lag_hours, dead, health, exit_code):
    write_run(state_dir, age_s=lag_hours * HOUR)
    write_sync_state(state_dir, "words-1", "verified", lag_hours * HOUR)
    dead_items(state_dir, dead)
    code, report = status(state_dir)
    assert (code, report["health"]) == (exit_code, health), report
    assert report["queue"]["dead"] == dead
    assert abs(report["sync_lag_s"] - lag_hours * HOUR) < 60
    assert len(report["reasons"]) == (lag_hours > 6) + (dead > 0)


def test_thresholds_come_from_the_configuration(state_dir):
    write_run(state_dir, age_s=2 * HOUR)
    write_sync_state(state_dir, "words-1", "verified", 2 * HOUR)
    dead_items(state_dir, 5)
    assert status(state_dir)[0] == 1
    env = {"PUSHAGENT_HEALTH_LAG_WARNING": "1h", "PUSHAGENT_HEALTH_LAG_CRITICAL": "90m",
           "PUSHAGENT_HEALTH_DEAD_WARNING": "10"}
    code, report = status(state_dir, env=env)
    assert (code, report["health"]) == (2, "critical") and "over 1.5 h" in report["reasons"][0]["message"]
    assert report["thresholds"]["lag_critical_s"] == 5400


def test_status_reports_progress_resume_position_and_queue(state_dir):
    inputs = [{"path": "/data/a.jsonl", "size": 1000}, {"path": "/data/b.jsonl", "size": 3000}]
    write_run(state_dir, "words-2", status="interrupted", position=Position(1, 1000, 40), inputs=inputs)
    write_sync_state(state_dir, "words-1", "verified", HOUR)
    dead_items(state_dir, 0, pending=5, due=2)
    code, report = status(state_dir)
    run = report["last_run"]
    assert code == 0 and run["batch_id"] == "words-2" and run["status"] == "interrupted"
    assert (run["bytes_done"], run["bytes_total"], run["percent"]) == (2000, 4000, 50.0)
    assert run["next_resume"] == {"file": "/data/b.jsonl", "line": 40, "offset": 1000}
    assert report["queue"] == {"due": 2, "later": 3, "dead": 0, "pending": 5}
    assert report["last_synced"]["batch_id"] == "words-1" and report["last_synced"]["basis"] == "verified"


def test_status_reads_damaged_or_missing_state_defensively(state_dir):
    code, report = status(state_dir)
    assert code == 1 and report["last_run"] is None and "no batch" in report["reasons"][0]["message"]
    (state_dir / "runs").mkdir()
    (state_dir / "runs" / "half.json").write_text('{"batch_id": "x", "sta')
    (state_dir / "runs" / "list.json").write_text("[1, 2]")
    (state_dir / "runs" / "odd.json").write_text('{"batch_id": "odd", "status": "pushed", "counters": 7}')
    (state_dir / "sync-state").mkdir()
    (state_dir / "sync-state" / "half.json").write_text('{"batch_id": "x", "sta')
    code, report = status(state_dir)
    assert code == 1 and report["last_run"] is None and report["last_synced"] is None
    write_run(state_dir, "words-1", read=7)
    code, report = status(state_dir)
    assert report["last_run"]["batch_id"] == "words-1" and report["last_run"]["processed"] == 7
    assert not (state_dir / "queue.db").exists()  # status creates nothing


@pytest.mark.parametrize("run_status, message", [
    ("failed", "last run of words-1 failed"),
    ("verification_failed", "verification of words-1 failed"),
])
def test_a_failed_last_run_is_a_warning(state_dir, run_status, message):
    write_run(state_dir, status=run_status)
    write_sync_state(state_dir, "words-0", "verified", HOUR)
    code, report = status(state_dir)
    assert code == 1 and [r["message"] for r in report["reasons"]][0].startswith(message), report


def test_a_pushing_run_without_its_process_is_a_warning(state_dir):
    write_run(state_dir, "words-3", status="pushing", position=Position(0, 10, 1))
    (state_dir / "runs" / "words-3.lock").write_text("999999999")
    code, report = status(state_dir)
    assert code == 1 and "stopped without finishing" in report["reasons"][-1]["message"]
    (state_dir / "runs" / "words-3.lock").write_text(str(os.getpid()))
    code, report = status(state_dir)
    assert report["last_run"]["running"] is True


def test_status_reads_the_run_state_and_record_a_push_and_a_later_verify_wrote(cluster_url, index, state_dir,
                                                                               tmp_path):
    code, pushed, stderr = run_push(cluster_url, index, state_dir, generate(tmp_path / "words.jsonl", 300))
    assert (code, pushed["status"]) == (0, "verified"), stderr
    code, report = status(state_dir)
    run = report["last_run"]
    assert (code, report["health"], report["reasons"]) == (0, "healthy", []), report
    assert (run["batch_id"], run["status"], run["processed"], run["running"]) == (pushed["batch_id"], "verified",
                                                                                  300, False)
    assert run["counters"] == {name: pushed[name] for name in Ledger().as_dict()}
    assert (run["percent"], run["next_resume"], run["errors"]) == (100.0, None, {"queued": 0, "dead": 0,
                                                                                 "quarantined": 0})
    assert report["last_synced"]["batch_id"] == pushed["batch_id"] and report["sync_lag_s"] < 300
    requests.delete(f"{cluster_url}/{index}/_doc/w00000000", params={"refresh": "true"}, timeout=30).raise_for_status()
    time.sleep(1.1)     # time stamps are to the second: the record must be newer than the checkpoint
    code, verified, stderr = run_cli("verify", "--batch-id", pushed["batch_id"], url=cluster_url, state_dir=state_dir)
    assert (code, verified["status"]) == (3, "verification_failed"), stderr
    code, report = status(state_dir)
    run = report["last_run"]
    assert (run["status"], run["checkpoint_status"]) == ("verification_failed", "verified"), run
    assert code == 1 and report["reasons"][0]["message"].startswith(f"verification of {pushed['batch_id']} failed")


def test_status_text_is_one_verdict_line_then_details(state_dir):
    write_run(state_dir, age_s=30 * HOUR)
    result = CliRunner().invoke(cli, ["status", "--state-dir", str(state_dir)], env={})
    assert result.exit_code == 2
    assert result.output.startswith("pushagent CRITICAL\n  critical: sync lag 30.0 h is over 24.0 h"), result.output


def test_observability_durations_must_be_positive():
    assert load_config(environ={"PUSHAGENT_PROGRESS_SECONDS": "2m"}).progress_seconds == 120
    with pytest.raises(ConfigError, match="push_interval must be positive"):
        load_config(environ={"PUSHAGENT_PUSH_INTERVAL": "0"})


def test_gzip_size_is_estimated_from_its_trailer(tmp_path):
    path = tmp_path / "words.jsonl.gz"
    with gzip.open(path, "wb") as handle:
        handle.write(b'{"ipa_id": "w1"}\n' * 5000)
    assert estimated_size(str(path), path.stat().st_size) == 85_000
    assert estimated_size(str(tmp_path / "plain.jsonl"), 123) == 123
    assert bytes_done([100, 200, 300], Position(1, 50, 3)) == 150
    assert bytes_done([100, 200], Position(2, 0, 0)) == 300


def test_progress_line_has_done_total_rate_and_eta():
    snapshot = Snapshot("words-1", records=45_000, run_records=30_000, bytes_done=450 * 2**20,
                        bytes_total=1000 * 2**20, run_bytes=300 * 2**20, elapsed=20.0, retries=3)
    assert snapshot.line() == ("words-1: 45,000/~100,000 records | 450.0 MiB/1000.0 MiB 45.0% | 1,500 docs/s | "
                               "ETA 0m37s | retries 3 queued 0 dead 0")
    assert snapshot.fields()["eta_s"] == 37
    slowed = dataclasses.replace(snapshot, rate_per_minute=12.5)
    assert slowed.line().endswith("dead 0 | rate 12 req/min") and slowed.fields()["rate_per_minute"] == 12.5


def test_json_log_lines_carry_extra_fields_and_hide_credentials():
    record = logging.LogRecord("pushagent.x", logging.WARNING, "f", 1, "header was %s", ("ApiKey abc123==",), None)
    record.batch_id = "words-1"
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "header was ApiKey ***" and line["batch_id"] == "words-1"
    assert redact("key=s3cr3t-value!", {"PUSHAGENT_API_KEY": "s3cr3t-value"}) == "key=***!"


def test_chunk_size_labels_are_few_and_ordered():
    assert [chunk_size_label(n) for n in (1, 100, 101, 5000, 5001, 10001)] == [
        "1-100", "1-100", "101-500", "2001-5000", "5001-10000", "10001+"]


def fake_facts() -> RunFacts:
    return RunFacts("words-1", "pushed", Ledger(read=10, indexed=9, dead=1), {"200": 2, "429": 1}, 1, 1000, 400,
                    [(0.2, 5), (0.3, 5), (7.0, 5000)], {"due": 0, "later": 1, "dead": 1}, 3.5, time.time(), 50.0)


def exported_names() -> set:
    registry = registry_for(fake_facts())
    return {sample.name for family in registry.collect() for sample in family.samples}


def test_grafana_dashboard_is_importable_and_charts_only_exported_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    inputs = {i["name"]: i for i in dashboard["__inputs"]}
    assert inputs["DS_PROMETHEUS"]["type"] == "datasource" and inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 30
    assert "id" not in dashboard or dashboard["id"] is None
    names, titles = exported_names(), []
    for panel in dashboard["panels"]:
        titles.append(panel["title"])
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}"
        for target in panel["targets"]:
            used = {word for word in _words(target["expr"]) if word.startswith("pushagent_")}
            assert used and used <= names, (panel["title"], used - names)
    for wanted in ("per hour", "latency", "queue", "outcome", "last success"):
        assert any(wanted in title.lower() for title in titles), wanted


def _words(expr: str) -> set:
    return set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr))
