"""Fixtures: a real OpenSearch and Elasticsearch (scripts/dev-cluster.sh), a moto S3 server,
per-test indices and buckets, state dirs."""

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

# The TLS fixtures (certs, nginx) live beside the nginx they start.
pytest_plugins = ["tlsnginx"]


SERVERS = {"cluster_url", "es_url", "moto_server", "redis_server"}


def pytest_collection_modifyitems(items):
    """A test on the SQLite queue that asks for no server (the queue contract's half) is in the fast suite."""
    for item in items:
        call = getattr(item, "callspec", None)
        if call and call.params.get("queue_url") == "sqlite" and not SERVERS & set(item.fixturenames):
            item.add_marker(pytest.mark.fast)


@pytest.fixture(scope="session")
def cluster_url():
    """URL of a real single-node OpenSearch: PUSHAGENT_TEST_URL, or one started for this session."""
    yield from _session_node("opensearch", "PUSHAGENT_TEST_URL")


@pytest.fixture(scope="session")
def es_url():
    """URL of a real single-node Elasticsearch 8: PUSHAGENT_TEST_ES_URL, or one started for this session.

    Only the tests of Elasticsearch's own code paths ask for it, so it starts only when they run.
    """
    yield from _session_node("elasticsearch", "PUSHAGENT_TEST_ES_URL")


def _session_node(distribution: str, url_variable: str):
    """Yield the URL in `url_variable`, or start a `distribution` node with scripts/dev-cluster.sh and stop it after."""
    if os.environ.get(url_variable):
        yield os.environ[url_variable].rstrip("/")
        return
    # mkdtemp is private to root; the node runs as another user and must reach its directory.
    directory = tempfile.mkdtemp(prefix=f"pushagent-test-{distribution}-")
    os.chmod(directory, 0o755)
    script = str(ROOT / "scripts" / "dev-cluster.sh")
    env = {**os.environ, "PUSHAGENT_CLUSTER": distribution}
    started = subprocess.run([script, "start", directory], capture_output=True, text=True, timeout=600, env=env)
    if started.returncode != 0:
        pytest.fail(f"could not start {distribution} (set {url_variable} to use a running one): "
                    f"{started.stderr[-2000:]}")
    try:
        yield started.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run([script, "stop", directory], capture_output=True, timeout=120, env=env)
        subprocess.run(["rm", "-rf", directory], timeout=120)


@pytest.fixture
def index(cluster_url):
    """A fresh index name on the OpenSearch; deleted after the test."""
    yield from _fresh_index(cluster_url)


@pytest.fixture
def es_index(es_url):
    """A fresh index name on the Elasticsearch; deleted after the test."""
    yield from _fresh_index(es_url)


def _fresh_index(url: str):
    name = f"test-{uuid.uuid4().hex[:10]}"
    yield name
    requests.delete(f"{url}/{name}", timeout=30)


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
