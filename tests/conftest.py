"""Fixtures: a real OpenSearch (scripts/dev-cluster.sh), a moto S3 server, per-test indices and buckets, state dirs."""

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support import ROOT, S3_TEST_ENV, free_port  # noqa: E402


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
def moto_server():
    """URL of moto's standalone S3 server on a loopback port, stopped by PID after the session.

    The dummy AWS_* variables are set for this process and every agent it starts.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("AWS_PROFILE", raising=False)
        for name, value in S3_TEST_ENV.items():
            patch.setenv(name, value)
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_until_up(url, server)
            yield url
        finally:
            os.kill(server.pid, signal.SIGTERM)
            server.wait(timeout=30)


def _wait_until_up(url, server, seconds=60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail("moto server exited; install the test extras: pip install -e '.[test]'")
        try:
            requests.get(url, timeout=1)
            return
        except requests.ConnectionError:
            time.sleep(0.1)
    pytest.fail(f"moto server did not answer at {url} within {seconds} s")


@pytest.fixture
def s3_client(moto_server):
    import boto3
    return boto3.client("s3", endpoint_url=moto_server)


@pytest.fixture
def bucket(s3_client):
    """A fresh, empty bucket on the moto server."""
    name = f"pushagent-{uuid.uuid4().hex[:10]}"
    s3_client.create_bucket(Bucket=name)
    return name


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
