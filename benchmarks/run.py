#!/usr/bin/env python3
"""Benchmark pushagent against its peers on the same data, then write the results.

    python benchmarks/run.py [--quick] [--runs 3] [--data DIR] [--no-cluster]

Generates the workload with scripts/generate_data.py (kept in --data between
runs), starts a null sink (benchmarks/nullsink.py) and a local OpenSearch
(scripts/dev-cluster.sh, 1 GiB heap, its own port, stopped at the end), runs
every client as its own process and takes the median of --runs runs of:
docs/s, client CPU (user+sys, from wait4) per 100k docs, peak RSS, and bytes
on the wire (counted by the null sink). For pushagent it also measures the
resume cost at 90% of the 1M-record file and the peak RSS at 100k vs 1M.
Writes benchmarks/results/results.md, results.json and chart.png.

    python benchmarks/run.py --peers [--wan] [--quick] [--records N] [--esbulk BINARY]

compares pushagent with its peers on the cluster only, on loopback and over a
WAN profile, in one interleaved run (benchmarks/peers.py): results/peers.md.
"""

import argparse
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import orjson
import requests

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
CHUNK = 5000
FAST = {"PUSHAGENT_REQUESTS_PER_MINUTE": "100000"}  # the rate limit is a quota policy, not a cost


def client_table(quick: bool) -> list:
    """(name, kind, gzip, env, targets): every client and setting the harness runs."""
    both, sink = ("sink", "cluster"), ("sink",)
    table = [
        ("pushagent default", "pushagent", True, {}, both),
        ("pushagent best", "pushagent", False, {**FAST, "PUSHAGENT_COMPRESS": "false"}, both),
        ("pushagent best gzip", "pushagent", True, {**FAST, "PUSHAGENT_COMPRESS": "true"}, sink),
        ("opensearch-py streaming_bulk", "os-streaming", False, {}, both),
        ("opensearch-py parallel_bulk", "os-parallel", False, {}, both),
        ("elasticsearch-py streaming_bulk", "es-streaming", False, {}, sink),
        ("elasticsearch-py parallel_bulk", "es-parallel", False, {}, sink),
        ("minimal orjson client", "minimal", False, {}, both),
        ("minimal orjson client gzip", "minimal", True, {}, sink),
        ("curl prebuilt chunks", "curl", False, {}, both),
        ("curl prebuilt chunks gzip", "curl", True, {}, sink),
    ]
    if not quick:
        table += [("opensearch-py streaming_bulk gzip", "os-streaming", True, {}, sink),
                  ("elasticsearch-py streaming_bulk gzip", "es-streaming", True, {}, sink),
                  ("opensearch-py parallel_bulk gzip", "os-parallel", True, {}, sink)]
    return table


# ---------------------------------------------------------------- workload

def generate(data_dir: Path, name: str, count: int, tiny: bool = False) -> Path:
    path = data_dir / name
    if not path.exists():
        partial = path.with_suffix(".partial")
        subprocess.run([sys.executable, str(ROOT / "scripts/generate_data.py"), "--count", str(count),
                        "--out", str(partial)] + (["--tiny"] if tiny else []), check=True)
        partial.rename(path)
    return path


def prebuilt_chunks(path: Path, index: str, directory: Path, compress: bool) -> list:
    """What curl posts: the NDJSON of each chunk, built once before any timing."""
    directory.mkdir(parents=True, exist_ok=True)
    files, lines = [], []

    def flush():
        body = b"".join(lines)
        target = directory / f"chunk-{len(files):05d}.ndjson{'.gz' if compress else ''}"
        target.write_bytes(zlib.compress(body, 1, wbits=31) if compress else body)
        files.append(target)
        lines.clear()

    with open(path, "rb") as handle:
        for line in handle:
            doc_id = orjson.loads(line)["ipa_id"]
            lines += [orjson.dumps({"index": {"_index": index, "_id": doc_id}}) + b"\n", line]
            if len(lines) >= 2 * CHUNK:
                flush()
    if lines:
        flush()
    return files


def chosen(name: str, only: str | None) -> bool:
    """--only: every client, or those whose name contains one of the comma-separated parts."""
    return not only or any(part in name for part in only.split(","))


# ---------------------------------------------------------------- targets

class NullSink:
    def __init__(self):
        self.process = subprocess.Popen([sys.executable, str(BENCH / "nullsink.py")], stdout=subprocess.PIPE, text=True)
        self.url = self.process.stdout.readline().strip()

    def counters(self) -> dict:
        return requests.get(f"{self.url}/_sink").json()

    def reset(self) -> None:
        requests.post(f"{self.url}/_sink/reset")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait()


class Cluster:
    """A local OpenSearch of our own (never the shared one), stopped by PID at the end."""

    def __init__(self, directory: Path):
        self.directory = directory
        env = {**os.environ, "PUSHAGENT_CLUSTER_HEAP": os.environ.get("PUSHAGENT_CLUSTER_HEAP", "1g")}
        started = subprocess.run([str(ROOT / "scripts/dev-cluster.sh"), "start", str(directory)], env=env,
                                 capture_output=True, text=True)
        if started.returncode:
            raise RuntimeError(f"the benchmark cluster did not start: {started.stderr[-1500:]}")
        self.url = started.stdout.strip()
        self.version = requests.get(self.url).json()["version"]["number"]

    def fresh_index(self, index: str) -> None:
        requests.delete(f"{self.url}/{index}")
        requests.put(f"{self.url}/{index}", json={"settings": {"number_of_shards": 1, "number_of_replicas": 0,
                                                               "refresh_interval": "30s"}}).raise_for_status()

    def count(self, index: str) -> int:
        requests.post(f"{self.url}/{index}/_refresh")
        return requests.get(f"{self.url}/{index}/_count").json()["count"]

    def stop(self) -> None:
        subprocess.run([str(ROOT / "scripts/dev-cluster.sh"), "stop", str(self.directory)], check=False)


# ---------------------------------------------------------------- one run

def command(kind: str, url: str, index: str, path: Path, gzip: bool, state_dir: Path, chunks: dict) -> list:
    if kind == "pushagent":
        return [sys.executable, "-m", "pushagent", "push", "--url", url, "--index", index, "--id-field", "ipa_id",
                "--state-dir", str(state_dir), "--json", "--no-verify", str(path)]  # pushing, not verifying
    if kind == "curl":
        encoding = ["-H", "Content-Encoding: gzip"] if gzip else []
        files = [str(f) for f in chunks[(path, gzip)]]
        return ["xargs", "-P", "2", "-I", "{}", "curl", "-sS", "-o", "/dev/null", "-H",
                "Content-Type: application/x-ndjson", *encoding, "--data-binary", "@{}", f"{url}/_bulk"], files
    return [sys.executable, str(BENCH / "clients.py"), kind, url, index, str(path)] + (["--gzip"] if gzip else [])


def run_once(argv, env: dict, stdin_lines=None, capture_report: bool = False, check: bool = True,
             timeout: float | None = None) -> dict:
    """Run one client process under /usr/bin/time: wall time, CPU (user+sys), peak RSS and exit status
    (and, with `capture_report`, its --json report). With `check`, a non-zero exit raises; past
    `timeout` seconds the client's process group is killed and the exit status is "timeout".

    Not wait4 from here: Linux carries a process's peak RSS across fork and
    exec, so a child of this (large) harness would report at least its size.
    GNU time is small, and it reports its own child (and what that reaps).
    """
    with tempfile.NamedTemporaryFile("r", suffix=".time") as usage:
        started = time.monotonic()
        process = subprocess.Popen(["/usr/bin/time", "-f", "%U %S %M", "-o", usage.name, *argv],
                                   env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                                   stdin=subprocess.PIPE if stdin_lines else subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            stdout, stderr = process.communicate("\n".join(stdin_lines).encode() if stdin_lines else None,
                                                 timeout=timeout)
            status = process.returncode
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # its own session: time, the client and what it started
            stdout, stderr = process.communicate()
            status = "timeout"
        except BaseException:  # the harness itself is stopped: leave no client behind
            os.killpg(process.pid, signal.SIGKILL)
            raise
        wall = time.monotonic() - started
        if check and status != 0:
            raise RuntimeError(f"{argv[:4]} exited {status}: {stderr.decode()[-800:]}")
        fields = usage.read().split()[-3:]
    user, system, rss_kib = fields if len(fields) == 3 else (0, 0, 0)
    measured = {"wall_s": wall, "cpu_s": float(user) + float(system), "rss_mib": int(rss_kib) / 1024,
                "exit": status}
    if status != 0:
        measured["stderr"] = stderr.decode(errors="replace")[-400:]
    if capture_report:
        try:
            measured["report"] = orjson.loads(stdout)
        except orjson.JSONDecodeError:  # killed, or failed before its report: the exit status says it
            measured["report"] = None
    return measured


def measure(clients, target_name, target, path: Path, docs: int, runs: int, chunks: dict, work: Path) -> list:
    """One row per client; the runs go round-robin over the clients, so load changes hit all alike."""
    samples = {client[0]: [] for client in clients}
    for number in range(runs):
        for client in clients:
            samples[client[0]].append(sample_once(client, target_name, target, path, docs, number, chunks, work))
    return [row(client, target_name, docs, samples[client[0]]) for client in clients]


def sample_once(client, target_name, target, path: Path, docs: int, number: int, chunks: dict, work: Path) -> dict:
    name, kind, gzip, env, _ = client
    index = "bench-curl" if kind == "curl" else f"bench-{kind}-{number}"  # curl's chunks name their index
    state_dir = Path(tempfile.mkdtemp(dir=work, prefix="state-"))
    if target_name == "sink":
        target.reset()
    else:
        target.fresh_index(index)
    argv = command(kind, target.url, index, path, gzip, state_dir, chunks)
    argv, lines = argv if isinstance(argv, tuple) else (argv, None)
    sample = run_once(argv, env, lines)
    if target_name == "sink":
        counters = target.counters()
        sample["bytes"] = counters["bytes"]
        assert counters["docs"] == docs, f"{name}: the sink saw {counters['docs']} of {docs} documents"
    else:
        found = target.count(index)
        assert found == docs, f"{name}: the cluster holds {found} of {docs} documents"
        requests.delete(f"{target.url}/{index}")
    print(f"  {target_name:7} {name:40} run {number + 1}: {docs / sample['wall_s']:9.0f} docs/s "
          f"{sample['cpu_s']:6.2f} s CPU {sample['rss_mib']:6.0f} MiB", file=sys.stderr, flush=True)
    return sample


def row(client, target_name: str, docs: int, samples: list) -> dict:
    median = {key: statistics.median(s[key] for s in samples) for key in ("wall_s", "cpu_s", "rss_mib", "bytes")
              if key in samples[0]}
    return {"client": client[0], "target": target_name, "gzip": client[2], "docs": docs, "runs": len(samples),
            "docs_per_s": docs / median["wall_s"], "cpu_s": median["cpu_s"],
            "cpu_s_per_100k": median["cpu_s"] * 100_000 / docs, "rss_mib": median["rss_mib"],
            "bytes": median.get("bytes"), "samples": samples}


# ---------------------------------------------------------------- sink capacity and pushagent specifics

def sink_capacity(sink: NullSink, path: Path, gzip: bool, seconds: float = 3.0) -> float:
    """Docs/s the sink answers for prebuilt 5000-document bodies posted from 2 threads."""
    lines = []
    with open(path, "rb") as handle:
        for line in handle:
            lines += [b'{"index":{"_index":"x","_id":"1"}}\n', line]
            if len(lines) >= 2 * CHUNK:
                break
    body = b"".join(lines)
    body = zlib.compress(body, 1, wbits=31) if gzip else body
    headers = {"Content-Type": "application/x-ndjson", **({"Content-Encoding": "gzip"} if gzip else {})}
    done, deadline = [0, 0], time.monotonic() + seconds

    def worker(slot):
        session = requests.Session()
        while time.monotonic() < deadline:
            session.post(f"{sink.url}/_bulk", data=body, headers=headers).raise_for_status()
            done[slot] += CHUNK

    started = time.monotonic()
    threads = [threading.Thread(target=worker, args=(slot,)) for slot in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done) / (time.monotonic() - started)


def resume_cost(sink: NullSink, path: Path, total: int, work: Path) -> dict:
    """Interrupt a push of the last 10% after two requests, then time the resume to its first request."""
    state_dir = work / "resume-state"
    base = [sys.executable, "-m", "pushagent", "push", "--url", sink.url, "--index", "bench", "--id-field",
            "ipa_id", "--state-dir", str(state_dir), "--json", "--no-verify", str(path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), **FAST}
    sink.reset()
    first = subprocess.Popen(base + ["--from-line", str(total * 9 // 10 + 1)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while sink.counters()["requests"] < 2 and first.poll() is None:
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)
    first.wait()
    checkpoint = orjson.loads(next((state_dir / "runs").glob("*.json")).read_bytes())
    sink.reset()
    started = time.time()
    resumed = subprocess.Popen(base, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while sink.counters()["first_request_at"] is None and resumed.poll() is None:
        time.sleep(0.05)
    first_request = sink.counters()["first_request_at"]
    resumed.send_signal(signal.SIGTERM)
    resumed.wait()
    return {"interrupted_exit": first.returncode, "checkpoint_line": checkpoint["position"]["line"],
            "resume_first_request_s": first_request - started if first_request else None}


# ---------------------------------------------------------------- report

def machine_facts(cluster_version) -> dict:
    return {"cores": os.cpu_count(), "cpu": _cpu_model(), "python": platform.python_version(),
            "os": platform.platform(), "opensearch": cluster_version or "not run",
            "opensearch-py": _version("opensearch-py"), "elasticsearch-py": _version("elasticsearch"),
            "curl": subprocess.run(["curl", "--version"], capture_output=True, text=True).stdout.split()[1]}


def _version(distribution: str) -> str:
    from importlib import metadata
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="50k records, fewer gzip variants: for iteration")
    parser.add_argument("--runs", type=int, default=3, help="runs per client and target; the median is kept [3]")
    parser.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "pushagent-bench-data"),
                        help="where generated workloads are kept between runs")
    parser.add_argument("--no-cluster", action="store_true", help="null sink only")
    parser.add_argument("--only", help="run only clients whose name contains this (or, comma-separated, one of "
                                       "these)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the rows of results.json from the same mode and run only the missing ones")
    parser.add_argument("--peers", action="store_true",
                        help="instead: pushagent side by side with its peers on the cluster (benchmarks/peers.py)")
    parser.add_argument("--wan", action="store_true",
                        help="with --peers: also run every cluster row through the WAN proxy (25 ms each way, "
                             "one shared 100 Mbit/s link per direction)")
    parser.add_argument("--records", type=int, help="with --peers: records to push [100000, --quick 50000]")
    parser.add_argument("--esbulk", help="with --peers: an esbulk binary to run as a peer (built by hand)")
    args = parser.parse_args(argv)
    if args.peers:
        import peers  # benchmarks/peers.py
        return peers.main(args)
    from report import write_report  # benchmarks/report.py

    data_dir = Path(args.data)
    data_dir.mkdir(parents=True, exist_ok=True)
    records = 50_000 if args.quick else 100_000
    work = Path(tempfile.mkdtemp(prefix="pushagent-bench-"))
    work.chmod(0o755)  # as root, dev-cluster.sh runs OpenSearch as its own user, which must reach the directory
    workloads = {"embedding": (generate(data_dir, f"words-{records}.jsonl", records), records),
                 "tiny": (generate(data_dir, f"tiny-{records}.jsonl", records, tiny=True), records)}
    big = generate(data_dir, "words-1000000.jsonl", 1_000_000)
    sink, cluster = NullSink(), None
    results = {"mode": "quick" if args.quick else "full", "records": records, "runs": args.runs, "rows": [],
               "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.keep and (RESULTS / "results.json").exists():
        kept = orjson.loads((RESULTS / "results.json").read_bytes())
        if kept["mode"] == results["mode"]:
            results.update({k: kept[k] for k in ("rows", "started", "machine", "pushagent") if k in kept})
    done = {(r["workload"], r["target"], r["client"]) for r in results["rows"]}
    try:
        if not args.no_cluster:
            cluster = Cluster(work / "cluster")
        if cluster or "machine" not in results:
            results["machine"] = machine_facts(cluster and cluster.version)
        path = workloads["embedding"][0]
        results["sink_capacity"] = {"plain": sink_capacity(sink, path, False), "gzip": sink_capacity(sink, path, True)}
        print(f"null sink capacity: {results['sink_capacity']}", file=sys.stderr)
        clients = [c for c in client_table(args.quick) if chosen(c[0], args.only)]
        for workload, (path, docs) in workloads.items():
            chunks = {(path, gz): prebuilt_chunks(path, "bench-curl", work / f"chunks-{workload}-{gz}", gz)
                      for gz in (False, True)}
            targets = [("sink", sink)] + ([("cluster", cluster)] if cluster and workload == "embedding" else [])
            for target_name, target in targets:
                todo = [c for c in clients if target_name in c[4] and (workload, target_name, c[0]) not in done]
                for measured in measure(todo, target_name, target, path, docs, args.runs, chunks, work):
                    results["rows"].append({"workload": workload, **measured})
                save(results)
        if "pushagent" not in results:
            results["pushagent"] = pushagent_specifics(sink, workloads["embedding"][0], records, big, work)
    finally:
        sink.stop()
        if cluster:
            cluster.stop()
    save(results)
    write_report(results, RESULTS)
    print(f"wrote {RESULTS / 'results.md'}", file=sys.stderr)
    return 0


def save(results: dict) -> None:
    """Written after every row, so that an interrupted session keeps what it measured."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "results.json").write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))


def pushagent_specifics(sink, path, records, big, work) -> dict:
    """Peak RSS at the workload size vs 1M records (default settings), and the resume cost."""
    default = next(c for c in client_table(True) if c[0] == "pushagent default")
    unlimited = (default[0], default[1], default[2], FAST, default[4])
    small, = measure([unlimited], "sink", sink, path, records, 1, {}, work)
    large, = measure([unlimited], "sink", sink, big, 1_000_000, 1, {}, work)
    return {"rss_small_mib": small["rss_mib"], "rss_1m_mib": large["rss_mib"], "small_records": records,
            "docs_per_s_1m": large["docs_per_s"], "cpu_s_per_100k_1m": large["cpu_s_per_100k"],
            **resume_cost(sink, big, 1_000_000, work)}


if __name__ == "__main__":
    sys.path.insert(0, str(BENCH))
    sys.exit(main())
