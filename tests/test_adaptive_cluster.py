"""The adaptive sender against the real OpenSearch, through the fault proxy: the concurrency it finds, with
every record delivered."""

import json
import threading

from faultproxy import Fault, FaultProxy
from support import count, generate, run_push

RECORDS, CHUNK = 3000, 100
SLOW = 2.0          # seconds the proxy holds every bulk request: answers keep that pace at any concurrency,
                    # and the node's own time, however loaded the machine, is small beside it
BURST = 3           # whole-request 429s once the cluster sees REACHED bulk requests at once
REACHED = 6


def limits_in_progress_lines(stderr: str) -> list:
    """The requests in flight the sender allowed, from each JSON progress line, in order."""
    lines = (json.loads(line) for line in stderr.splitlines() if line.startswith("{"))
    return [line["concurrency"] for line in lines if line.get("event") == "progress"]


def test_concurrency_rises_while_answers_keep_pace_and_halves_on_429s(cluster_url, index, state_dir, tmp_path):
    data = generate(tmp_path / "words.jsonl", RECORDS)
    rejected, lock = [], threading.Lock()

    def plan(request):
        if not request.ids:
            return None
        with lock:
            if (rejected or request.in_flight >= REACHED) and len(rejected) < BURST:
                rejected.append(request.number)
                return Fault.reply(429, retry_after="0")
        return Fault.delay(SLOW)
    with FaultProxy(cluster_url, plan) as proxy:
        code, report, stderr = run_push(proxy.url, index, state_dir, data, extra=["--log-format", "json"], env={
            "PUSHAGENT_CHUNK_DOCS": str(CHUNK), "PUSHAGENT_CONCURRENCY": "2", "PUSHAGENT_MAX_CONCURRENCY": "8",
            "PUSHAGENT_PROGRESS_SECONDS": "0.1"}, timeout=120)
        seen_by_cluster = [r.in_flight for r in proxy.bulk_requests()]
    assert code == 0, stderr
    limits = limits_in_progress_lines(stderr)
    assert (report["read"], report["indexed"], report["statuses"].get("429")) == (RECORDS, RECORDS, BURST), \
        (limits, seen_by_cluster)
    assert count(cluster_url, index) == RECORDS
    assert seen_by_cluster[:2] == [1, 2] and max(seen_by_cluster) >= REACHED, seen_by_cluster   # from 2, up to 6
    first_cut = next(at for at in range(1, len(limits)) if limits[at] < limits[at - 1])
    rose, fell = limits[:first_cut], limits[first_cut:]
    # Risen in the progress lines, up to REACHED in the report: a raise and the next can fall between two lines.
    assert rose[0] == 2 and max(rose) > 2 and report["concurrency_peak"] >= REACHED, limits
    # halved on the 429s: from the peak, which may fall between two progress lines
    assert report["concurrency_peak"] >= max(rose) and min(fell) <= report["concurrency_peak"] // 2, limits
