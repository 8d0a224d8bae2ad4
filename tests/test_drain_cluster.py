"""`pushagent drain` and `pushagent queue` against the real OpenSearch, on SQLite and a real redis-server."""

import json
import signal
import subprocess
import time

import orjson
import redis
import requests
from faultproxy import Fault, FaultProxy
from redisserver import RedisServer, drain_killed_mid_way

from pushagent.state.ledger import Ledger
from support import (agent_env, cli_command, count, fill_queue, free_port, generate, queue_stats, queued_ids, run_cli,
                     run_push, wait_for)


def cluster_ids(url, index) -> set:
    requests.post(f"{url}/{index}/_refresh", timeout=60)
    reply = requests.post(f"{url}/{index}/_search", json={"size": 10000, "_source": False}, timeout=60)
    return {hit["_id"] for hit in reply.json()["hits"]["hits"]} if reply.ok else set()


def test_push_failures_go_to_the_queue_and_drain_sends_them(cluster_url, index, state_dir, tmp_path, queue_url):
    data = generate(tmp_path / "words.jsonl", 300)
    with FaultProxy(cluster_url) as proxy:
        # Every other item refused (the cluster takes the rest), no in-run retry: into the queue.
        proxy.plan = lambda request: Fault.item_status(429, every=2) if request.ids else None
        code, report, stderr = run_push(proxy.url, index, state_dir, data,
                                        env={"PUSHAGENT_MAX_RETRIES": "0", "PUSHAGENT_QUEUE_URL": queue_url})
    assert (code, report["queued"]) == (3, 150), stderr
    code, stats, _ = run_cli("queue", "stats", queue_url=queue_url)
    assert (code, stats["due"], stats["later"], stats["batches"][report["batch_id"]]["later"]) == (0, 0, 150, 150)
    code, nothing, stderr = run_cli("drain", url=cluster_url, queue_url=queue_url)
    assert (code, nothing["read"], nothing["remaining"]["later"]) == (3, 0, 150), stderr
    code, drained, stderr = run_cli("drain", "--all", url=cluster_url, queue_url=queue_url)
    assert code == 0, stderr
    for key in ("batch_id", "status", "read", "indexed", "current", "queued", "dead", "quarantined", "requests",
                "retries", "bytes_sent", "duration_s"):
        assert key in drained
    # The proxy let the cluster apply the first sends: the same versions are now `current`.
    assert (drained["read"], drained["current"], drained["acked"], drained["status"]) == (150, 150, 150, "drained")
    assert queue_stats(queue_url)["pending"] == 0 and count(cluster_url, index) == 300


def test_drain_fails_retryable_items_and_dead_letters_permanent_ones(cluster_url, index, state_dir, tmp_path,
                                                                    queue_url):
    requests.put(f"{cluster_url}/{index}", json={"mappings": {"properties": {"frequency": {"type": "long"}}}},
                 timeout=30).raise_for_status()
    data = tmp_path / "mixed.jsonl"
    data.write_bytes(b"\n".join(orjson.dumps({"ipa_id": f"m{n}", "frequency": "lots" if n in (3, 7) else n})
                                for n in range(20)) + b"\n")
    fill_queue(queue_url, data, index)
    with FaultProxy(cluster_url) as proxy:
        # Every other item refused with 429 (overriding whatever the cluster said), no in-run retry.
        proxy.plan = lambda request: Fault.item_status(429, every=2) if request.ids else None
        code, first, stderr = run_cli("drain", "--max-items", "10", url=proxy.url, queue_url=queue_url,
                                      env={"PUSHAGENT_MAX_RETRIES": "0"})
    assert (code, first["read"], first["queued"], first["acked"]) == (3, 10, 5, 5 - first["dead"]), stderr
    assert first["taken"] == first["read"] and Ledger.from_dict(first).accounted == 10
    stats = queue_stats(queue_url)
    assert (stats["due"], stats["later"]) == (10, 5)
    code, second, stderr = run_cli("drain", "--all", url=cluster_url, queue_url=queue_url)
    assert code == 3, stderr
    # The proxy let the cluster apply the first drain's documents: those are `current` now.
    assert (second["read"], first["dead"] + second["dead"]) == (15, 2)
    assert first["indexed"] + first["current"] + second["indexed"] + second["current"] == 18
    assert second["remaining"] == {"due": 0, "later": 0, "leased": 0, "dead": 2}
    code, dead, _ = run_cli("queue", "list", "--status", "dead", queue_url=queue_url)
    assert sorted(item["line"] for item in dead) == [4, 8]
    assert all("mapper_parsing_exception" in item["last_error"] and "source" not in item for item in dead)
    assert count(cluster_url, index) == 18


def test_quarantined_lines_are_never_sent_nor_requeued(cluster_url, index, state_dir, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(b'{"ipa_id": "a1"}\n{not json\n{"word": "no id"}\n')
    code, report, stderr = run_push(cluster_url, index, state_dir, data)
    assert (code, report["quarantined"]) == (3, 2), stderr
    code, requeued, _ = run_cli("queue", "requeue-dead", state_dir=state_dir)
    assert (code, requeued) == (0, {"requeued": 0})
    with FaultProxy(cluster_url) as proxy:
        code, drained, stderr = run_cli("drain", "--all", url=proxy.url, state_dir=state_dir)
        assert proxy.bulk_requests() == []
    assert (code, drained["read"], drained["remaining"]["dead"]) == (3, 0, 2), stderr


def test_sigkill_mid_drain_loses_nothing(cluster_url, index, state_dir, tmp_path, queue_url):
    ids = fill_queue(queue_url, generate(tmp_path / "words.jsonl", 6_000), index)
    env = {"PUSHAGENT_LEASE_SECONDS": "3", "PUSHAGENT_CHUNK_DOCS": "200"}
    with FaultProxy(cluster_url) as proxy:
        proxy.plan = lambda request: Fault.delay(0.3) if request.ids else None
        process = subprocess.Popen(cli_command("drain", url=proxy.url, queue_url=queue_url),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=agent_env(env))
        wait_for(lambda: len(proxy.bulk_requests()) >= 5)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        killed_at = time.monotonic()
    in_cluster, in_queue = cluster_ids(cluster_url, index), queued_ids(queue_url)
    assert 0 < len(in_cluster) < 6_000, len(in_cluster)
    assert in_cluster | in_queue == ids, len(ids - in_cluster - in_queue)
    time.sleep(max(0.0, killed_at + 3.2 - time.monotonic()))  # the killed drainer's leases expire
    code, report, stderr = run_cli("drain", url=cluster_url, queue_url=queue_url, env=env)
    assert code == 0, stderr
    assert report["read"] == len(in_queue), (report, len(in_queue))
    assert count(cluster_url, index) == 6_000 and queue_stats(queue_url)["pending"] == 0


def test_four_drainers_share_one_redis_queue(cluster_url, index, state_dir, tmp_path, redis_server):
    queue_url = redis_server.url(3)
    redis.Redis.from_url(queue_url).flushdb()
    ids = fill_queue(queue_url, generate(tmp_path / "words.jsonl", 20_000), index)
    env = {"PUSHAGENT_CHUNK_DOCS": "500", "PUSHAGENT_CONCURRENCY": "1"}
    with FaultProxy(cluster_url) as proxy:
        drainers = [subprocess.Popen(cli_command("drain", url=proxy.url, queue_url=queue_url),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=agent_env(env))
                    for _ in range(4)]
        outputs = [drainer.communicate(timeout=300) for drainer in drainers]
        sent = proxy.id_counts()
    reports = [json.loads(stdout) for stdout, _ in outputs]
    assert [d.returncode for d in drainers] == [0] * 4, [stderr for _, stderr in outputs]
    assert sum(r["acked"] for r in reports) == sum(r["read"] for r in reports) == 20_000
    assert sum(1 for r in reports if r["read"]) >= 2
    assert set(sent) == ids and max(sent.values()) == 1
    assert queue_stats(queue_url)["pending"] == 0 and count(cluster_url, index) == 20_000


def test_unreachable_redis_at_start_is_a_clear_error(cluster_url, index, state_dir, tmp_path):
    data = generate(tmp_path / "words.jsonl", 100)
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    with FaultProxy(cluster_url) as proxy:
        pushed = run_push(proxy.url, index, state_dir, data, env={"PUSHAGENT_QUEUE_URL": url})
        drained = run_cli("drain", url=proxy.url, queue_url=url)
        assert proxy.bulk_requests() == []
    for code, _, stderr in (pushed, drained):
        assert code == 1 and url.replace("s3cret", "***") in stderr and "s3cret" not in stderr
    assert not list((state_dir / "runs").glob("*.json")) if (state_dir / "runs").exists() else True


def test_redis_killed_mid_run_exits_1_and_loses_nothing(cluster_url, index, state_dir, tmp_path):
    server = RedisServer(tmp_path / "redis", persistent=True)
    (tmp_path / "redis").mkdir()
    server.start()
    try:
        killed_push_then_rerun(cluster_url, index, state_dir, tmp_path, server)
        killed_drain_then_rerun(cluster_url, index, server)
    finally:
        server.stop()


def killed_push_then_rerun(cluster_url, index, state_dir, tmp_path, server):
    data = generate(tmp_path / "words.jsonl", 5_000)
    env = {"PUSHAGENT_QUEUE_URL": server.url(), "PUSHAGENT_MAX_RETRIES": "0"}
    extra = ["--chunk-docs", "500", "--concurrency", "1"]
    with FaultProxy(cluster_url) as proxy:
        def plan(request):
            if request.ids and len(proxy.bulk_requests()) == 3:
                server.kill()
            return Fault.item_status(429, every=2) if request.ids else None
        proxy.plan = plan
        code, _, stderr = run_push(proxy.url, index, state_dir, data, extra=extra, env=env)
        assert code == 1 and server.url() in stderr, stderr
        server.start()
        committed = json.loads(next((state_dir / "runs").glob("*.json")).read_text())
        # Every other record refused: the committed lines' refused half is in the queue, nothing more.
        assert committed["counters"]["queued"] * 2 == committed["position"]["line"] == 2 * len(queued_ids(server.url()))
        code, report, stderr = run_push(proxy.url, index, state_dir, data, extra=extra, env=env)
    assert (code, report["queued"]) == (3, 2_500), stderr
    assert len(queued_ids(server.url())) == 2_500


def killed_drain_then_rerun(cluster_url, index, server):
    env = {"PUSHAGENT_LEASE_SECONDS": "2", "PUSHAGENT_CHUNK_DOCS": "500", "PUSHAGENT_CONCURRENCY": "1"}
    with FaultProxy(cluster_url) as proxy:
        drain_killed_mid_way(server, proxy, env)
    code, report, stderr = run_cli("drain", "--all", url=cluster_url, queue_url=server.url(), env=env)
    assert code == 0, stderr
    assert count(cluster_url, index) == 5_000 and queue_stats(server.url())["pending"] == 0


def test_sigterm_finishes_the_request_in_flight_and_releases_nothing_leased(cluster_url, index, state_dir,
                                                                           tmp_path):
    queue_url = f"sqlite://{state_dir / 'queue.db'}"
    fill_queue(queue_url, generate(tmp_path / "words.jsonl", 3_000), index)
    with FaultProxy(cluster_url) as proxy:
        proxy.plan = lambda request: Fault.delay(0.3) if request.ids else None
        process = subprocess.Popen(cli_command("drain", url=proxy.url, queue_url=queue_url),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env=agent_env({"PUSHAGENT_CHUNK_DOCS": "200", "PUSHAGENT_CONCURRENCY": "1"}))
        wait_for(lambda: len(proxy.bulk_requests()) >= 2)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=120)
    report = json.loads(stdout)
    assert (process.returncode, report["status"]) == (75, "interrupted"), stderr
    stats = queue_stats(queue_url)
    assert stats["leased"] == 0 and stats["pending"] == 3_000 - report["acked"] > 0
    assert count(cluster_url, index) == report["acked"]
