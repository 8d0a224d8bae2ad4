"""The adaptive sender against the real OpenSearch, through the fault proxy: the concurrency it finds and
the encoding `compress: auto` keeps, with every record delivered."""

import threading

from faultproxy import Fault, FaultProxy
from support import count, generate, run_push

RECORDS, CHUNK = 3000, 100
SLOW = 1.0          # seconds the proxy holds every bulk request: answers keep that pace at any concurrency
BURST = 3           # whole-request 429s once the sender has reached REACHED requests in flight
REACHED = 6


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
        code, report, stderr = run_push(proxy.url, index, state_dir, data, env={
            "PUSHAGENT_CHUNK_DOCS": str(CHUNK), "PUSHAGENT_CONCURRENCY": "2", "PUSHAGENT_MAX_CONCURRENCY": "8"},
            timeout=120)
        bulks = proxy.bulk_requests()
    assert code == 0, stderr
    assert (report["read"], report["indexed"], report["statuses"].get("429")) == (RECORDS, RECORDS, BURST)
    assert count(cluster_url, index) == RECORDS
    before = [r.in_flight for r in bulks if r.number <= rejected[0]]
    after = [r.in_flight for r in bulks if r.number > rejected[-1]]
    assert before[:2] == [1, 2] and max(before) >= REACHED, before        # from 2 it rose to 6
    assert max(after[:3]) <= REACHED // 2, (before, after)                  # halved on the 429s
    assert report["concurrency_peak"] >= REACHED and report["compress"] in (True, False)
