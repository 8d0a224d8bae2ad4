#!/usr/bin/env python3
"""A regenerated snapshot where 1% changed: a full push against `push --incremental`, side by side.

    python benchmarks/incremental.py [--count 1000000] [--dims 384] [--runs 3] [--data DIR]

Each round starts a fresh index on our own local OpenSearch (1 GiB heap,
scripts/dev-cluster.sh, stopped at the end), pushes the first snapshot into it
(untimed), then times `push --incremental` of the regenerated snapshot and,
on the same index, the full push of it (the unchanged 99% are then indexed
again, as a full push of a new batch time does). Before each timed push the
index is refreshed and the node's merges finish, as hours or a day would
see them finish between two snapshots. The incremental push goes
first: after the full push every document would be unchanged. Reports the
median wall time, requests, probe requests and bytes sent of each, their
ratios against the issue's targets (<= 15% of the wall time, <= 5% of the
bytes), and writes benchmarks/results/incremental.md.
"""

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import orjson
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import RESULTS, ROOT, Cluster, run_once  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
import generate_data  # noqa: E402

FAST = {"PUSHAGENT_REQUESTS_PER_MINUTE": "100000"}   # the rate limit is a quota policy, not a cost
SETTLE_SECONDS = 600                                  # the longest a timed push waits for the node's merges
CHANGED_EVERY = 100                                   # 1% of the records change between the snapshots


def snapshots(data: Path, count: int, dims: int) -> tuple:
    """The first snapshot and the regenerated one (every 100th record with new content)."""
    first, second = data / f"snapshot-{count}-{dims}.jsonl", data / f"snapshot-{count}-{dims}-regenerated.jsonl"
    if not first.exists():
        generate_data.write_records(str(first), count, dims, 42)
    if not second.exists():
        rng = random.Random(7)
        with open(first, "rb") as source, open(second, "wb") as out:
            for number, line in enumerate(source):
                if number % CHANGED_EVERY == 0:
                    line = orjson.dumps(generate_data.make_record(rng, number, dims)) + b"\n"
                out.write(line)
    return first, second


def push(cluster: Cluster, index: str, path: Path, state: Path, day: int, *extra) -> dict:
    argv = [sys.executable, "-m", "pushagent", "push", "--url", cluster.url, "--index", index, "--id-field",
            "ipa_id", "--state-dir", str(state), "--json", "--no-verify", "--embedding-version", "v1",
            "--batch-time", f"2026-01-0{day}T00:00:00Z", *extra, str(path)]
    measured = run_once(argv, FAST, capture_report=True)
    return {**measured, **{key: measured["report"][key] for key in ("requests", "probes", "bytes_sent",
                                                                      "unchanged", "indexed")}}


def settle(cluster: Cluster, index: str) -> None:
    """The index as the next snapshot finds it, hours or a day after the last push: refreshed, and the node done
    merging what that push wrote (a merge left running would take the shared cores from the timed push)."""
    requests.post(f"{cluster.url}/{index}/_refresh").raise_for_status()
    deadline = time.monotonic() + SETTLE_SECONDS
    while time.monotonic() < deadline:
        stats = requests.get(f"{cluster.url}/{index}/_stats/merge").json()
        if not stats["_all"]["total"]["merges"]["current"]:
            return
        time.sleep(1)


def round_of(cluster: Cluster, first: Path, second: Path, work: Path, number: int) -> dict:
    index = f"bench-incremental-{number}"
    cluster.fresh_index(index)
    state = work / f"state-{number}"
    push(cluster, index, first, state, 1)
    settle(cluster, index)
    incremental = push(cluster, index, second, state, 2, "--incremental")
    settle(cluster, index)
    full = push(cluster, index, second, state, 3)
    requests.delete(f"{cluster.url}/{index}")     # the next round's node holds only its own index
    return {"incremental": incremental, "full": full}


def median_of(rounds: list, kind: str) -> dict:
    keys = ("wall_s", "cpu_s", "requests", "probes", "bytes_sent", "unchanged", "indexed")
    return {key: statistics.median(r[kind][key] for r in rounds) for key in keys}


def write(results: dict) -> None:
    full, incremental = results["full"], results["incremental"]
    wall, sent = incremental["wall_s"] / full["wall_s"], incremental["bytes_sent"] / full["bytes_sent"]
    lines = [
        "# Incremental sync: a regenerated snapshot, 1% changed",
        "",
        f"Produced by `python benchmarks/incremental.py --count {results['count']} --dims {results['dims']}` "
        f"({results['runs']} rounds, medians) against a local OpenSearch {results['cluster']} on the same "
        "2 cores. Each round pushes the first snapshot into a fresh index, then the regenerated one with "
        "`--incremental`, then the regenerated one as a full push onto the same index. Before each timed push "
        "the index is refreshed and the node's merges are let finish: a regenerated snapshot comes hours or a "
        "day after the one before, and a merge of the last push left running would take the shared cores.",
        "",
        "| push | wall s | requests | probe requests (_mget) | bytes sent | unchanged | indexed |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in (("full", full), ("--incremental", incremental)):
        lines.append(f"| {name} | {row['wall_s']:.1f} | {row['requests']:,.0f} | {row['probes']:,.0f} | "
                     f"{row['bytes_sent'] / 1e6:,.1f} MB | {row['unchanged']:,.0f} | {row['indexed']:,.0f} |")
    lines += ["", "Each round: " + ", ".join(
        f"{r['incremental']['wall_s']:.1f} s against {r['full']['wall_s']:.1f} s "
        f"({r['incremental']['wall_s'] / r['full']['wall_s']:.1%})" for r in results["rounds"]) + "."]
    lines += ["", "| target | measured | met |", "| --- | --- | --- |",
              f"| wall time <= 15% of the full push | {wall:.1%} | {'yes' if wall <= 0.15 else '**no**'} |",
              f"| bytes sent <= 5% of the full push | {sent:.1%} | {'yes' if sent <= 0.05 else '**no**'} |", ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "incremental.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000, help="records per snapshot [1000000]")
    parser.add_argument("--dims", type=int, default=384, help="embedding dimensions [384]")
    parser.add_argument("--runs", type=int, default=3, help="rounds; the medians are kept [3]")
    parser.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "pushagent-bench-data"),
                        help="where the snapshots are generated (kept between runs)")
    args = parser.parse_args(argv)
    data = Path(args.data)
    data.mkdir(parents=True, exist_ok=True)
    first, second = snapshots(data, args.count, args.dims)
    with tempfile.TemporaryDirectory(prefix="pushagent-bench-incremental-") as work:
        os.chmod(work, 0o755)   # the node may run as another user
        cluster = Cluster(Path(work) / "node")
        try:
            rounds = [round_of(cluster, first, second, Path(work), number) for number in range(args.runs)]
        finally:
            cluster.stop()
    write({"count": args.count, "dims": args.dims, "runs": args.runs, "cluster": cluster.version, "rounds": rounds,
           "full": median_of(rounds, "full"), "incremental": median_of(rounds, "incremental")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
