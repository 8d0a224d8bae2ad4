"""`pushagent doctor`: stubbed Elasticsearch/OpenSearch answers (responses) and the real cluster via nginx."""

import email.utils
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import responses
from click.testing import CliRunner
from faultproxy import FaultProxy
from support import ROOT, agent_env
from tlsnginx import KEY, tls_env

from pushagent.cli import cli
from pushagent.config import Config
from pushagent.ops.doctor import Doctor, auto_create_allows
from pushagent.state.durability import mount_of, redis_durability, sqlite_durability

BASE = "http://localhost:9201"
ES_ROOT = {"cluster_name": "prod", "version": {"number": "8.13.0", "build_flavor": "default"}}
OS_ROOT = {"cluster_name": "search", "version": {"distribution": "opensearch", "number": "2.19.1"}}


def privileges(**granted):
    return {"username": "pusher", "has_all_requested": False,
            "index": {"words": {p: granted.get(p, False) for p in ("read", "index", "write", "delete", "manage")}}}


@pytest.fixture
def stub():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


def cluster(stub, root=ES_ROOT, status=200, skew=0.0, index_status=200):
    date = email.utils.formatdate(time.time() + skew, usegmt=True)
    stub.get(BASE + "/", json=root, status=status, headers={"Date": date})
    stub.head(BASE + "/words", status=index_status)
    stub.get(BASE + "/_security/_authenticate", json={"username": "pusher"})


def run_doctor(tmp_path, **config) -> dict:
    values = {"url": BASE, "index": "words", "state_dir": str(tmp_path / "state"), **config}
    checks = Doctor(Config(**values), environ={"PUSHAGENT_API_KEY": KEY}).run()
    return {check.name: (check.status, check.detail) for check in checks}


def test_key_with_read_and_index_only_passes_everything(stub, tmp_path):
    cluster(stub)
    stub.post(BASE + "/_security/user/_has_privileges", json=privileges(read=True, index=True))
    checks = run_doctor(tmp_path)
    assert list(checks) == ["credentials", "tls", "reachability", "authentication", "cluster", "clock",
                            "privileges:words", "index:words", "queue", "state_dir", "durability"]
    assert checks["privileges:words"] == ("ok", "read and write granted; no delete or manage")
    assert checks["cluster"] == ("ok", "prod: elasticsearch 8.13.0")
    assert checks["credentials"] == ("ok", "API key from PUSHAGENT_API_KEY")
    assert checks["clock"][0] == "ok" and checks["index:words"] == ("ok", "exists")
    sent = json.loads(next(call for call in stub.calls if "_has_privileges" in call.request.url).request.body)
    assert sent["index"][0]["names"] == ["words"]


def test_missing_write_fails_and_delete_or_manage_warns(stub, tmp_path):
    cluster(stub)
    stub.post(BASE + "/_security/user/_has_privileges", json=privileges(read=True))
    assert run_doctor(tmp_path)["privileges:words"] == (
        "fail", "the key lacks write on words: ask the cluster operator for read and write (or index) on it")
    stub.replace(responses.POST, BASE + "/_security/user/_has_privileges", json=privileges(index=True))
    assert run_doctor(tmp_path)["privileges:words"][1].startswith("the key lacks read on words")
    stub.replace(responses.POST, BASE + "/_security/user/_has_privileges",
                 json=privileges(read=True, write=True, index=True, delete=True, manage=True))
    assert run_doctor(tmp_path)["privileges:words"] == (
        "warn", "read and write granted, but the key can also delete and manage: a key with read and index only "
                "is safer")


def test_privileges_not_checkable_is_said_not_guessed(stub, tmp_path):
    cluster(stub)
    stub.post(BASE + "/_security/user/_has_privileges", status=500, json={"error": "security is not enabled"})
    assert run_doctor(tmp_path)["privileges"] == (
        "skip", "not checkable: _has_privileges answered HTTP 500 (security disabled?)")
    stub.replace(responses.GET, BASE + "/", json=OS_ROOT, headers={"Date": email.utils.formatdate(usegmt=True)})
    stub.get(BASE + "/_plugins/_security/authinfo", json={"user_name": "pusher", "roles": ["words_writer"]})
    status, detail = run_doctor(tmp_path)["privileges"]
    assert status == "skip" and "not checkable" in detail and "['words_writer']" in detail


def test_no_security_api_skips_the_privilege_probe_without_sending_it(stub, tmp_path):
    # Elasticsearch 7 without security would route the POST as a typed index request (a CRITICAL deprecation).
    cluster(stub)
    stub.replace(responses.GET, BASE + "/_security/_authenticate", status=405,
                 json={"error": "Incorrect HTTP method for uri [/_security/_authenticate] and method [GET], "
                                "allowed: [POST]", "status": 405})
    assert run_doctor(tmp_path)["privileges"] == (
        "skip", "not checkable: _security/_authenticate answered HTTP 405 (security disabled?)")
    assert not [call for call in stub.calls if "_has_privileges" in call.request.url]


def test_get_root_refused_falls_back_to_the_node_info(stub, tmp_path):
    cluster(stub)
    stub.replace(responses.GET, BASE + "/", status=405, headers={"X-elastic-product": "Elasticsearch"},
                 json={"error": "Incorrect HTTP method for uri [/] and method [GET], allowed: [DELETE]"})
    stub.get(BASE + "/_nodes/_local", json={"cluster_name": "prod", "nodes": {"n1": {"version": "8.19.0"}}})
    stub.post(BASE + "/_security/user/_has_privileges", json=privileges(read=True, index=True))
    checks = run_doctor(tmp_path)
    assert checks["reachability"][0] == "ok" and checks["reachability"][1].endswith(
        "(GET / is not served; GET /_nodes/_local answered HTTP 200)")
    assert checks["authentication"][0] == "ok" and checks["cluster"] == ("ok", "prod: elasticsearch 8.19.0")
    assert checks["privileges:words"][0] == "ok"
    stub.replace(responses.GET, BASE + "/_nodes/_local", status=401)
    assert run_doctor(tmp_path)["authentication"][0] == "fail"


def test_index_auto_creation_and_clock_skew(stub, tmp_path):
    cluster(stub, skew=-300, index_status=404)
    stub.post(BASE + "/_security/user/_has_privileges", json=privileges(read=True, index=True))
    stub.get(BASE + "/_cluster/settings", json={"persistent": {"action.auto_create_index": "false"}})
    checks = run_doctor(tmp_path)
    assert checks["index:words"][0] == "fail" and "forbids creating it" in checks["index:words"][1]
    assert checks["clock"][0] == "warn" and "ahead of the cluster" in checks["clock"][1]
    assert auto_create_allows("+logs-*,-*", "logs-1") and not auto_create_allows("+logs-*,-*", "words")
    assert auto_create_allows("true", "words") and not auto_create_allows("-w*,+*", "words")


def test_refused_key_and_unreachable_cluster_fail(stub, tmp_path):
    cluster(stub, status=401)
    checks = run_doctor(tmp_path)
    assert checks["authentication"][0] == "fail" and "HTTP 401" in checks["authentication"][1]
    stub.replace(responses.GET, BASE + "/", body=requests.ConnectionError("connection refused"))
    checks = run_doctor(tmp_path)
    assert checks["reachability"][0] == "fail" and checks["privileges"] == ("skip", "the cluster is not reachable")


def test_local_checks_fail_on_bad_queue_and_unwritable_state_dir(stub, tmp_path):
    cluster(stub)
    stub.post(BASE + "/_security/user/_has_privileges", json=privileges(read=True, index=True))
    (tmp_path / "file").write_text("")
    checks = run_doctor(tmp_path, state_dir=str(tmp_path / "file" / "state"), queue_url="redis://localhost:1/0")
    assert checks["state_dir"][0] == "fail" and "is not writable" in checks["state_dir"][1]
    assert checks["queue"][0] == "fail" and "redis://localhost:1/0" in checks["queue"][1]


def test_doctor_command_json_and_exit_code(stub, tmp_path):
    cluster(stub)
    stub.post(BASE + "/_security/user/_has_privileges", json=privileges(read=True))
    args = ["doctor", "--json", "--url", BASE, "--index", "words", "--state-dir", str(tmp_path / "s")]
    result = CliRunner().invoke(cli, args, env={"PUSHAGENT_API_KEY": KEY})
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert {c["name"]: c["status"] for c in report["checks"]}["privileges:words"] == "fail"
    assert KEY not in result.output


# -- the real cluster through nginx -----------------------------------------------------------------------


def doctor_via(url, env, index="words") -> tuple[int, dict]:
    completed = subprocess.run([sys.executable, "-m", "pushagent", "doctor", "--json", "--url", url, "--index",
                                index], capture_output=True, text=True, timeout=120, env=agent_env(env), cwd=ROOT)
    return completed.returncode, {c["name"]: (c["status"], c["detail"]) for c in json.loads(completed.stdout)["checks"]}


def test_doctor_through_nginx_real_cluster(nginx, certs, index, tmp_path):
    code, checks = doctor_via(nginx.url(), tls_env(certs, PUSHAGENT_STATE_DIR=str(tmp_path)), index)
    assert code == 0, checks
    assert checks["tls"][0] == "ok" and "TLSv1.3, certificate commonName=localhost, expires" in checks["tls"][1]
    assert checks["cluster"] == ("ok", "pushagent-dev: opensearch 2.19.1")
    assert checks["authentication"][0] == checks["clock"][0] == checks["queue"][0] == "ok"
    assert checks["privileges"][0] == "skip" and checks[f"index:{index}"][0] == "ok"


def test_doctor_through_nginx_names_wrong_key_and_bad_certificate(nginx, certs, tmp_path):
    env = tls_env(certs, key="d3Jvbmc6a2V5", PUSHAGENT_STATE_DIR=str(tmp_path))
    code, checks = doctor_via(nginx.url(), env)
    assert code == 1 and checks["authentication"][0] == "fail"
    assert checks["privileges"] == ("skip", "authentication failed")
    code, checks = doctor_via(nginx.url("expired"), tls_env(certs, PUSHAGENT_STATE_DIR=str(tmp_path)))
    assert code == 1 and checks["tls"][0] == "fail" and "has expired" in checks["tls"][1]
    assert checks["reachability"][0] == "fail" and checks["authentication"][0] == "skip"


MOUNTS = """sysfs /sys sysfs rw 0 0
/dev/sda1 / ext4 rw 0 0
/dev/sdb1 /tmp xfs rw 0 0
mds@o2ib:/scratch /scratch lustre rw 0 0
home:/export/home /home nfs4 rw 0 0
"""


def test_sqlite_queue_on_a_network_file_system_warns(tmp_path):
    assert mount_of(Path("/scratch/ana/state/queue.db"), MOUNTS) == ("/scratch", "lustre")
    assert mount_of(Path("/home2/x"), MOUNTS) == ("/", "ext4")
    status, detail = sqlite_durability(Path("/home/ana/.local/state/pushagent/queue.db"), MOUNTS)
    assert status == "warn" and "on nfs4 (mounted at /home)" in detail and "redis://" in detail
    assert sqlite_durability(tmp_path / "queue.db", MOUNTS)[0] == "ok"


def test_redis_without_persistence_warns():
    assert redis_durability({"appendonly": "yes", "save": ""})[0] == "ok"
    assert redis_durability({"aof_enabled": 1})[0] == "ok"
    status, detail = redis_durability({"appendonly": "no", "save": ""})
    assert status == "warn" and "no persistence" in detail and "appendonly yes" in detail
    status, detail = redis_durability({"appendonly": "no", "save": "3600 1"})
    assert status == "warn" and "snapshots" in detail


def test_doctor_checks_durability_of_a_real_redis_and_sqlite(stub, tmp_path, redis_server):
    cluster(stub)
    stub.post(BASE + "/_security/user/_has_privileges", json=privileges(read=True, index=True))
    stub.passthru_prefixes = ()
    checks = run_doctor(tmp_path, queue_url=redis_server.url(2))
    assert checks["durability"][0] == "warn" and "appendonly no" in checks["durability"][1]
    checks = run_doctor(tmp_path)
    assert checks["durability"][0] in ("ok", "warn") and "SQLite queue" in checks["durability"][1]


def test_the_sqlite_queue_syncs_every_commit(tmp_path):
    from pushagent.state.retry_queue import open_queue
    queue = open_queue(f"sqlite://{tmp_path / 'queue.db'}")
    try:
        assert queue._db.execute("PRAGMA synchronous").fetchone()[0] == 2   # FULL
    finally:
        queue.close()


def test_doctor_on_the_elasticsearch_integ_test_zip(es_url, es_index, tmp_path):
    # Its GET / answers 405 and it has no security module: doctor passes and never sends _has_privileges.
    with FaultProxy(es_url) as proxy:
        code, checks = doctor_via(proxy.url, {"PUSHAGENT_STATE_DIR": str(tmp_path)}, es_index)
    assert code == 0, checks
    version = requests.get(f"{es_url}/_nodes/_local", params={"filter_path": "nodes.*.version"},
                           timeout=30).json()["nodes"].popitem()[1]["version"]
    assert checks["reachability"][0] == "ok" and checks["cluster"] == ("ok", f"pushagent-dev: elasticsearch {version}")
    assert checks["privileges"][0] == "skip"
    assert not [r for r in proxy.requests if "_has_privileges" in r.path]
