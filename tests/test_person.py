"""What a person sees: summaries on stdout, messages that answer the question asked, nothing internal."""

import dataclasses
import gzip
import os
import re
import subprocess
import sys
import time

import orjson
import pytest
import requests
from support import ROOT, agent_env, count, generate, queue_items, run_cli, run_push

from pushagent.config import Config
from pushagent.ops.doctor import Doctor
from pushagent.ops.progress import MAX_DEFLATE_RATIO, estimated_size
from pushagent.ops.status import format_status
from pushagent.ops.summary import summary_lines
from pushagent.state.retry_queue import open_queue

REPR = re.compile(r"\{'|\[\('|\['|\bNone\b")


def human(*args, env=None, timeout=300):
    """(exit code, stdout, stderr) of one pushagent command without --json."""
    completed = subprocess.run([sys.executable, "-m", "pushagent", *map(str, args)], capture_output=True, text=True,
                               timeout=timeout, env=agent_env(env))
    return completed.returncode, completed.stdout, completed.stderr


def where(cluster_url, index, state_dir):
    return ["--url", cluster_url, "--index", index, "--id-field", "ipa_id", "--state-dir", state_dir]


def with_bad_line(path, number):
    lines = path.read_text().splitlines(keepends=True)
    lines[number - 1] = "not json\n"
    path.write_text("".join(lines))
    return path


def test_push_prints_a_short_summary_on_stdout_with_the_facts_of_the_json_report(cluster_url, index, state_dir,
                                                                                 tmp_path):
    data = with_bad_line(generate(tmp_path / "words.jsonl", 301), 301)
    code, out, err = human("push", data, *where(cluster_url, index, state_dir))
    assert code == 3, err
    lines = out.splitlines()
    assert len(lines) <= 10 and lines[0].startswith("batch words-"), out
    assert lines[0].endswith(": verified; 1 record not in the index"), out
    assert lines[1] == "  read 301, indexed 300, current 0, queued 0, dead 0, quarantined 1"
    assert "    count      ok   300 documents in the index, 300 expected" in lines
    batch = lines[0].split()[1].rstrip(":")
    assert lines[-1] == (f"  next: `pushagent queue list --status dead --batch-id {batch}` shows why 1 record "
                         "was refused")
    assert "read 301" not in err and "verification" not in err.lower().replace("verifying", "")
    code, report, err = run_push(cluster_url, index, state_dir, data, extra=["--restart"])
    summary = "\n".join(summary_lines(report))
    for name in ("read", "indexed", "current", "queued", "dead", "quarantined"):
        assert f"{name} {report[name]}" in summary


def test_verify_full_names_the_first_missing_ids_and_what_to_do(cluster_url, index, state_dir, tmp_path):
    data = generate(tmp_path / "words.jsonl", 50)
    code, report, err = run_push(cluster_url, index, state_dir, data, extra=["--no-verify"])
    assert code == 0, err
    for doc_id in ("w00000007", "w00000003"):
        requests.delete(f"{cluster_url}/{index}/_doc/{doc_id}?refresh=true", timeout=30).raise_for_status()
    batch = report["batch_id"]
    code, out, err = human("verify", "--batch-id", batch, "--full", *where(cluster_url, index, state_dir))
    assert code == 3, err
    assert "    full scan  FAIL 2 missing (w00000003, w00000007), 0 mismatched, 0 extra" in out.splitlines(), out
    assert out.splitlines()[-1] == (f"  next: `pushagent verify --batch-id {batch} --full --repair`, then "
                                    f"`pushagent drain --all --batch-id {batch}`")
    assert f"scanning batch {batch}" in err


def test_drain_with_nothing_due_says_how_many_wait_until_when_and_that_all_exists(tmp_path):
    data = generate(tmp_path / "words.jsonl", 3)
    due_at = time.time() + 600
    queue = open_queue(f"sqlite://{tmp_path / 'state' / 'queue.db'}")
    queue.put([dataclasses.replace(item, next_attempt_at=due_at) for item in queue_items(data, "words")])
    queue.close()
    code, out, err = human("drain", "--state-dir", tmp_path / "state", "--url", "http://127.0.0.1:9")
    assert code == 3, err
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(due_at)))
    assert out.splitlines() == [
        "batch (all batches): nothing was due, nothing sent",
        f"  next: 3 items are waiting for the next attempt, the next due {when}: `pushagent drain --all` sends "
        "them now, `--wait 10m` waits for them"]
    code, report, err = run_cli("drain", state_dir=tmp_path / "state", url="http://127.0.0.1:9")
    assert report["next_due_at"] == when and report["remaining"]["later"] == 3


def test_a_dry_run_reports_what_it_would_send_not_indexed(state_dir, tmp_path):
    data = generate(tmp_path / "words.jsonl", 4)
    code, report, err = run_push("http://127.0.0.1:9", "words", state_dir, data, extra=["--dry-run", tmp_path / "d"])
    assert code == 0, err
    assert "indexed" not in report and report["would_send"] == 4 and report["this_run"]["would_send"] == 4
    code, out, err = human("push", data, "--url", "http://127.0.0.1:9", "--index", "words", "--id-field", "ipa_id",
                           "--state-dir", state_dir, "--dry-run", tmp_path / "d2")
    assert out.splitlines()[:2] == ["batch words-" + report["batch_id"].split("-", 1)[1] + ": dry run finished, "
                                    "nothing was sent", "  read 4, would send 4, current 0, queued 0, dead 0, "
                                    "quarantined 0"], out


def test_on_error_stop_reads_no_line_after_the_first_quarantined_one(cluster_url, index, state_dir, tmp_path):
    data = with_bad_line(generate(tmp_path / "words.jsonl", 3_000), 10)
    code, report, err = run_push(cluster_url, index, state_dir, data,
                                 extra=["--on-error", "stop", "--chunk-docs", "1000"])
    assert code == 3 and report["status"] == "stopped", err
    assert (report["read"], report["indexed"], report["quarantined"]) == (10, 9, 1)
    assert count(cluster_url, index) == 9
    code, out, err = human("push", "--help")
    assert "read no line after the first quarantined one" in " ".join(out.split())


def test_verify_full_does_not_count_dead_lettered_records_as_missing(cluster_url, index, state_dir, tmp_path):
    requests.put(f"{cluster_url}/{index}", json={"mappings": {"properties": {"frequency": {"type": "long"}}}},
                 timeout=30).raise_for_status()
    data = tmp_path / "mixed.jsonl"
    data.write_bytes(b"".join(orjson.dumps({"ipa_id": f"m{n}", "frequency": "lots" if n in (3, 7) else n}) + b"\n"
                              for n in range(10)))
    code, report, err = run_push(cluster_url, index, state_dir, data, extra=["--no-verify"])
    assert code == 3 and report["dead"] == 2, err
    code, verified, err = run_cli("verify", "--batch-id", report["batch_id"], "--full", "--index", index,
                                  url=cluster_url, state_dir=state_dir)
    full = verified["verification"]["full"]
    assert code == 0 and (full["missing"], full["missing_ids"], full["ok"]) == (0, [], True), err


def test_doctor_says_the_queue_in_words(tmp_path):
    queue = open_queue(f"sqlite://{tmp_path / 'state' / 'queue.db'}")
    queue.put(queue_items(generate(tmp_path / "words.jsonl", 2), "words"))
    queue.close()
    checks = Doctor(Config(url="http://127.0.0.1:9", index="words", state_dir=str(tmp_path / "state")),
                    environ={}).run()
    detail = next(check.detail for check in checks if check.name == "queue")
    assert re.search(r"reachable: 2 due now, 0 later, 0 leased, 0 dead, oldest 0m0\ds old$", detail), detail


def test_doctor_with_a_refused_key_file_does_not_say_the_key_was_accepted(cluster_url, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("not-a-real-key\n")
    key_file.chmod(0o644)
    config = Config(url=cluster_url, index="words", state_dir=str(tmp_path / "state"), api_key_file=str(key_file))
    checks = {check.name: (check.status, check.detail) for check in Doctor(config, environ={}).run()}
    assert checks["credentials"][0] == "fail" and "chmod 600" in checks["credentials"][1]
    assert checks["authentication"] == ("skip", "no credentials were sent (see the credentials check); the cluster "
                                                "answers requests without them")


def test_doctor_compares_the_clock_when_the_cluster_sends_no_date_header(cluster_url, tmp_path):
    assert "date" not in requests.get(cluster_url, timeout=30).headers
    checks = Doctor(Config(url=cluster_url, index="words", state_dir=str(tmp_path / "state")), environ={}).run()
    clock = next(check for check in checks if check.name == "clock")
    assert clock.status == "ok" and clock.detail.startswith("this machine is "), clock


def test_status_tells_a_verify_that_failed_after_the_push(cluster_url, index, state_dir, tmp_path):
    code, report, err = run_push(cluster_url, index, state_dir, generate(tmp_path / "words.jsonl", 20))
    assert code == 0, err
    requests.delete(f"{cluster_url}/{index}/_doc/w00000001?refresh=true", timeout=30).raise_for_status()
    code, _, err = run_cli("verify", "--batch-id", report["batch_id"], "--index", index, url=cluster_url,
                           state_dir=state_dir)
    assert code == 3, err
    code, out, err = human("status", "--state-dir", state_dir)
    assert f"  last run: {report['batch_id']} verification failed, 20 records" in out, out
    assert "resumes" not in out


def test_status_says_where_a_resume_starts_in_words():
    run = {"batch_id": "b", "status": "interrupted", "running": False, "processed": 0, "percent": 0.0,
           "updated_at": "2026-12-01T00:00:00Z", "next_resume": {"file": "a.jsonl", "line": 0, "offset": 0}}
    report = {"health": "warning", "reasons": [], "last_run": run, "last_synced": None,
              "queue": {"due": 0, "later": 0, "dead": 0}}
    assert "  the same command resumes at the start of a.jsonl" in format_status(report).splitlines()
    run["next_resume"]["line"] = 1200
    assert "  the same command resumes after line 1,200 of a.jsonl" in format_status(report).splitlines()


def test_queue_stats_and_list_on_a_new_state_dir_create_nothing(tmp_path):
    state = tmp_path / "new" / "state"
    assert human("queue", "stats", "--state-dir", state)[1] == "queue: 0 due now, 0 later, 0 leased, 0 dead\n"
    assert human("queue", "list", "--state-dir", state)[1] == "no items\n"
    code, report, err = run_cli("queue", "stats", state_dir=state)
    assert code == 0 and report["pending"] == 0 and not (tmp_path / "new").exists()


def test_state_list_prints_a_header(cluster_url, index, state_dir, tmp_path):
    code, report, err = run_push(cluster_url, index, state_dir, generate(tmp_path / "words.jsonl", 5),
                                 extra=["--no-verify"])
    lines = human("state", "list", "--state-dir", state_dir)[1].splitlines()
    assert lines[0].split() == ["batch", "id", "status", "updated", "at", "index", "embedding", "version", "doc",
                                "count"]
    assert lines[1].split()[:2] == [report["batch_id"], "pushed"] and lines[1].split()[-2:] == ["-", "5"]


def test_a_truncated_gzip_is_not_taken_for_gigabytes(tmp_path):
    whole = tmp_path / "whole.jsonl.gz"
    whole.write_bytes(gzip.compress(b"".join(b'{"ipa_id": "w%d", "n": %d}\n' % (n, n) for n in range(20_000))))
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole.read_bytes()[:-1000] + b"\xff\xff\xff\xc0")   # a trailer of about 3.3 GiB
    assert estimated_size(str(cut), cut.stat().st_size) == cut.stat().st_size
    assert estimated_size(str(whole), whole.stat().st_size) < whole.stat().st_size * MAX_DEFLATE_RATIO


@pytest.mark.skipif(os.geteuid() != 0, reason="the node runs as another user only when started as root")
def test_dev_cluster_refuses_a_directory_its_node_cannot_reach(tmp_path):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    private.chmod(0o700)
    # pytest's own base directory may be 0700 too: the first one on the way is the one named.
    private = next(path for path in [*reversed(private.parents), private] if not path.stat().st_mode & 0o001)
    mode = f"{private.stat().st_mode & 0o777:o}"
    start = [str(ROOT / "scripts" / "dev-cluster.sh"), "start", str(tmp_path / "private" / "node"), "1"]
    completed = subprocess.run(start, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 2 and completed.stdout == ""
    assert completed.stderr == (f"dev-cluster: the node runs as user pushagent-search, who cannot enter {private} "
                                f"(mode {mode}): give a DIR outside it, or chmod o+x '{private}'\n")


def _keys(value) -> set:
    if isinstance(value, dict):
        return set(value) | {key for item in value.values() for key in _keys(item)}
    if isinstance(value, list):
        return {key for item in value for key in _keys(item)}
    return set()


def test_no_command_prints_a_raw_key_name_or_a_python_repr_to_a_person(cluster_url, index, state_dir, tmp_path):
    data = with_bad_line(generate(tmp_path / "words.jsonl", 30), 30)
    requests.put(f"{cluster_url}/{index}", timeout=30).raise_for_status()
    push = ["push", data, *where(cluster_url, index, state_dir)]
    batch = run_cli(*push)[1]["batch_id"]
    requests.delete(f"{cluster_url}/{index}/_doc/w00000002?refresh=true", timeout=30).raise_for_status()
    at = ["--state-dir", state_dir]
    commands = [push + ["--restart"], ["verify", "--batch-id", batch, *where(cluster_url, index, state_dir)],
                ["verify", "--batch-id", batch, "--full", *where(cluster_url, index, state_dir)],
                ["drain", "--url", cluster_url, *at], ["queue", "stats", *at], ["queue", "list", *at],
                ["state", "list", *at], ["status", *at], ["doctor", "--url", cluster_url, "--index", index, *at]]
    for command in commands:
        keys = {key for key in _keys(run_cli(*command)[1]) if "_" in key}
        code, out, err = human(*command)
        assert out.strip(), (command, err)
        assert not REPR.search(out) and not REPR.search(err), (command, out, err)
        shown = {key for key in keys if re.search(rf"(?<![\w`/-]){re.escape(key)}(?![\w`])", out)}
        assert not shown, (command, shown, out)
