"""pushagent side by side with its peers on a real cluster, on loopback and over a WAN profile.

    python benchmarks/run.py --peers [--wan] [--records 100000] [--runs 3] [--esbulk BINARY]

One interleaved run: every round goes over every (profile, client) pair, so a
change of load on the machine hits all rows alike; each row is the median of
--runs. A row records docs/s, client CPU, peak RSS, the cluster node's CPU
over the same wall time, the bytes the WAN link carried, the exit status and
whether the index holds exactly the records. Writes results/peers.json and
results/peers.md.
"""

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
import run as bench
from wanproxy import WanProxy

GOBULK = bench.BENCH / "gobulk"
DELAY_MS, MBIT = 25, 100


def peer_table(gobulk, esbulk) -> list:
    """(name, kind, gzip, env, extra argv): the clients of the comparison; Go rows only when built."""
    table = [("pushagent defaults", "pushagent", True, {}, []),
             ("pushagent max_concurrency 16", "pushagent", True, {"PUSHAGENT_MAX_CONCURRENCY": "16"}, []),
             ("pushagent starting at 16", "pushagent", True,
              {"PUSHAGENT_CONCURRENCY": "16", "PUSHAGENT_MAX_CONCURRENCY": "16"}, []),
             ("pushagent before issue 19 (2 fixed, gzip)", "pushagent", True,
              {"PUSHAGENT_MAX_CONCURRENCY": "2", "PUSHAGENT_COMPRESS": "true"}, []),
             ("opensearch-py streaming_bulk", "os-streaming", False, {}, []),
             ("opensearch-py parallel_bulk", "os-parallel", False, {}, [])]
    if gobulk:
        table += [("opensearch-go BulkIndexer 2 workers", "gobulk", False, {}, ["-workers", "2"]),
                  ("opensearch-go BulkIndexer 8 workers x 2000 docs", "gobulk", False, {},
                   ["-workers", "8", "-flush-docs", "2000"])]
    if esbulk:
        table += [("esbulk 2 workers", "esbulk", False, {}, ["-w", "2", "-size", "5000"]),
                  ("esbulk 8 workers x 2000 docs", "esbulk", False, {}, ["-w", "8", "-size", "2000"])]
    return table + [("minimal orjson client", "minimal", False, {}, [])]


def build_gobulk(work: Path, attempts: int = 3):
    """(binary or None, why not): `go build` of benchmarks/gobulk, retrying the module download."""
    if not subprocess.run(["sh", "-c", "command -v go"], capture_output=True).stdout:
        return None, "Go is not installed"
    binary, error = work / "gobulk", ""
    for attempt in range(attempts):
        built = subprocess.run(["go", "build", "-o", str(binary), "."], cwd=GOBULK, capture_output=True,
                               text=True, timeout=600)
        if built.returncode == 0:
            return binary, None
        error = built.stderr.strip().splitlines()[-1:] or ["no output"]
        time.sleep(5 * (attempt + 1))
    return None, f"`go build` failed {attempts} times ({error[0]})"


def command(client, url: str, index: str, path: Path, binaries: dict, state_dir: Path) -> list:
    name, kind, gzip, _, extra = client
    if kind == "gobulk":
        return [str(binaries["gobulk"]), "-url", url, "-index", index, *extra, *(["-gzip"] if gzip else []),
                str(path)]
    if kind == "esbulk":
        return [str(binaries["esbulk"]), "-server", url, "-index", index, "-id", "ipa_id", *extra, str(path)]
    return bench.command(kind, url, index, path, gzip, state_dir, {}) + extra


def cluster_cpu_s(cluster) -> float:
    """User+system CPU seconds of the cluster's node so far (from /proc; the node may run as another user)."""
    pid = (cluster.directory / "opensearch.pid").read_text().strip()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU seconds all cores of the machine spent busy so far (not idle, not waiting for I/O): the
    other processes of a shared machine take cores from the client and the cluster too."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def sample(client, profile: str, url: str, cluster, proxy, path: Path, docs: int, binaries, work: Path,
           number: int) -> dict:
    name, kind, _, env, _ = client
    index = f"peers-{kind}-{number}"
    cluster.fresh_index(index)
    argv = command(client, url, index, path, binaries, Path(tempfile.mkdtemp(dir=work, prefix="state-")))
    cpu_before, wire_before, busy_before = cluster_cpu_s(cluster), proxy.up.bytes if proxy else 0, machine_busy_s()
    harness_before = time.process_time()  # the WAN proxy's threads: the harness only waits for the client
    measured = bench.run_once(argv, env, check=False, timeout=max(120, docs / 100), capture_report=kind == "pushagent")
    measured["harness_cpu_s"] = time.process_time() - harness_before
    measured["machine_busy_s"] = machine_busy_s() - busy_before
    measured["cluster_cpu_s"] = cluster_cpu_s(cluster) - cpu_before
    measured["wire_bytes"] = (proxy.up.bytes - wire_before) if proxy else None
    measured["stored"] = cluster.count(index)
    bench.requests.delete(f"{cluster.url}/{index}")
    measured["setting"] = setting_reached(measured.pop("report", None))
    print(f"  {profile:8} {name:48} run {number + 1}: {docs / measured['wall_s']:7.0f} docs/s "
          f"{measured['cpu_s']:6.2f} s CPU {measured['rss_mib']:5.0f} MiB exit {measured['exit']} "
          f"stored {measured['stored']} {measured['setting'] or ''}", file=sys.stderr, flush=True)
    return measured


def setting_reached(report: dict | None) -> str | None:
    """What pushagent's adaptive sender settled on: its peak and final limit, the most requests it had out at
    once (the memory budget or the reading may keep them under the limit), and its encoding."""
    if not report or "concurrency" not in report:
        return None
    return (f"{report['concurrency_peak']} peak / {report['concurrency']} end allowed, "
            f"{report.get('requests_out_peak', '?')} out at most, {'gzip' if report['compress'] else 'plain'}")


def summarize(client, profile: str, docs: int, samples: list) -> dict:
    def median(key):
        return statistics.median(s[key] for s in samples) if samples[0][key] is not None else None

    wall = median("wall_s")
    return {"client": client[0], "profile": profile, "gzip": client[2], "docs": docs, "runs": len(samples),
            "docs_per_s": docs / wall, "wall_s": wall, "cpu_s": median("cpu_s"), "rss_mib": median("rss_mib"),
            "cluster_cpu_s": median("cluster_cpu_s"), "machine_busy_s": median("machine_busy_s"),
            "harness_cpu_s": median("harness_cpu_s"), "settings": [s["setting"] for s in samples],
            "wire_bytes": median("wire_bytes"),
            "exits": [s["exit"] for s in samples], "exact": all(s["stored"] == docs for s in samples),
            "stored": [s["stored"] for s in samples], "samples": samples}


def compare(args, work: Path) -> dict:
    """Start the cluster (and the WAN proxy), run the rounds, stop both; return the results."""
    records = args.records or (50_000 if args.quick else 100_000)
    Path(args.data).mkdir(parents=True, exist_ok=True)
    path = bench.generate(Path(args.data), f"words-{records}.jsonl", records)
    gobulk, go_missing = build_gobulk(work)
    binaries = {"gobulk": gobulk, "esbulk": args.esbulk}
    clients = [c for c in peer_table(gobulk, args.esbulk) if bench.chosen(c[0], args.only)]
    results = {"records": records, "runs": args.runs, "quick": bool(args.quick),
               "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": [], "only": args.only,
               "wan": {"delay_ms": DELAY_MS, "mbit": MBIT} if args.wan else None,
               "left_out": {"opensearch-go BulkIndexer": go_missing} if go_missing else {}}
    if not args.esbulk:
        results["left_out"]["esbulk"] = "no --esbulk binary given (the Go module proxy refuses esbulk)"
    cluster, proxy = bench.Cluster(work / "cluster"), None
    try:
        results["machine"] = {**bench.machine_facts(cluster.version), "go": _go_version(),
                              **({"esbulk": _esbulk_version(args.esbulk)} if args.esbulk else {})}
        profiles = {"loopback": cluster.url}
        if args.wan:
            proxy = WanProxy(int(cluster.url.rsplit(":", 1)[1]), DELAY_MS, MBIT).start()
            profiles["wan"] = proxy.url
        pairs = [(profile, client) for profile in profiles for client in clients]
        samples = {(p, c[0]): [] for p, c in pairs}
        warm_up(cluster, path, work)
        for number in range(args.runs):
            shift = number * len(pairs) // max(args.runs, 1)  # each round starts elsewhere in the order
            for profile, client in pairs[shift:] + pairs[:shift]:
                samples[(profile, client[0])].append(
                    sample(client, profile, profiles[profile], cluster, proxy, path, records, binaries, work, number))
            results["rows"] = [summarize(c, p, records, samples[(p, c[0])]) for p, c in pairs]
            save(results)  # after every round, so that an interrupted run keeps what it measured
    finally:
        if proxy:
            proxy.stop()
        cluster.stop()
    return results


def warm_up(cluster, path: Path, work: Path) -> None:
    """One unmeasured push of the minimal client: a fresh node compiles its indexing path during its first
    requests, which would slow whichever row the first round starts with."""
    cluster.fresh_index("peers-warm-up")
    bench.run_once(bench.command("minimal", cluster.url, "peers-warm-up", path, False, work, {}), {}, check=False)
    bench.requests.delete(f"{cluster.url}/peers-warm-up")


def _go_version() -> str:
    try:
        return subprocess.run(["go", "env", "GOVERSION"], capture_output=True, text=True).stdout.strip() or "none"
    except OSError:
        return "none"


def save(results: dict) -> None:
    bench.RESULTS.mkdir(parents=True, exist_ok=True)
    (bench.RESULTS / "peers.json").write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))


def _esbulk_version(binary: str) -> str:
    return subprocess.run([binary, "-v"], capture_output=True, text=True).stdout.strip()


def main(args) -> int:
    from report import write_peers_report  # benchmarks/report.py

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the node and the proxy
    work = Path(tempfile.mkdtemp(prefix="pushagent-peers-"))
    work.chmod(0o755)  # as root, dev-cluster.sh runs OpenSearch as its own user, which must reach the directory
    results = compare(args, work)
    save(results)
    write_peers_report(results, bench.RESULTS / "peers.md")
    print(f"wrote {bench.RESULTS / 'peers.md'}", file=sys.stderr)
    return 0
