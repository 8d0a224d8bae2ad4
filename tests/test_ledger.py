"""The one counter type: checkpoints old and new, shard totals, the push's commit order, drain's counts."""

import json
import types

import pytest

from pushagent.cluster.bulk import Outcome
from pushagent.cluster.transport import TransferStats
from pushagent.documents.builder import Doc, Rejected
from pushagent.documents.chunker import Chunk, Position
from pushagent.errors import LedgerError
from pushagent.inputs.shard import Shard, run_key
from pushagent.ops.summary import summary_lines
from pushagent.runs.drain import DrainResult
from pushagent.runs.push import _Committer, _Filing, _RunHooks
from pushagent.runs.sharded import batch_progress
from pushagent.state.checkpoint import CheckpointStore, RunState
from pushagent.state.ledger import Ledger

# A checkpoint as versions before --incremental wrote it: no `unchanged`, no key, shard or slurm.
OLD_CHECKPOINT = {
    "batch_id": "words-1", "inputs": [{"path": "/data/words.jsonl", "size": 1000, "mtime_ns": 1, "head_sha256": ""}],
    "settings": {"index": "words"}, "position": {"file_index": 0, "offset": 500, "line": 50},
    "counters": {"read": 50, "indexed": 45, "current": 0, "queued": 3, "dead": 1, "quarantined": 1},
    "status": "interrupted", "started_at": "2026-11-01T10:00:00Z", "updated_at": "2026-11-01T10:05:00Z",
    "files": [{"path": "/data/words.jsonl", "offset": 500, "line": 50, "done": False}]}


pytestmark = pytest.mark.fast


def test_a_checkpoint_written_before_unchanged_existed_loads_and_saves_in_the_same_shape(tmp_path):
    store = CheckpointStore(tmp_path)
    store.directory.mkdir()
    store.path("words-1").write_text(json.dumps(OLD_CHECKPOINT))
    state = store.load("words-1")
    assert state.counters == Ledger(read=50, indexed=45, queued=3, dead=1, quarantined=1)
    state.counters.check("the old batch's")
    state.counters.add(Ledger(read=10, indexed=8, unchanged=2))
    store.save(state)
    saved = json.loads(store.path("words-1").read_text())
    assert list(saved["counters"]) == ["read", "indexed", "current", "unchanged", "queued", "dead", "quarantined"]
    assert saved["counters"] == {"read": 60, "indexed": 53, "current": 0, "unchanged": 2, "queued": 3, "dead": 1,
                                 "quarantined": 1}
    assert {key: saved[key] for key in OLD_CHECKPOINT if key != "counters"} == {
        key: value for key, value in OLD_CHECKPOINT.items() if key != "counters"}
    assert RunState.from_json(saved) == state


@pytest.mark.parametrize("counters", [7, ["read"], {"read": "many"}])
def test_a_checkpoint_whose_counters_are_no_ledger_is_unreadable(tmp_path, counters):
    store = CheckpointStore(tmp_path)
    store.directory.mkdir()
    store.path("words-1").write_text(json.dumps({**OLD_CHECKPOINT, "counters": counters}))
    with pytest.raises(Exception, match="checkpoint is unreadable"):
        store.load("words-1")
    assert list(store.states()) == []


def test_the_ledger_checks_its_identity_and_ignores_counters_it_does_not_know():
    ledger = Ledger.from_dict({"read": 4, "indexed": 1, "unchanged": 1, "queued": 1, "skipped_later": 9})
    with pytest.raises(LedgerError, match="read 4 != indexed 1 \\+ current 0 \\+ unchanged 1 \\+ queued 1"):
        ledger.check("this run's")
    ledger.dead = 1
    ledger.check()
    assert (ledger.accounted, ledger.unfinished) == (4, 2)


def shard_state(batch_id: str, shard: Shard, status: str, **counters) -> RunState:
    return RunState(batch_id, [], {}, key=run_key(batch_id, shard), shard=str(shard), status=status,
                    counters=Ledger(**counters))


def test_a_sharded_batch_totals_its_shards_ledgers_with_this_shards_newest(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save(shard_state("words", Shard(0, 3), "pushed", read=10, indexed=9, quarantined=1))
    store.save(shard_state("words", Shard(1, 3), "pushing", read=1, indexed=1))      # older than this run's
    store.save(shard_state("words", Shard(0, 2), "pushed", read=99, indexed=99))     # another split: not counted
    mine = shard_state("words", Shard(1, 3), "pushed", read=5, current=4, queued=1)
    progress = batch_progress(tmp_path, "words", Shard(1, 3), mine)
    assert progress["counters"] == Ledger(read=15, indexed=9, current=4, queued=1, quarantined=1).as_dict()
    assert progress["waiting_for_shards"] == ["2/3"]
    assert [s["status"] for s in progress["shards"]] == ["pushed", "pushed", "not started"]


class Journal:
    """A retry queue, document table and checkpoint store that write down what was done to them, in order."""

    def __init__(self):
        self.entries = []

    def __getattr__(self, name):
        return lambda items, **flags: self.entries.append((name, sorted(getattr(i, "doc_id", None) or i.line
                                                                        for i in items)))

    def table(self, outcome):
        self.entries.append(("table", sorted(doc.doc_id for doc in outcome.indexed + outcome.current)))

    def save(self, state):
        self.entries.append(("checkpoint", state.position.line, state.counters.read))


def doc(line: int) -> Doc:
    return Doc("words", f"w{line}", 1, "index", b"{}", b"{}", "", "words.jsonl", line)


def chunk(seq: int, first: int, last: int, rejected=()) -> Chunk:
    lines = [line for line in range(first, last + 1) if line not in rejected]
    return Chunk(seq, [doc(line) for line in lines], [Rejected("no id", b"{}", "words.jsonl", line)
                                                    for line in rejected], Position(0, last * 10, last))


def test_the_committer_files_each_chunk_at_once_and_commits_only_the_contiguous_prefix():
    journal, told = Journal(), []
    hooks = _RunHooks(lambda event, *args: told.append(event), told.append, journal.save, None)
    state = RunState("b", [], {})
    committer = _Committer(state, Ledger(), hooks, _Filing("b", journal, journal.table),
                           types.SimpleNamespace(resolved=lambda chunk: None))
    second = chunk(1, 4, 6, rejected=(5,))
    committer.handle(second, Outcome(indexed=[second.docs[0]], retry=[(second.docs[1], "429")]), None)
    assert journal.entries == [("table", ["w4"]), ("resolve", ["w4"]), ("resolve", []), ("put", ["w6"]),
                               ("dead_letter", []), ("dead_letter", [5])]
    assert state.counters == Ledger() and told == ["chunk_resolved"]      # chunk 0 is not back yet
    journal.entries.clear()
    first = chunk(0, 1, 3)
    committer.handle(first, Outcome(current=first.docs), None)
    assert journal.entries[0] == ("table", ["w1", "w2", "w3"])
    assert journal.entries[-2:] == [("checkpoint", 3, 3), ("checkpoint", 6, 6)]
    assert state.counters == committer.this_run == Ledger(read=6, current=3, indexed=1, queued=1, quarantined=1)
    assert told == ["chunk_resolved", "chunk_resolved", "committed", "committed"]


def test_a_dry_runs_committer_keeps_nothing_and_saves_no_checkpoint():
    stops = []
    hooks = _RunHooks(lambda *args: None, stops.append, None, lambda: stops.append("stop"))
    state = RunState("b", [], {})
    committer = _Committer(state, Ledger(), hooks, None, types.SimpleNamespace(resolved=lambda chunk: None))
    committer.handle(chunk(0, 1, 2, rejected=(2,)), Outcome(indexed=[doc(1)]), None)
    assert state.counters == Ledger(read=2, indexed=1, quarantined=1) and state.position.line == 2
    assert stops == ["stop"]      # --on-error stop: a quarantined line stops the run


def test_a_drain_reports_what_it_took_as_taken_and_its_summary_says_so():
    ledger = Ledger(read=10, indexed=6, current=1, queued=2, dead=1)
    result = DrainResult("words-1", "incomplete", 3, ledger, 7, TransferStats(), 1.0,
                         {"due": 0, "later": 2, "leased": 0, "dead": 1})
    report = result.report()
    assert (report["taken"], report["read"], report["acked"]) == (10, 10, 7)
    assert summary_lines(report)[1].startswith("  taken 10, indexed 6, current 1, queued 2, dead 1")
