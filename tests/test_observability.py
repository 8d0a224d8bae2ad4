"""Progress, logs and metrics of real pushes: a pseudo-terminal, a redirected log, a textfile, a Pushgateway."""

import json
import os
import pty
import re
import select
import shutil
import socket
import subprocess
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from support import agent_env, free_port, generate, push_command, run_push

SECRET = "c2VjcmV0LWlkOnNlY3JldC1hcGkta2V5"


def samples(text: str) -> dict:
    """(name, sorted label items) -> value, from Prometheus text."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: dict, name: str, **labels) -> float:
    matches = [v for (n, items), v in found.items() if n == name and labels.items() <= dict(items).items()]
    assert len(matches) == 1, (name, labels, matches)
    return matches[0]


def with_bad_lines(path, count):
    """Append lines without an id: quarantined, so the dead letter is not empty."""
    with open(path, "a") as handle:
        for n in range(count):
            handle.write(json.dumps({"word": f"no-id-{n}"}) + "\n")
    return path


def run_on_pty(command, env, timeout=120) -> str:
    """Run `command` with a pseudo-terminal as stdin, stdout and stderr; return everything it wrote."""
    master, slave = pty.openpty()
    process = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    output, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                output += data
            elif process.poll() is not None:
                break
        assert process.wait(timeout=30) == 0, output.decode(errors="replace")
    finally:
        os.close(master)
    return output.decode(errors="replace")


def test_live_bar_on_a_pseudo_terminal(cluster_url, index, state_dir, tmp_path):
    data = generate(tmp_path / "words.jsonl", 2_000)
    env = agent_env({"PUSHAGENT_REQUESTS_PER_MINUTE": "600", "COLUMNS": "160"})
    output = run_on_pty(push_command(cluster_url, index, state_dir, data, extra=["--chunk-docs", "200"]), env)
    assert "\r" in output, output                       # the bar redraws in place
    assert "100%|" in output and "2,000 records" in output, output
    assert "docs/s" in output and "retries 0" in output, output
    assert " progress " not in output                   # no plain lines on a terminal
    assert "\nverifying batch " in output.replace("\r", "")   # its own line once the bar has ended


def test_periodic_progress_lines_in_a_redirected_log(cluster_url, index, state_dir, tmp_path):
    data = generate(tmp_path / "words.jsonl", 1_500)
    log_path = tmp_path / "slurm-1234.out"
    env = agent_env({"PUSHAGENT_PROGRESS_SECONDS": "0.3", "PUSHAGENT_REQUESTS_PER_MINUTE": "300"})
    with open(log_path, "w") as log:
        completed = subprocess.run(push_command(cluster_url, index, state_dir, data, extra=["--chunk-docs", "100"]),
                                   stdout=subprocess.DEVNULL, stderr=log, env=env, timeout=300)
    text = log_path.read_text()
    assert completed.returncode == 0, text
    lines = [line for line in text.splitlines() if " INFO progress " in line]
    assert len(lines) >= 4, text
    assert "\r" not in text and "%|" not in text
    for line in lines:
        assert "records |" in line and "docs/s" in line and "ETA " in line and "retries " in line, line
    done = [int(re.search(r": ([\d,]+)(/~[\d,]+)? records", line).group(1).replace(",", "")) for line in lines]
    assert done == sorted(done) and done[-1] == 1_500
    assert "1,500/~1,500 records" in lines[-1] and "100.0%" in lines[-1]


def test_json_logs_carry_chunk_facts_and_never_the_api_key(cluster_url, index, state_dir, tmp_path):
    data = generate(tmp_path / "words.jsonl", 600)
    code, report, stderr = run_push(cluster_url, index, state_dir, data, extra=["--chunk-docs", "200",
                                    "--log-format", "json"], env={"PUSHAGENT_API_KEY": SECRET})
    assert code == 0, stderr
    events = [json.loads(line) for line in stderr.splitlines()]
    chunks = [e for e in events if e.get("event") == "chunk"]
    assert sorted(e["chunk"] for e in chunks) == [0, 1, 2]
    for event in chunks:
        assert event["batch_id"] == report["batch_id"] and event["status"] == "ok"
        assert event["latency_s"] > 0 and event["docs"] == 200 and event["level"] == "info"
    assert [e for e in events if e.get("event") == "progress"][-1]["records"] == 600
    assert SECRET not in stderr


def test_quiet_hides_progress_and_verbose_shows_chunks(cluster_url, index, state_dir, tmp_path):
    data = generate(tmp_path / "words.jsonl", 400)
    code, _, quiet = run_push(cluster_url, index, state_dir, data, extra=["-q", "--restart"])
    assert code == 0 and "progress" not in quiet and "chunk" not in quiet, quiet
    code, _, verbose = run_push(cluster_url, index, state_dir, data, extra=["-v", "--restart", "--chunk-docs", "200"])
    assert code == 0 and "DEBUG chunk 1: ok, 200 records" in verbose, verbose


def test_metrics_textfile_equals_the_runs_ledger(cluster_url, index, state_dir, tmp_path):
    data = with_bad_lines(generate(tmp_path / "words.jsonl", 1_000), 3)
    metrics_file = tmp_path / "textfile" / "pushagent.prom"
    metrics_file.parent.mkdir()
    started = time.time()
    code, report, stderr = run_push(cluster_url, index, state_dir, data, extra=["--chunk-docs", "300"],
                                    env={"PUSHAGENT_METRICS_FILE": str(metrics_file)})
    assert code == 3, stderr  # finished, with quarantined records
    found = samples(metrics_file.read_text())
    for outcome in ("indexed", "current", "queued", "dead", "quarantined"):
        assert value(found, "pushagent_documents_total", outcome=outcome) == report[outcome]
    assert value(found, "pushagent_records_read_total") == report["read"] == 1_003
    assert value(found, "pushagent_bulk_requests_total", status="200") == report["requests"] == 4
    assert value(found, "pushagent_retries_total") == report["retries"]
    assert value(found, "pushagent_request_rate_per_minute") == report["rate_per_minute"] == 6000
    assert value(found, "pushagent_sent_bytes_total", encoding="raw") == report["bytes_raw"]
    assert value(found, "pushagent_sent_bytes_total", encoding="wire") == report["bytes_sent"]
    # 1,000 documents in requests of 300: three of 101-500 documents, one of 1-100.
    assert value(found, "pushagent_request_duration_seconds_count", chunk_size="101-500") == 3
    assert value(found, "pushagent_request_duration_seconds_count", chunk_size="1-100") == 1
    assert value(found, "pushagent_queue_items", state="dead") == 3
    assert value(found, "pushagent_queue_items", state="due") == 0
    assert report["status"] == "verified"  # metrics are written once verification has run
    assert value(found, "pushagent_run_info", status="verified", batch_id=report["batch_id"]) == 1
    assert abs(value(found, "pushagent_run_duration_seconds") - report["duration_s"]) < 0.01
    assert started <= value(found, "pushagent_last_success_timestamp_seconds") <= time.time()
    assert list(metrics_file.parent.iterdir()) == [metrics_file]  # the temp file was renamed, not left


@pytest.fixture
def pushgateway(tmp_path):
    """A real Pushgateway on a loopback port, persisting into tmp_path; stopped by PID."""
    binary = shutil.which("prometheus-pushgateway")
    assert binary, "prometheus-pushgateway is missing: run scripts/install.sh"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([binary, f"--web.listen-address=127.0.0.1:{port}",
                                f"--persistence.file={tmp_path / 'pushgateway.data'}", "--persistence.interval=1s"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not _ready(url):
            assert process.poll() is None and time.monotonic() < deadline, "the Pushgateway did not start"
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _ready(url) -> bool:
    try:
        return requests.get(f"{url}/-/ready", timeout=1).status_code == 200
    except requests.RequestException:
        return False


def pushed(url) -> dict:
    found = samples(requests.get(f"{url}/metrics", timeout=10).text)
    return {key: v for key, v in found.items() if ("job", "pushagent") in key[1]}


def test_metrics_pushed_to_a_real_pushgateway_during_and_after_the_run(cluster_url, index, state_dir, tmp_path,
                                                                       pushgateway):
    data = generate(tmp_path / "words.jsonl", 1_500)
    env = agent_env({"PUSHAGENT_PUSHGATEWAY_URL": pushgateway, "PUSHAGENT_PUSH_INTERVAL": "0.2",
                     "PUSHAGENT_REQUESTS_PER_MINUTE": "300"})
    process = subprocess.Popen(push_command(cluster_url, index, state_dir, data, extra=["--chunk-docs", "100"]),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    seen_during = False
    while process.poll() is None:
        seen_during = seen_during or any(n == "pushagent_run_info" and ("status", "pushing") in labels
                                         for n, labels in pushed(pushgateway))
        time.sleep(0.1)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert seen_during, "no push during the run"
    report, found = json.loads(stdout), pushed(pushgateway)
    assert value(found, "pushagent_documents_total", outcome="indexed") == report["indexed"] == 1_500
    assert value(found, "pushagent_bulk_requests_total", status="200") == report["requests"]
    assert value(found, "pushagent_run_info", status="verified") == 1
    assert value(found, "pushagent_documents_total", outcome="indexed", instance=socket.gethostname()) == 1_500
