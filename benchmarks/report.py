"""Turn the harness's results (results.json) into results.md and chart.png."""

import sys
from pathlib import Path

import orjson


def _row(r: dict) -> str:
    wire = f"{r['bytes'] / 1e6:.0f}" if r.get("bytes") else "-"
    return (f"| {r['workload']} | {r['target']} | {r['client']} | {'on' if r['gzip'] else 'off'} | "
            f"{r['docs_per_s']:,.0f} | {r['cpu_s_per_100k']:.2f} | {r['rss_mib']:.0f} | {wire} |")


def _find(rows, client, target="sink", workload="embedding"):
    return next((r for r in rows if r["client"] == client and r["target"] == target and r["workload"] == workload),
                None)


def targets(results: dict) -> list:
    """(target, measured, met) for each of the issue's targets that the results cover."""
    rows, out = results["rows"], []
    push_plain, push_gzip = _find(rows, "pushagent best"), _find(rows, "pushagent best gzip")
    streaming = _find(rows, "opensearch-py streaming_bulk")
    minimal, minimal_gzip = _find(rows, "minimal orjson client"), _find(rows, "minimal orjson client gzip")
    if push_plain and streaming:
        ratio = push_plain["cpu_s"] / streaming["cpu_s"]
        out.append(("embedding CPU/doc <= 0.2x opensearch-py streaming_bulk (gzip off)", f"{ratio:.2f}x",
                    ratio <= 0.2))
    for mine, theirs, label in ((push_plain, minimal, "off"), (push_gzip, minimal_gzip, "on")):
        if mine and theirs:
            ratio = mine["cpu_s"] / theirs["cpu_s"]
            out.append((f"embedding CPU/doc <= 1.3x minimal orjson client (gzip {label})", f"{ratio:.2f}x",
                        ratio <= 1.3))
    out += _tiny_targets(rows)
    cluster = [r for r in rows if r["target"] == "cluster"]
    peers = [r for r in cluster if not r["client"].startswith(("pushagent", "curl"))]
    ours = [r for r in cluster if r["client"].startswith("pushagent")]
    if peers and ours:
        best_peer, best_ours = max(peers, key=lambda r: r["docs_per_s"]), max(ours, key=lambda r: r["docs_per_s"])
        ratio = best_ours["docs_per_s"] / best_peer["docs_per_s"]
        out.append((f"cluster docs/s >= 0.95x best peer ({best_peer['client']})", f"{ratio:.2f}x", ratio >= 0.95))
    specifics = results.get("pushagent", {})
    default = _find(rows, "pushagent default")
    if default:
        out.append(("peak RSS <= 150 MiB at default settings", f"{default['rss_mib']:.0f} MiB",
                    default["rss_mib"] <= 150))
    if specifics.get("rss_1m_mib"):
        ratio = specifics["rss_1m_mib"] / specifics["rss_small_mib"]
        out.append((f"peak RSS at 1M <= 1.2x at {specifics['small_records'] // 1000}k",
                    f"{specifics['rss_1m_mib']:.0f} / {specifics['rss_small_mib']:.0f} MiB = {ratio:.2f}x",
                    ratio <= 1.2))
    if specifics.get("resume_first_request_s") is not None:
        seconds = specifics["resume_first_request_s"]
        out.append(("resume at 90% of 1M: first request within 1 s", f"{seconds:.2f} s", seconds <= 1))
    return out


def _tiny_targets(rows) -> list:
    """Per-document overhead: ~32-byte records on the null sink against opensearch-py's streaming_bulk."""
    ours = _find(rows, "pushagent best", workload="tiny")
    theirs = _find(rows, "opensearch-py streaming_bulk", workload="tiny")
    if not (ours and theirs):
        return []
    speed, cpu = ours["docs_per_s"] / theirs["docs_per_s"], ours["cpu_s"] / theirs["cpu_s"]
    return [("tiny records: null-sink docs/s >= 2x streaming_bulk", f"{speed:.2f}x", speed >= 2),
            ("tiny records: client CPU <= 0.5x streaming_bulk", f"{cpu:.2f}x", cpu <= 0.5)]


def write_report(results: dict, directory: Path) -> None:
    machine = results.get("machine", {})
    lines = [f"# Benchmark results ({results['mode']} mode)", "",
             f"Produced by `python benchmarks/run.py{' --quick' if results['mode'] == 'quick' else ''}` on "
             f"{results['started']}: {results['records']:,} records per workload, median of {results['runs']} "
             "runs per row, in one session, the runs going round-robin over the clients of a table section. "
             "Chunks of 5000 documents; parallel clients use 2 threads, like pushagent's default concurrency. "
             "What the numbers mean and what is left: [analysis.md](analysis.md).", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()), "",
             "Null-sink capacity with prebuilt 5000-document bodies from 2 threads: "
             + ", ".join(f"{k} {v:,.0f} docs/s" for k, v in results.get("sink_capacity", {}).items()), "",
             "## Targets", "", "| target | measured | met |", "| --- | --- | --- |"]
    lines += [f"| {name} | {value} | {'yes' if met else '**no**'} |" for name, value, met in targets(results)]
    lines += ["", "## All runs", "",
              "CPU is the client process's user+sys time (GNU time), per 100k documents; RSS is its peak; "
              "wire MB is the request bodies the null sink received.", "",
              "| workload | target | client | gzip | docs/s | CPU s / 100k docs | peak RSS MiB | wire MB |",
              "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |"]
    lines += [_row(r) for r in results["rows"]]
    specifics = results.get("pushagent")
    if specifics:
        lines += ["", "## pushagent at 1M records and resume", "",
                  f"- default settings (request rate limit lifted), null sink: peak RSS "
                  f"{specifics['rss_small_mib']:.0f} MiB at {specifics['small_records']:,} records, "
                  f"{specifics['rss_1m_mib']:.0f} MiB at 1,000,000 ({specifics['docs_per_s_1m']:,.0f} docs/s, "
                  f"{specifics['cpu_s_per_100k_1m']:.2f} s CPU per 100k)",
                  f"- resume at 90%: a push from line 900,001 was stopped by SIGTERM (exit "
                  f"{specifics['interrupted_exit']}) with its checkpoint at line {specifics['checkpoint_line']:,}; "
                  f"the resumed run sent its first request {specifics['resume_first_request_s']:.2f} s after "
                  "it was started (Python start-up included)"]
    lines += ["", "![chart](chart.png)", ""]
    (directory / "results.md").write_text("\n".join(lines))
    chart(results, directory / "chart.png")


def chart(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r["workload"] == "embedding"]
    fig, axes = plt.subplots(1, 3, figsize=(18, 0.45 * len(rows) + 2), sharey=True)
    labels = [f"{r['client']} ({r['target']})" for r in rows]
    colors = ["tab:green" if r["client"].startswith("pushagent") else "tab:gray" for r in rows]
    for axis, key, title in zip(axes, ("docs_per_s", "cpu_s_per_100k", "rss_mib"),
                                ("docs/s (higher is better)", "client CPU s per 100k docs", "peak RSS MiB")):
        axis.barh(labels, [r[key] for r in rows], color=colors)
        axis.set_title(title)
        axis.invert_yaxis()
    fig.suptitle(f"pushagent vs peers, {results['records']:,} records x 384-float embeddings ({results['mode']} mode)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------- pushagent and its peers (run.py --peers)

def bound(row: dict, cores: int, link_bytes_per_s: float | None) -> str:
    """What limits a row, read from CPU time and bytes against wall time (a heuristic, stated as one)."""
    client, cluster = row["cpu_s"] / row["wall_s"], row["cluster_cpu_s"] / row["wall_s"]
    busy = row.get("machine_busy_s", 0) / row["wall_s"]
    if link_bytes_per_s and row["wire_bytes"] and row["wire_bytes"] / row["wall_s"] >= 0.75 * link_bytes_per_s:
        return "link"
    if client >= 0.9:
        return "client CPU (a core)"
    if max(busy, client + cluster) >= 0.85 * cores:
        harness = (row.get("harness_cpu_s") or 0) / row["wall_s"]
        users = {"client": client, "cluster": cluster, "harness and WAN proxy": harness,
                 "other processes": max(busy - client - cluster - harness, 0)}
        return f"the {cores} shared cores (" + ", ".join(f"{k} {v:.1f}" for k, v in users.items()) + ")"
    return "waiting on round trips (requests in flight)"


def _ok(row: dict) -> bool:
    return row["exact"] and all(status == 0 for status in row["exits"])


def peers_table(results: dict, profile: str) -> list:
    rows = [r for r in results["rows"] if r["profile"] == profile]
    peers = [r for r in rows if not r["client"].startswith("pushagent") and _ok(r)]
    best = max(peers, key=lambda r: r["docs_per_s"]) if peers else None
    wan = results.get("wan") or {}
    link = wan.get("mbit", 0) * 1e6 / 8 if profile == "wan" else None
    cores = results.get("machine", {}).get("cores", 2)
    lines = [f"| client | docs/s | vs best peer | client CPU s | client CPU / wall | cluster CPU / wall | "
             f"harness CPU / wall | machine busy / wall | {'link use | ' if link else ''}peak RSS MiB | exit | exact | "
             "bound | pushagent settled on |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | " + ("---: | " if link else "")
             + "---: | --- | --- | --- | --- |"]
    for r in rows:
        ratio = f"{r['docs_per_s'] / best['docs_per_s']:.2f}x" if best else "-"
        use = f"{r['wire_bytes'] / r['wall_s'] / link:.0%} | " if link and r["wire_bytes"] is not None else ""
        exact = "yes" if r["exact"] else "**no** (" + ", ".join(f"{n:,}" for n in r["stored"]) + ")"
        exits = ", ".join(str(e) for e in r["exits"])
        lines.append(f"| {r['client']} | {r['docs_per_s']:,.0f} | {ratio} | {r['cpu_s']:.1f} | "
                     f"{r['cpu_s'] / r['wall_s']:.2f} | {r['cluster_cpu_s'] / r['wall_s']:.2f} | "
                     f"{(r.get('harness_cpu_s') or 0) / r['wall_s']:.2f} | "
                     f"{r.get('machine_busy_s', 0) / r['wall_s']:.2f} | {use}"
                     f"{r['rss_mib']:.0f} | {exits} | {exact} | {bound(r, cores, link)} | "
                     f"{'; '.join(s for s in r.get('settings') or () if s) or '-'} |")
    if best:
        lines += ["", f"Best peer: {best['client']} ({best['docs_per_s']:,.0f} docs/s)."]
    return lines


def peer_targets(results: dict) -> list:
    """(target, measured, met) for issue 19's targets that a peers run covers."""
    rows, out = results["rows"], []

    def find(client, profile):
        return next((r for r in rows if r["client"] == client and r["profile"] == profile), None)

    def best_peer(profile, prefix):
        peers = [r for r in rows if r["profile"] == profile and r["client"].startswith(prefix)
                 and not r["client"].startswith("pushagent") and _ok(r)]
        return max(peers, key=lambda r: r["docs_per_s"]) if peers else None

    for profile, prefix, factor in (("wan", "", 1.5), ("loopback", "opensearch-go BulkIndexer", 1.0)):
        mine, theirs = find("pushagent defaults", profile), best_peer(profile, prefix)
        if mine and theirs:
            ratio = mine["docs_per_s"] / theirs["docs_per_s"]
            out.append((f"{profile} at default settings >= {factor}x {theirs['client']}, exact, exit 0",
                        f"{ratio:.2f}x", ratio >= factor and _ok(mine)))
    ours = [r for r in rows if r["client"].startswith("pushagent")]
    if ours:
        failed = [f"{r['client']} ({r['profile']})" for r in ours if not _ok(r)]
        out.append(("no pushagent run stops or loses a record, up to max_concurrency 16",
                    f"{len(ours) - len(failed)} of {len(ours)} rows exact with exit 0", not failed))
    return out


def write_peers_report(results: dict, path: Path) -> None:
    machine, wan = results.get("machine", {}), results.get("wan")
    quick = " --quick" if results.get("quick") else ""
    only = f" --only '{results['only']}'" if results.get("only") else ""
    lines = ["# pushagent and its peers on a real cluster" + (" (quick run)" if quick else ""), "",
             f"Produced by `python benchmarks/run.py --peers{' --wan' if wan else ''}{quick}{only}` on "
             f"{results['started']}: "
             f"{results['records']:,} records of 384-float embeddings into the harness's own OpenSearch node, "
             f"median of {results['runs']} runs per row; every round runs every client in every profile, "
             "so load changes hit all rows alike.", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()), ""]
    if wan:
        lines += [f"WAN profile: `benchmarks/wanproxy.py`, {wan['delay_ms']} ms added each way and ONE "
                  f"{wan['mbit']} Mbit/s link per direction shared by all connections.", ""]
    lines += ["Columns: client CPU s is the client's user+sys time (GNU time); CPU / wall is in cores; "
              "cluster CPU is the node's own process over the same run; harness CPU is the harness's own process, "
              "where the WAN proxy's threads run (it shows whether the proxy, not the client, is the bound); "
              "machine busy is all cores' busy time "
              "(the client, the node, the proxy and everything else on the machine); link use is the request bytes the "
              "WAN link carried over its capacity; exact means the index then held exactly the records, in "
              "every run. Bound is read from those figures: the link when it is 75% full, the client when it "
              "uses a whole core, the shared cores when 85% of them are busy, "
              "otherwise waiting on round trips. pushagent settled on: the peak and final requests in flight "
              "its adaptive sender allowed in each run, the most it had out at once, and the encoding "
              "`compress: auto` kept.", ""]
    goals = peer_targets(results)
    if goals:
        lines += ["## Targets (issue 19)", "", "| target | measured | met |", "| --- | --- | --- |"]
        lines += [f"| {target} | {measured} | {'yes' if met else '**no**'} |" for target, measured, met in goals] + [""]
    for profile in dict.fromkeys(r["profile"] for r in results["rows"]):
        lines += [f"## {profile}", ""] + peers_table(results, profile) + [""]
    left_out = results.get("left_out", {})
    if left_out:
        lines += ["## Left out", ""] + [f"- {name}: {why}" for name, why in left_out.items()] + [""]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    directory = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results"
    if (directory / "peers.json").exists():
        write_peers_report(orjson.loads((directory / "peers.json").read_bytes()), directory / "peers.md")
    write_report(orjson.loads((directory / "results.json").read_bytes()), directory)
