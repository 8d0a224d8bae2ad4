#!/usr/bin/env python3
"""Measure the retry queue on each backend: per-item overhead and drain throughput.

    python scripts/bench_queue.py --url http://127.0.0.1:9200 --count 20000

Overhead: put, take and ack of COUNT items in batches of 5000, without any
HTTP, in microseconds per item. Throughput: COUNT due items drained into a
fresh index of the real cluster by `DrainRun` (the code behind `pushagent
drain`), in items per second. SQLite uses a temporary file; Redis a
redis-server started on a free loopback port (or --redis-url). The index is
deleted at the end.
"""

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts"), str(ROOT / "tests")]

import generate_data  # noqa: E402

from pushagent.config import load_config  # noqa: E402
from pushagent.documents.builder import Builder, BuildSettings, iso_utc_from_ms  # noqa: E402
from pushagent.runs.drain import DrainOptions, DrainRun  # noqa: E402
from pushagent.state.retry_queue import QueueItem, open_queue  # noqa: E402

BATCH = 5000
BATCH_MS = 1_700_000_000_000


def queue_items(path: Path, index: str, batch_id: str = "b1") -> list:
    """Every record of the JSONL file `path` as a due retryable item, built exactly as push builds it."""
    settings = BuildSettings(id_field="ipa_id", default_index=index, index_field=None,
                             allowed_indices=frozenset({index}), batch_version=BATCH_MS,
                             batch_time_iso=iso_utc_from_ms(BATCH_MS))
    builder = Builder(settings)
    docs = [builder.build(line, str(path), n) for n, line in enumerate(path.read_bytes().splitlines(), 1)]
    return [QueueItem(QueueItem.document_key(d.index, d.doc_id), batch_id, d.index, d.doc_id, d.version, d.op,
                      d.source, d.file, d.line, "retryable", "429 injected", 0, 1.0) for d in docs]


def overhead(queue_url: str, items: list) -> dict:
    """Microseconds per item for put, take and ack, in batches of BATCH."""
    queue = open_queue(queue_url)
    timings = {}
    try:
        started = time.perf_counter()
        for start in range(0, len(items), BATCH):
            queue.put(items[start:start + BATCH])
        timings["put"] = time.perf_counter() - started
        taken, take_s, ack_s = 0, 0.0, 0.0
        while True:
            started = time.perf_counter()
            batch = queue.take(BATCH)
            take_s += time.perf_counter() - started
            if not batch:
                break
            started = time.perf_counter()
            taken += queue.ack(batch)
            ack_s += time.perf_counter() - started
        assert taken == len(items), (taken, len(items))
        timings.update(take=take_s, ack=ack_s)
    finally:
        queue.close()
    per_item = {name: round(seconds / len(items) * 1e6, 1) for name, seconds in timings.items()}
    per_item["total"] = round(sum(per_item.values()), 1)
    return per_item


def drain_throughput(queue_url: str, items: list, url: str, index: str, concurrency: int) -> dict:
    queue = open_queue(queue_url)
    try:
        queue.put(items)
    finally:
        queue.close()
    config = load_config(None, {"url": url, "queue_url": queue_url, "concurrency": concurrency,
                                "requests_per_minute": 100_000, "state_dir": tempfile.mkdtemp()}, environ={})
    result = DrainRun(config, DrainOptions()).run()
    report = result.report()
    assert result.exit_code == 0 and report["acked"] == len(items), report
    return {"items_per_s": report["items_per_s"], "duration_s": report["duration_s"],
            "requests": report["requests"]}


def backends(redis_url: str | None, directory: Path):
    yield "sqlite", lambda: f"sqlite://{directory / f'{uuid.uuid4().hex}.db'}", None
    if redis_url:
        yield "redis", lambda: redis_url, None
        return
    from redisserver import RedisServer
    server = RedisServer(directory).start()
    counter = iter(range(1, 16))
    yield "redis", lambda: server.url(next(counter)), server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:9200", help="the cluster drained into")
    parser.add_argument("--count", type=int, default=20_000, help="items per measurement")
    parser.add_argument("--dims", type=int, default=8, help="embedding dimensions of the records")
    parser.add_argument("--concurrency", type=int, default=2,
                        help="drain requests in flight at the start (it adapts up to max_concurrency)")
    parser.add_argument("--redis-url", help="an empty Redis database to use instead of starting redis-server")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="pushagent-bench-"))
    data = directory / "words.jsonl"
    generate_data.write_records(str(data), args.count, args.dims, 42, 0)
    index = f"bench-queue-{uuid.uuid4().hex[:8]}"
    results = {}
    try:
        for name, new_url, server in backends(args.redis_url, directory):
            try:
                results[name] = {"overhead_us_per_item": overhead(new_url(), queue_items(data, index)),
                                 "drain": drain_throughput(new_url(), queue_items(data, index), args.url, index,
                                                           args.concurrency)}
            finally:
                requests.delete(f"{args.url}/{index}", timeout=60)
                if server is not None:
                    server.stop()
    finally:
        print(json.dumps({"count": args.count, "dims": args.dims, "concurrency": args.concurrency, **results},
                         indent=1))


if __name__ == "__main__":
    main()
