"""S3-compatible storage against a real S3 API (moto's standalone server) and the real OpenSearch.

The agent reaches S3 through tests/faultproxy.py, which records every request
(so a test sees the Range header of each GET) and can cut a body mid-way.
"""

import gzip
import json
import signal
import subprocess
import time

import orjson
import pytest
import requests
from faultproxy import Fault, FaultProxy
from support import (S3_TEST_ENV, agent_env, count, generate, interrupt_after, push_command, run_cli, run_push,
                     stored_checksums)

from pushagent.config import load_config
from pushagent.documents.builder import canonical_checksum
from pushagent.errors import ConfigError, InputChangedError
from pushagent.inputs.reader import describe_file, expand_inputs, read_lines
from pushagent.inputs.s3 import parse_url
from pushagent.inputs.source import InputFile


@pytest.fixture
def s3_proxy(moto_server):
    with FaultProxy(moto_server) as proxy:
        yield proxy


def s3_env(proxy, **extra) -> dict:
    return {"PUSHAGENT_S3_ENDPOINT_URL": proxy.url, **extra}


def put(s3_client, bucket, key, path) -> str:
    """Upload a local file; returns its ETag without quotes."""
    return s3_client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())["ETag"].strip('"')


def object_gets(proxy, bucket, key) -> list:
    """The Range header (None when absent) of every GET of one object, in order."""
    return [next((v for k, v in r.headers.items() if k.lower() == "range"), None) for r in proxy.requests
            if r.method == "GET" and r.path.split("?")[0] == f"/{bucket}/{key}"]


def checksums(path) -> dict:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as handle:
        return {record["ipa_id"]: canonical_checksum(record) for record in map(orjson.loads, handle)}


def checkpoint(state_dir) -> dict:
    (path,) = (state_dir / "runs").glob("*.json")
    return json.loads(path.read_text())


def test_push_from_a_prefix_of_plain_and_gzip_objects(cluster_url, index, state_dir, tmp_path, s3_client, bucket,
                                                      s3_proxy):
    plain = generate(tmp_path / "a.jsonl", 2_000)
    packed = generate(tmp_path / "b.jsonl.gz", 2_000, seed=7, start=2_000)
    etags = [put(s3_client, bucket, "batch/a.jsonl", plain), put(s3_client, bucket, "batch/b.jsonl.gz", packed)]
    s3_client.put_object(Bucket=bucket, Key="batch/notes.txt", Body=b"not an input")
    s3_client.put_object(Bucket=bucket, Key="other/c.jsonl", Body=b'{"ipa_id": "elsewhere"}\n')
    code, report, stderr = run_push(cluster_url, index, state_dir, f"s3://{bucket}/batch/", extra=["--debug"],
                                    env=s3_env(s3_proxy))
    assert code == 0, stderr
    assert report["read"] == report["indexed"] == 4_000
    assert stored_checksums(cluster_url, index) == {**checksums(plain), **checksums(packed)}
    inputs = checkpoint(state_dir)["inputs"]
    assert [(i["path"], i["etag"], i["size"]) for i in inputs] == [
        (f"s3://{bucket}/batch/a.jsonl", etags[0], plain.stat().st_size),
        (f"s3://{bucket}/batch/b.jsonl.gz", etags[1], packed.stat().st_size)]
    assert object_gets(s3_proxy, bucket, "batch/a.jsonl") == [None]
    written = json.dumps(report) + stderr + "".join(p.read_text() for p in state_dir.rglob("*.json"))
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        assert S3_TEST_ENV[name] not in written


@pytest.mark.parametrize("name", ["words.jsonl", "words.jsonl.gz"])
def test_sigkill_then_resume_reads_on_from_the_checkpoint(cluster_url, index, state_dir, tmp_path, s3_client,
                                                          bucket, s3_proxy, name):
    data = generate(tmp_path / name, 20_000)
    put(s3_client, bucket, name, data)
    url, extra = f"s3://{bucket}/{name}", ["--chunk-docs", "1000", "--concurrency", "2"]
    with FaultProxy(cluster_url) as cluster:
        cluster.plan = lambda request: Fault.delay(0.05) if request.ids else None
        process = subprocess.Popen(push_command(cluster.url, index, state_dir, url, extra=extra),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   env=agent_env(s3_env(s3_proxy)))
        deadline = time.monotonic() + 120
        while len(cluster.bulk_requests()) < 6 and time.monotonic() < deadline:
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    committed = checkpoint(state_dir)["position"]
    assert 0 < committed["line"] < 20_000
    s3_proxy.requests.clear()
    code, report, stderr = run_push(cluster_url, index, state_dir, url, extra=extra, env=s3_env(s3_proxy))
    assert code == 0, stderr
    assert report["this_run"]["read"] == 20_000 - committed["line"]
    assert count(cluster_url, index) == 20_000
    # A plain object resumes with a ranged GET; a gzip one must be decompressed from its first byte.
    expected = None if name.endswith(".gz") else f"bytes={committed['offset']}-"
    assert object_gets(s3_proxy, bucket, name) == [expected]


@pytest.mark.parametrize("name", ["words.jsonl", "words.jsonl.gz"])
def test_a_connection_lost_mid_object_resumes_with_a_ranged_get(cluster_url, index, state_dir, tmp_path, s3_client,
                                                                bucket, s3_proxy, name):
    data = generate(tmp_path / name, 10_000)
    put(s3_client, bucket, name, data)
    cut = data.stat().st_size // 2
    s3_proxy.plan = lambda request: (Fault.cut_body(cut) if request.method == "GET"
                                     and len(object_gets(s3_proxy, bucket, name)) == 1 else None)
    code, report, stderr = run_push(cluster_url, index, state_dir, f"s3://{bucket}/{name}", env=s3_env(s3_proxy))
    assert code == 0, stderr
    assert report["read"] == report["indexed"] == 10_000
    assert object_gets(s3_proxy, bucket, name) == [None, f"bytes={cut}-"]
    assert "resuming there" in stderr
    assert stored_checksums(cluster_url, index) == checksums(data)


def test_storage_lost_for_good_fails_the_run_and_the_rerun_resumes(cluster_url, index, state_dir, tmp_path,
                                                                   s3_client, bucket, s3_proxy):
    data = generate(tmp_path / "words.jsonl", 10_000)
    put(s3_client, bucket, "words.jsonl", data)
    cut = data.stat().st_size // 2
    s3_proxy.plan = lambda request: (Fault.cut_body(cut if len(object_gets(s3_proxy, bucket, "words.jsonl")) == 1
                                                    else 0) if request.method == "GET" else None)
    url, extra = f"s3://{bucket}/words.jsonl", ["--chunk-docs", "1000"]
    code, report, stderr = run_push(cluster_url, index, state_dir, url, extra=extra, env=s3_env(s3_proxy))
    assert (code, report["status"]) == (1, "failed"), stderr
    assert f"reading at byte {cut} failed 6 times" in report["error"]
    committed = checkpoint(state_dir)["position"]
    assert 0 < committed["offset"] <= cut
    s3_proxy.plan = lambda request: None
    code, report, stderr = run_push(cluster_url, index, state_dir, url, extra=extra, env=s3_env(s3_proxy))
    assert (code, report["this_run"]["read"]) == (0, 10_000 - committed["line"]), stderr
    assert count(cluster_url, index) == 10_000


@pytest.mark.parametrize("batch_id", [None, "nightly"])
def test_an_object_changed_since_the_checkpoint_is_refused(cluster_url, index, state_dir, tmp_path, s3_client,
                                                           bucket, s3_proxy, batch_id):
    old_etag = put(s3_client, bucket, "words.jsonl", generate(tmp_path / "old.jsonl", 3_000))
    url = f"s3://{bucket}/words.jsonl"
    extra = ["--chunk-docs", "500", "--concurrency", "1"] + (["--batch-id", batch_id] if batch_id else [])
    with FaultProxy(cluster_url) as cluster:
        cluster.plan = lambda request: Fault.reply(401) if len(cluster.bulk_requests()) > 1 else None
        code, report, stderr = run_push(cluster.url, index, state_dir, url, extra=extra, env=s3_env(s3_proxy))
    assert (code, report["read"]) == (4, 500), stderr
    new_etag = put(s3_client, bucket, "words.jsonl", generate(tmp_path / "new.jsonl", 3_000, seed=9))
    code, report, stderr = run_push(cluster_url, index, state_dir, url, extra=extra, env=s3_env(s3_proxy))
    assert code == 2, stderr
    assert f"{url}: object changed since batch" in stderr
    assert f"ETag {old_etag} is now {new_etag}; refusing to mix the two versions" in stderr
    code, report, stderr = run_push(cluster_url, index, state_dir, url, extra=[*extra, "--restart"],
                                    env=s3_env(s3_proxy))
    # Same-second uploads give the same Last-Modified version: the 500 sent before may count as current.
    assert (code, report["indexed"] + report["current"]) == (0, 3_000), stderr
    put(s3_client, bucket, "words.jsonl", generate(tmp_path / "third.jsonl", 3_000, seed=11))
    code, report, stderr = run_push(cluster_url, index, state_dir, url, extra=extra, env=s3_env(s3_proxy))
    assert code == 0, stderr


def test_an_object_changed_while_reading_stops_instead_of_mixing(tmp_path, s3_client, bucket, moto_server):
    put(s3_client, bucket, "words.jsonl", generate(tmp_path / "old.jsonl", 100))
    (listed,) = expand_inputs([f"s3://{bucket}/words.jsonl"], moto_server)
    first = list(read_lines(listed))
    put(s3_client, bucket, "words.jsonl", generate(tmp_path / "new.jsonl", 100, seed=9))
    with pytest.raises(InputChangedError, match="object changed while it was read"):
        list(read_lines(listed, first[10].end_offset, first[10].number))


def test_state_mirror_uploads_after_an_interrupt_and_after_the_batch(cluster_url, index, state_dir, tmp_path,
                                                                     s3_client, bucket, s3_proxy):
    data = generate(tmp_path / "words.jsonl", 10_000)
    env = s3_env(s3_proxy, PUSHAGENT_STATE_MIRROR=f"s3://{bucket}/agent/")
    with FaultProxy(cluster_url) as cluster:
        cluster.plan = lambda request: Fault.delay(0.1) if request.ids else None
        code, interrupted, stderr = interrupt_after(
            cluster, push_command(cluster.url, index, state_dir, data, extra=["--chunk-docs", "500"]), env=env)
    assert code == 75, stderr
    assert_mirrored(interrupted["mirror"], state_dir, s3_client, bucket, interrupted["batch_id"])
    assert json.loads(remote(s3_client, bucket, f"agent/runs/{interrupted['batch_id']}.json"))["status"] == \
        "interrupted"
    code, report, stderr = run_push(cluster_url, index, state_dir, data, env=env)
    assert code == 0, stderr
    assert_mirrored(report["mirror"], state_dir, s3_client, bucket, report["batch_id"])
    uploaded = {url.removeprefix(f"s3://{bucket}/agent/") for url in report["mirror"]["uploaded"]}
    assert {f"sync-state/{report['batch_id']}.json", "audit.jsonl", "audit.head"} <= uploaded
    record = json.loads(remote(s3_client, bucket, f"agent/sync-state/{report['batch_id']}.json"))
    assert record["status"] == "verified" and record["doc_count"] == 10_000, record


def assert_mirrored(mirror, state_dir, s3_client, bucket, batch_id) -> None:
    """Every uploaded file equals its local original; the run checkpoint is among them."""
    assert "error" not in mirror and f"s3://{bucket}/agent/runs/{batch_id}.json" in mirror["uploaded"]
    for url in mirror["uploaded"]:
        relative = url.removeprefix(f"s3://{bucket}/agent/")
        assert remote(s3_client, bucket, f"agent/{relative}") == (state_dir / relative).read_bytes()


def remote(s3_client, bucket, key) -> bytes:
    return s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()


def test_a_failed_mirror_upload_does_not_fail_the_push(cluster_url, index, state_dir, tmp_path, s3_proxy):
    data = generate(tmp_path / "words.jsonl", 100)
    env = s3_env(s3_proxy, PUSHAGENT_STATE_MIRROR="s3://no-such-bucket-here/agent")
    code, report, stderr = run_push(cluster_url, index, state_dir, data, env=env)
    assert (code, report["indexed"]) == (0, 100), stderr
    assert "bucket 'no-such-bucket-here' does not exist" in report["mirror"]["error"]
    assert "state mirror: upload failed" in stderr


def test_missing_objects_and_empty_prefixes_are_usage_errors(index, state_dir, bucket, s3_proxy):
    code, _, stderr = run_push("http://127.0.0.1:9", index, state_dir, f"s3://{bucket}/nope.jsonl",
                               env=s3_env(s3_proxy))
    assert code == 2 and f"s3://{bucket}/nope.jsonl: S3 object not found" in stderr
    code, _, stderr = run_push("http://127.0.0.1:9", index, state_dir, f"s3://{bucket}/empty/", env=s3_env(s3_proxy))
    assert code == 2 and f"no .jsonl or .jsonl.gz objects under s3://{bucket}/empty/" in stderr


def test_fingerprints_name_the_object_version_and_leave_local_files_as_they_were(tmp_path):
    local = describe_file(str(generate(tmp_path / "words.jsonl", 3)))
    assert set(local.fingerprint()) == {"path", "size", "mtime_ns", "head_sha256"}
    remote = InputFile("s3://bucket/words.jsonl", 10, 0, etag="abc", endpoint_url="https://example.org")
    assert remote.fingerprint() == {"path": "s3://bucket/words.jsonl", "size": 10, "mtime_ns": 0, "etag": "abc"}
    assert (local.source, remote.source) == ("file", "s3")


def test_s3_urls_and_settings_are_checked():
    assert parse_url("s3://bucket/dir/words.jsonl") == ("bucket", "dir/words.jsonl")
    assert parse_url("s3://bucket") == ("bucket", "")
    with pytest.raises(ConfigError, match="not an S3 URL"):
        parse_url("s3:///key")
    with pytest.raises(ConfigError, match="state_mirror must be s3://bucket"):
        load_config(flags={"state_mirror": "/local/dir"}, environ={})
    with pytest.raises(ConfigError, match="refusing plain http:// to minio.example.org"):
        load_config(flags={"s3_endpoint_url": "http://minio.example.org:9000"}, environ={})
    assert load_config(flags={"s3_endpoint_url": "https://fra1.digitaloceanspaces.com"}, environ={})


def test_shards_split_one_object_by_byte_ranges_and_verify_mirrors_the_batch_record(
        cluster_url, index, state_dir, tmp_path, s3_client, bucket, s3_proxy):
    data = generate(tmp_path / "words.jsonl", 3_000)
    put(s3_client, bucket, "words.jsonl", data)
    env = s3_env(s3_proxy, PUSHAGENT_STATE_MIRROR=f"s3://{bucket}/agent/")
    reports = []
    for shard in ("0/2", "1/2"):
        code, report, stderr = run_push(cluster_url, index, state_dir, f"s3://{bucket}/words.jsonl", env=env,
                                        extra=["--shard", shard, "--batch-id", "words-s3"])
        assert code == 0, stderr
        reports.append(report)
    assert sum(report["read"] for report in reports) == 3_000 and all(report["read"] for report in reports)
    assert count(cluster_url, index) == 3_000
    code, verified, stderr = run_cli("verify", "--batch-id", "words-s3", url=cluster_url, state_dir=state_dir,
                                     env=env)
    assert code == 0, stderr
    assert f"s3://{bucket}/agent/sync-state/words-s3.json" in verified["mirror"]["uploaded"]
    record = json.loads(remote(s3_client, bucket, "agent/sync-state/words-s3.json"))
    assert record["status"] == "verified" and record["doc_count"] == 3_000, record


def test_full_verify_and_repair_of_a_batch_read_from_s3(cluster_url, index, state_dir, tmp_path, s3_client, bucket,
                                                       s3_proxy):
    data = generate(tmp_path / "words.jsonl.gz", 500)
    put(s3_client, bucket, "batch/words.jsonl.gz", data)
    env = s3_env(s3_proxy)
    code, report, stderr = run_push(cluster_url, index, state_dir, f"s3://{bucket}/batch/", env=env)
    assert code == 0, stderr
    for doc_id in ("w00000003", "w00000300"):                 # deleted by hand, within index.gc_deletes
        requests.delete(f"{cluster_url}/{index}/_doc/{doc_id}", timeout=30).raise_for_status()
    requests.post(f"{cluster_url}/{index}/_refresh", timeout=30)
    # --full reads the batch's inputs again: from S3, like the push did.
    code, result, stderr = run_cli("verify", "--batch-id", report["batch_id"], "--full", "--repair", env=env,
                                   url=cluster_url, state_dir=state_dir)
    assert (code, result["verification"]["full"]["missing_ids"], result["enqueued"]) == \
        (3, ["w00000003", "w00000300"], 2), stderr
    code, drained, stderr = run_cli("drain", "--all", url=cluster_url, state_dir=state_dir, env=env)
    assert (code, drained["indexed"]) == (0, 2), stderr
    assert stored_checksums(cluster_url, index) == checksums(data)
