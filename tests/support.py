"""Helpers shared by the tests: sample data, running the CLI, reading the cluster."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
# Dummy credentials for the moto S3 server (which accepts any): boto3 signs with them. Never real ones.
S3_TEST_ENV = {"AWS_ACCESS_KEY_ID": "pushagent-test-key-id", "AWS_SECRET_ACCESS_KEY": "pushagent-test-secret-key",
               "AWS_SESSION_TOKEN": "pushagent-test-session-token", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
sys.path.insert(0, str(ROOT / "scripts"))

import generate_data  # noqa: E402
from bench_queue import queue_items  # noqa: E402

from pushagent.state.retry_queue import open_queue  # noqa: E402


def generate(path: Path, count: int, dims: int = 8, seed: int = 42, start: int = 0) -> Path:
    generate_data.write_records(str(path), count, dims, seed, start)
    return path


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports: the probes stay bound until all are chosen, so no port comes twice."""
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def free_port() -> int:
    return free_ports(1)[0]


def push_command(url, index, state_dir, *inputs, extra=()):
    return [sys.executable, "-m", "pushagent", "push", *map(str, inputs), "--url", url, "--index", index,
            "--id-field", "ipa_id", "--state-dir", str(state_dir), "--json", *extra]


def run_push(url, index, state_dir, *inputs, extra=(), env=None, timeout=600):
    """Run `pushagent push` in a subprocess; returns (exit code, report or None, stderr)."""
    completed = subprocess.run(push_command(url, index, state_dir, *inputs, extra=extra), capture_output=True,
                               text=True, timeout=timeout, env=agent_env(env))
    report = json.loads(completed.stdout) if completed.stdout.strip() else None
    return completed.returncode, report, completed.stderr


def agent_env(extra=None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PUSHAGENT_")}
    # `python -m pushagent` must run this checkout, not an installed copy.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    # A count that differs from the expected one settles within 2 refresh intervals of the test nodes' 1 s.
    env.update({"PUSHAGENT_REQUESTS_PER_MINUTE": "6000", "PUSHAGENT_RETRY_BACKOFF_SECONDS": "0.05",
                "PUSHAGENT_COUNT_SETTLE_SECONDS": "2"})
    env.update(extra or {})
    return env


def count(url, index) -> int:
    requests.post(f"{url}/{index}/_refresh", timeout=60)
    return requests.get(f"{url}/{index}/_count", timeout=60).json()["count"]


def stored_checksums(url, index) -> dict:
    """_id -> sync_checksum of every document, through the scroll API."""
    requests.post(f"{url}/{index}/_refresh", timeout=60)
    found = {}
    page = requests.post(f"{url}/{index}/_search?scroll=1m", json={"size": 10000, "_source": ["sync_checksum"]},
                         timeout=120).json()
    while page["hits"]["hits"]:
        found.update({hit["_id"]: hit["_source"]["sync_checksum"] for hit in page["hits"]["hits"]})
        page = requests.post(f"{url}/_search/scroll", json={"scroll": "1m", "scroll_id": page["_scroll_id"]},
                             timeout=120).json()
    return found


def cli_command(*args, url=None, state_dir=None, queue_url=None):
    command = [sys.executable, "-m", "pushagent", *map(str, args), "--json"]
    for flag, value in (("--url", url), ("--state-dir", state_dir), ("--queue-url", queue_url)):
        if value is not None:
            command += [flag, str(value)]
    return command


def run_cli(*args, env=None, timeout=300, **where):
    """(exit code, JSON report or None, stderr) of one pushagent command."""
    completed = subprocess.run(cli_command(*args, **where), capture_output=True, text=True, timeout=timeout,
                               env=agent_env(env))
    report = json.loads(completed.stdout) if completed.stdout.strip() else None
    return completed.returncode, report, completed.stderr


def fill_queue(queue_url, path, index, batch_id="b1") -> set:
    """Queue every record of `path` as a due retryable item; returns the ids."""
    items = queue_items(path, index, batch_id)
    queue = open_queue(queue_url)
    try:
        queue.put(items)
    finally:
        queue.close()
    return {item.doc_id for item in items}


def queue_stats(queue_url) -> dict:
    queue = open_queue(queue_url)
    try:
        return queue.stats()
    finally:
        queue.close()


def queued_ids(queue_url) -> set:
    queue = open_queue(queue_url)
    try:
        return {item.doc_id for item in queue.list(limit=10**7)}
    finally:
        queue.close()


def wait_for(condition, seconds=120):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def interrupt_after(proxy, command, requests=3, env=None, timeout=120, interrupt=None):
    """Run `command` through `proxy`; once `requests` bulk requests arrived, `interrupt(process)` (default SIGTERM).

    Returns (exit code, JSON report or None, stderr).
    """
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=agent_env(env))
    wait_for(lambda: len(proxy.bulk_requests()) >= requests or process.poll() is not None)
    (interrupt or (lambda running: running.send_signal(signal.SIGTERM)))(process)
    stdout, stderr = process.communicate(timeout=timeout)
    return process.returncode, json.loads(stdout) if stdout.strip() else None, stderr
