"""`verify --full` on servers without a point-in-time API: the scroll fallback.

On the real OpenSearch 2.19 the proxy refuses the PIT endpoints as OpenSearch 2.0 does ("no handler
found", HTTP 400), so the fallback runs in CI. PUSHAGENT_TEST_LEGACY_URL names a real OpenSearch
before 2.4 to run the same test there, e.g. one started with
`PUSHAGENT_OPENSEARCH_VERSION=2.0.0 scripts/dev-cluster.sh start DIR` (scripts/compat.sh runs 1.3 and 2.0).
"""

import json
import os

import orjson
import pytest
import requests
import responses
from faultproxy import Fault, FaultProxy
from support import generate, run_cli, run_push

from pushagent.cluster.client import ClusterClient, ClusterRequestError
from pushagent.cluster.scan import IncompleteScan, stamped_checksum
from pushagent.config import Config
from pushagent.runs.fullscan import full_scan
from pushagent.state.doctable import DocTable

NO_HANDLER = b'{"error":"no handler found for uri [%s] and method [POST]"}'
PIT_PATHS = ("/_search/point_in_time", "/_pit")


def refuse_pit(request):
    """What OpenSearch before 2.4 answers to either distribution's PIT API."""
    if request.path.split("?")[0].endswith(PIT_PATHS):
        return Fault.reply(400, body=NO_HANDLER % request.path.encode())
    return None


def scan_requests(proxy) -> list:
    return [(r.method, r.path.split("?")[0]) for r in proxy.requests if "_search" in r.path or "_pit" in r.path]


@pytest.fixture(params=["refused-pit", "legacy"])
def scan_url(request, cluster_url):
    """(URL the agent verifies through, URL of the server behind it, proxy or None)."""
    if request.param == "legacy":
        legacy = os.environ.get("PUSHAGENT_TEST_LEGACY_URL")
        if not legacy:
            pytest.skip("set PUSHAGENT_TEST_LEGACY_URL to a real OpenSearch before 2.4 to run this on it")
        with FaultProxy(legacy) as proxy:
            yield proxy.url, legacy.rstrip("/"), proxy
        return
    with FaultProxy(cluster_url, plan=refuse_pit) as proxy:
        yield proxy.url, cluster_url, proxy


def test_full_scan_through_a_scroll_finds_what_is_missing(scan_url, index, state_dir, tmp_path):
    url, server, proxy = scan_url
    requests.put(f"{server}/{index}", json={"settings": {"number_of_shards": 3, "number_of_replicas": 0}},
                 timeout=60).raise_for_status()
    data = generate(tmp_path / "words.jsonl", 25_000)
    code, report, stderr = run_push(server, index, state_dir, data, extra=["--embedding-version", "v1"])
    assert code == 0, stderr
    requests.delete(f"{server}/{index}/_doc/w00000042", params={"refresh": "true"}, timeout=30).raise_for_status()
    code, result, stderr = run_cli("verify", "--url", url, "--state-dir", state_dir, "--batch-id",
                                   report["batch_id"], "--full")
    full = result["verification"]["full"]
    assert (code, full["scanned"], full["missing_ids"], full["extra"], full["mismatched"]) == (
        3, 24_999, ["w00000042"], 0, 0), stderr
    assert "has no point-in-time API: the full scan of" in stderr
    scans = scan_requests(proxy)
    scroll_pages = [path for method, path in scans if path == "/_search/scroll" and method == "POST"]
    assert len(scroll_pages) == 3  # 24,999 documents in pages of 10,000; the last one comes back empty
    assert scans[-1] == ("DELETE", "/_search/scroll")
    assert json.loads(proxy.requests[-1].body)["scroll_id"] == [last_scroll_id(proxy)]


def last_scroll_id(proxy) -> str:
    return json.loads([r for r in proxy.requests if r.path.startswith("/_search/scroll") and r.method == "POST"][-1]
                      .body)["scroll_id"]


def test_a_version_before_pit_in_get_root_skips_the_pit_request(cluster_url, index, state_dir, tmp_path):
    root = requests.get(cluster_url, timeout=30).json()
    root["version"]["number"] = "2.3.0"
    answer_root = Fault.reply(200, body=orjson.dumps(root))
    data = generate(tmp_path / "words.jsonl", 500)
    code, report, stderr = run_push(cluster_url, index, state_dir, data, extra=["--embedding-version", "v1"])
    assert code == 0, stderr
    with FaultProxy(cluster_url, plan=lambda request: answer_root if request.path == "/" else None) as proxy:
        code, result, stderr = run_cli("verify", "--url", proxy.url, "--state-dir", state_dir, "--batch-id",
                                       report["batch_id"], "--full")
    assert code == 0 and result["verification"]["full"]["scanned"] == 500, stderr
    assert scan_requests(proxy)[-3:] == [("POST", f"/{index}/_search"), ("POST", "/_search/scroll"),
                                         ("DELETE", "/_search/scroll")]
    assert not any(path.endswith(PIT_PATHS) for _, path in scan_requests(proxy))


# -- the protocol, stubbed -----------------------------------------------------------------------------------

URL = "http://127.0.0.1:9201"


def client_and_table(tmp_path):
    return ClusterClient(Config(url=URL, retry_backoff_seconds=0.01)), DocTable(tmp_path / "s.db")


def stub_refused_pit():
    responses.post(f"{URL}/words/_search/point_in_time", status=400, body=NO_HANDLER % b"/words/_search/point_in_time")
    responses.post(f"{URL}/words/_pit", status=405, json={"error": "Incorrect HTTP method", "status": 405})


@responses.activate
def test_scroll_pages_are_checked_against_the_scroll_total(tmp_path):
    client, table = client_and_table(tmp_path)
    stub_refused_pit()
    responses.post(f"{URL}/words/_search", json={"_scroll_id": "S1", "hits": {
        "total": {"value": 3, "relation": "eq"}, "hits": [{"_id": "a", "_source": {"sync_checksum": "x"}}]}})
    responses.post(f"{URL}/_search/scroll", json={"_scroll_id": "S2", "hits": {"hits": [{"_id": "b", "_source": {}}]}})
    responses.post(f"{URL}/_search/scroll", json={"_scroll_id": "S2", "hits": {"hits": []}})
    responses.delete(f"{URL}/_search/scroll", json={"succeeded": True})
    with pytest.raises(IncompleteScan, match="the scan of words returned 2 documents, its scroll holds 3"):
        full_scan(client, table, ["words"], None, stamped_checksum("sync_checksum", "sync_batch"), 10)
    first = json.loads(responses.calls[2].request.body)
    assert first == {"size": 10_000, "sort": ["_doc"], "_source": ["sync_checksum", "sync_batch"],
                     "track_total_hits": True}
    assert "scroll=5m" in responses.calls[2].request.url
    assert json.loads(responses.calls[4].request.body) == {"scroll": "5m", "scroll_id": "S2"}
    assert json.loads(responses.calls[-1].request.body) == {"scroll_id": ["S2"]}


@responses.activate
def test_a_missing_index_is_not_taken_for_a_missing_pit_api(tmp_path):
    client, table = client_and_table(tmp_path)
    responses.get(f"{URL}/", json={"version": {"distribution": "opensearch", "number": "2.19.1"}})
    responses.post(f"{URL}/words/_search/point_in_time", status=404,
                   json={"error": {"type": "index_not_found_exception", "reason": "no such index [words]"}})
    with pytest.raises(ClusterRequestError, match="no such index"):
        full_scan(client, table, ["words"], "opensearch", stamped_checksum("sync_checksum", "sync_batch"), 10)
    assert len(responses.calls) == 2
