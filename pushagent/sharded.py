"""A batch pushed in shards (`push --shard K/N`), as `verify --batch-id` sees it.

Every shard keeps its own run state and table of documents
(`runs/<batch>.shard-K-of-N.json` and `.docs.db`): one writer each, on
whatever node its array task ran. The batch can be verified once all N have
finished: their tables are then merged into the batch's own
`runs/<batch>.docs.db`, which the checks read like an unsharded batch's, and
the batch's record gets the totals and each shard's facts.
"""

import glob
import re

from .checkpoint import COUNTERS, DONE_STATUSES, CheckpointStore
from .doctable import DocTable, table_path
from .errors import PushAgentError
from .shard import Shard, run_key


def shard_states(state_dir, batch_id: str) -> dict:
    """{Shard: RunState} of the batch's shards, in shard order; empty for a batch pushed whole."""
    store = CheckpointStore(state_dir)
    name = re.compile(re.escape(batch_id) + r"\.shard-(\d+)-of-(\d+)\.json")
    shards = []
    for path in store.directory.glob(f"{glob.escape(batch_id)}.shard-*.json"):
        match = name.fullmatch(path.name)
        if match:
            shards.append(Shard(int(match[1]), int(match[2])))
    return {shard: store.load(run_key(batch_id, shard)) for shard in sorted(shards)}


def check_finished(batch_id: str, states: dict) -> None:
    """Refuse a batch unless one split's N shards have all finished pushing."""
    counts = sorted({shard.count for shard in states})
    if len(counts) > 1:
        raise PushAgentError(
            f"batch {batch_id} was pushed in {' and in '.join(map(str, counts))} shards: cannot tell which split "
            "to verify", hint=f"move the run states (runs/{batch_id}.shard-K-of-N.*) of the abandoned split away, "
                              "then verify again")
    count = counts[0]
    problems = [_unfinished(states.get(Shard(index, count)), Shard(index, count)) for index in range(count)]
    problems = [problem for problem in problems if problem]
    if problems:
        raise PushAgentError(
            f"batch {batch_id} cannot be verified before all its shards have finished: {'; '.join(problems)}",
            hint=f"push those shards (`pushagent push INPUT... --batch-id {batch_id} --shard K/{count}`, or "
                 f"`slurm/submit.sh -n {count} -b {batch_id} INPUT...`), then verify again")


def _unfinished(state, shard: Shard) -> str:
    if state is None:
        return f"shard {shard} never ran"
    return "" if state.status in DONE_STATUSES else f"shard {shard} is {state.status}"


def merged_table(state_dir, batch_id: str, shards, sample_size: int) -> DocTable:
    """The batch's table, rebuilt from its shards' tables (a shard pushed again since changes it)."""
    table = DocTable(table_path(state_dir, batch_id), sample_size, batch_id)
    try:
        table.merge([table_path(state_dir, run_key(batch_id, shard)) for shard in shards], batch_id)
    except PushAgentError:
        table.close()
        raise
    return table


def batch_fields(table: DocTable, states: dict, indices: list) -> dict:
    """The sync-state fields of the whole batch: totals over the shards, and each shard's run and Slurm job."""
    counts = table.counts()
    return {"doc_count": counts["distinct"], "duplicates": counts["duplicates"], "checksum": table.checksum(),
            "indices": table.indices() or indices,
            "counters": {name: sum(state.counters.get(name, 0) for state in states.values()) for name in COUNTERS},
            "started_at": min(state.started_at for state in states.values()),
            "finished_at": max(state.updated_at for state in states.values()),
            "shards": [{"shard": str(shard), "status": state.status, "counters": state.counters,
                        "started_at": state.started_at, "updated_at": state.updated_at, "slurm": state.slurm}
                       for shard, state in states.items()]}
