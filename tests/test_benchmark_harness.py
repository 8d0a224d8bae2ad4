"""The benchmark harness on a small workload: it measures, and every client it runs delivers every document.

Not a timed test: it checks that `benchmarks/run.py` still works (the null
sink counts, pushagent and the floor clients run under GNU time, rows carry
their figures), so the published table can always be produced again.
"""

import socket
import sys
import threading
import time

import pytest
from support import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import run as bench  # noqa: E402  (benchmarks/ is not a package)
from wanproxy import WanProxy  # noqa: E402

RECORDS = 2_000
# Clients that need only the package's own dependencies; the peers need the bench extras.
KINDS = ("pushagent", "minimal", "curl")


@pytest.fixture
def sink():
    null_sink = bench.NullSink()
    yield null_sink
    null_sink.stop()


def test_every_client_delivers_every_document_to_the_null_sink(sink, tmp_path):
    data = bench.generate(tmp_path, "words.jsonl", RECORDS)
    clients = [client for client in bench.client_table(quick=True) if client[1] in KINDS]
    chunks = {(data, gzip): bench.prebuilt_chunks(data, "bench-curl", tmp_path / f"chunks-{gzip}", gzip)
              for gzip in (False, True)}
    rows = bench.measure(clients, "sink", sink, data, RECORDS, 1, chunks, tmp_path)  # asserts the sink's count
    assert [row["client"] for row in rows] == [client[0] for client in clients]
    python_clients = {client[0] for client in clients if client[1] != "curl"}  # curl may finish in under a tick
    for row in rows:
        assert row["docs_per_s"] > 0 and row["rss_mib"] > 0, row
        assert row["cpu_s"] > 0 or row["client"] not in python_clients, row
    wire = {(row["client"].removesuffix(" gzip"), row["gzip"]): row["bytes"] for row in rows}
    for (client, gzip), sent in wire.items():
        if gzip and (client, False) in wire:
            assert sent < wire[(client, False)] / 1.5, f"{client}: gzip sent {sent} bytes"


def test_the_null_sink_capacity_is_measured_with_prebuilt_bodies(sink, tmp_path):
    data = bench.generate(tmp_path, "words.jsonl", RECORDS * 3)
    for gzip in (False, True):
        assert bench.sink_capacity(sink, data, gzip=gzip, seconds=0.5) >= bench.CHUNK


# ---------------------------------------------------------------- the WAN profile

MBIT, DELAY_MS = 40, 25


class CountingServer:
    """Reads each connection to its end, then answers b"ok": the end of an upload is seen by the sender."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._drain, args=(connection,), daemon=True).start()

    @staticmethod
    def _drain(connection):
        with connection:
            while connection.recv(1 << 16):
                pass
            connection.sendall(b"ok")


@pytest.fixture
def wan():
    server = CountingServer()
    proxy = WanProxy(server.port, delay_ms=DELAY_MS, mbit=MBIT).start()
    yield proxy
    proxy.stop()
    server.listener.close()


def upload(port: int, nbytes: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.sendall(b"x" * nbytes)
        connection.shutdown(socket.SHUT_WR)
        assert connection.recv(2) == b"ok"


@pytest.mark.parametrize("connections", [1, 4])
def test_the_wan_proxy_shares_one_link_of_the_set_rate(wan, connections):
    total = MBIT * 1e6 / 8 * 0.6  # 0.6 s of the link, however many connections share it
    threads = [threading.Thread(target=upload, args=(wan.port, int(total / connections)))
               for _ in range(connections)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    elapsed = time.monotonic() - started - 2 * DELAY_MS / 1000  # the last byte's trip and the answer's
    rate = total * 8 / elapsed / 1e6
    assert 0.75 * MBIT <= rate <= 1.1 * MBIT, f"{connections} connection(s): {rate:.1f} Mbit/s through a {MBIT} Mbit/s link"


def test_the_wan_proxy_adds_its_latency_each_way(wan):
    with socket.create_connection(("127.0.0.1", wan.port)) as connection:
        started = time.monotonic()
        connection.sendall(b"x")
        connection.shutdown(socket.SHUT_WR)
        assert connection.recv(2) == b"ok"
        round_trip = time.monotonic() - started
    assert 2 * DELAY_MS / 1000 <= round_trip <= 2 * DELAY_MS / 1000 + 0.1, f"round trip {round_trip * 1000:.0f} ms"


# ---------------------------------------------------------------- the opensearch-go peer

def test_the_opensearch_go_peer_builds_and_delivers_every_document(sink, tmp_path):
    import peers  # benchmarks/peers.py

    binary, why_not = peers.build_gobulk(tmp_path, attempts=1)
    if binary is None:
        pytest.skip(f"opensearch-go peer not built: {why_not}")
    data = bench.generate(tmp_path, "words.jsonl", RECORDS)
    client = next(c for c in peers.peer_table(binary, None) if c[1] == "gobulk")
    argv = peers.command(client, sink.url, "bench", data, {"gobulk": binary}, tmp_path)
    measured = bench.run_once(argv, {}, check=False, timeout=60)
    assert measured["exit"] == 0, measured.get("stderr")
    assert sink.counters()["docs"] == RECORDS


def test_the_peers_report_gives_ratios_to_the_best_exact_peer_and_what_bounds_each_row(tmp_path):
    from report import write_peers_report  # benchmarks/report.py

    def row(client, docs_per_s, cpu_s, cluster_cpu_s, wire_bytes=None, stored=1000, exits=(0,), busy=1.0,
            harness=0.0, settings=(None,)):
        wall = 1000 / docs_per_s  # the figures are given per second of wall time
        return {"client": client, "profile": "wan", "docs_per_s": docs_per_s, "wall_s": wall, "cpu_s": cpu_s * wall,
                "cluster_cpu_s": cluster_cpu_s * wall, "wire_bytes": wire_bytes and wire_bytes * wall,
                "machine_busy_s": busy * wall, "harness_cpu_s": harness * wall, "settings": list(settings),
                "rss_mib": 50, "exits": list(exits), "exact": stored == 1000, "stored": [stored]}

    results = {"records": 1000, "runs": 1, "started": "now", "machine": {"cores": 2}, "quick": True,
               "wan": {"delay_ms": 25, "mbit": 100},
               "rows": [row("pushagent defaults", 3000, 0.5, 0.5, wire_bytes=12e6, settings=["6 peak / 4 end, gzip"]),
                        row("peer that lost documents", 9000, 0.1, 0.1, stored=900, exits=(1,)),
                        row("peer on a core", 2000, 1.0, 0.3), row("peer waiting", 1000, 0.1, 0.2),
                        row("peer on a busy machine", 1500, 0.3, 0.6, busy=1.9, harness=0.2)]}
    write_peers_report(results, tmp_path / "peers.md")
    lines = {line.split(" | ")[0].strip("| "): line for line in (tmp_path / "peers.md").read_text().splitlines()}
    assert "| 1.50x |" in lines["pushagent defaults"] and "| link |" in lines["pushagent defaults"]
    assert "**no** (900)" in lines["peer that lost documents"]
    assert "| 1.00x |" in lines["peer on a core"] and "client CPU (a core)" in lines["peer on a core"]
    assert "waiting on round trips" in lines["peer waiting"]
    assert "2 shared cores (client 0.3, cluster 0.6, harness and WAN proxy 0.2, other processes 0.8)" in \
        lines["peer on a busy machine"]
    assert lines["pushagent defaults"].endswith("| 6 peak / 4 end, gzip |")
    target = next(line for name, line in lines.items() if name.startswith("wan at default settings"))
    assert "1.5x peer on a core" in target and "| 1.50x | yes |" in target
