"""Fixtures: a real OpenSearch (scripts/dev-cluster.sh), per-test indices, state dirs."""

import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support import ROOT  # noqa: E402


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


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One real redis-server for the session (no persistence); tests flush their database."""
    from redisserver import RedisServer
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "redis"])
def queue_url(request, tmp_path):
    """A retry-queue URL on each backend: a fresh SQLite file, or an emptied database of `redis_server`."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'queue.db'}"
    import redis
    server = request.getfixturevalue("redis_server")
    redis.Redis.from_url(server.url(1)).flushdb()
    return server.url(1)
