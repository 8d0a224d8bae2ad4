"""Fixtures: a real OpenSearch (scripts/dev-cluster.sh), per-test indices, CLI runners."""

import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import generate_data  # noqa: E402


@pytest.fixture(scope="session")
def cluster_url():
    """URL of a real single-node OpenSearch: PUSHAGENT_TEST_URL, or one started for this session."""
    if os.environ.get("PUSHAGENT_TEST_URL"):
        yield os.environ["PUSHAGENT_TEST_URL"].rstrip("/")
        return
    # mkdtemp is private to root; the node runs as another user and must reach its directory.
    directory = tempfile.mkdtemp(prefix="pushagent-test-cluster-")
    os.chmod(directory, 0o755)
    script = str(ROOT / "scripts" / "dev-cluster.sh")
    started = subprocess.run([script, "start", directory], capture_output=True, text=True, timeout=600)
    if started.returncode != 0:
        pytest.fail(f"could not start OpenSearch: {started.stderr[-2000:]}")
    try:
        yield started.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run([script, "stop", directory], capture_output=True, timeout=120)
        subprocess.run(["rm", "-rf", directory], timeout=120)


@pytest.fixture
def index(cluster_url):
    """A fresh index name; deleted after the test."""
    name = f"test-{uuid.uuid4().hex[:10]}"
    yield name
    requests.delete(f"{cluster_url}/{name}", timeout=30)


@pytest.fixture
def state_dir(tmp_path):
    path = tmp_path / "state"
    path.mkdir()
    return path


def generate(path: Path, count: int, dims: int = 8, seed: int = 42, start: int = 0) -> Path:
    generate_data.write_records(str(path), count, dims, seed, start)
    return path


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
    env.update({"PUSHAGENT_REQUESTS_PER_MINUTE": "6000", "PUSHAGENT_RETRY_BACKOFF_SECONDS": "0.05"})
    # `python -m pushagent` must run this checkout, not another installed copy.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
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
