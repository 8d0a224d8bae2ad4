"""The benchmark harness on a small workload: it measures, and every client it runs delivers every document.

Not a timed test: it checks that `benchmarks/run.py` still works (the null
sink counts, pushagent and the floor clients run under GNU time, rows carry
their figures), so the published table can always be produced again.
"""

import sys

import pytest

from support import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import run as bench  # noqa: E402  (benchmarks/ is not a package)

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
