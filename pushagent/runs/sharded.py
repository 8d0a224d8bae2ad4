"""A batch pushed in shards (`push --shard K/N`), as `verify --batch-id` sees it.

Every shard keeps its own run state and table of documents
(`runs/<batch>.shard-K-of-N.json` and `.docs.db`): one writer each, on
whatever node its array task ran. The batch can be verified once all N have
finished: their tables are then merged into the batch's own
`runs/<batch>.docs.db`, which the checks read like an unsharded batch's, and
the batch's record gets the totals and each shard's facts.
"""

import fcntl
import glob
import json
import logging
import re

from pushagent.errors import ConfigError, PushAgentError
from pushagent.inputs.reader import expand_inputs
from pushagent.inputs.shard import Shard, run_key
from pushagent.state.checkpoint import DONE_STATUSES, CheckpointStore, write_atomically
from pushagent.state.doctable import DocTable, table_path
from pushagent.state.ledger import Ledger

log = logging.getLogger(__name__)


def agreed_inputs(state_dir, key: str, files, s3_endpoint_url=None) -> list:
    """The input list every shard of a batch uses: the first task's (`runs/<key>.manifest.json`).

    Each task expands the globs itself; a file that appears (or goes) between
    two tasks' starts would otherwise go to no shard or to two. A later task
    whose expansion differs uses the manifest's files while they are unchanged,
    and refuses when one of them changed.
    """
    directory = CheckpointStore(state_dir).directory
    directory.mkdir(parents=True, exist_ok=True)
    manifest = directory / f"{key}.manifest.json"
    mine = [f.fingerprint() for f in files]
    with open(directory / f"{key}.manifest.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not manifest.exists():
            write_atomically(manifest, json.dumps({"inputs": mine}, indent=1).encode())
            return files
        agreed = json.loads(manifest.read_text())["inputs"]
    if agreed == mine:
        return files
    current = expand_inputs([entry["path"] for entry in agreed], s3_endpoint_url)
    if [f.fingerprint() for f in current] != agreed:
        raise ConfigError(f"the inputs of batch {key} changed since its first shard started", file=str(manifest),
                          hint="restore them, or push the new inputs as another batch (--batch-id)")
    log.warning("this shard's inputs differ from the %d files the batch's first shard found: using those",
                len(agreed))
    return current


def batch_progress(state_dir, batch_id: str, shard: Shard, state) -> dict:
    """The fields of a sharded batch's sync-state record while its shards push: totals over the shards
    (`state` is this shard's, newer than its saved checkpoint), and which shards are not done."""
    states = {key: value for key, value in shard_states(state_dir, batch_id).items() if key.count == shard.count}
    states[shard] = state
    everyone = [Shard(index, shard.count) for index in range(shard.count)]
    waiting = [str(s) for s in everyone if states.get(s) is None or states[s].status not in DONE_STATUSES]
    return {"counters": Ledger.total(s.counters for s in states.values()).as_dict(),
            "shards": [{"shard": str(s), "status": states[s].status if s in states else "not started"}
                       for s in everyone],
            "waiting_for_shards": waiting}


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
            "counters": Ledger.total(state.counters for state in states.values()).as_dict(),
            "started_at": min(state.started_at for state in states.values()),
            "finished_at": max(state.updated_at for state in states.values()),
            "shards": [{"shard": str(shard), "status": state.status, "counters": state.counters.as_dict(),
                        "started_at": state.started_at, "updated_at": state.updated_at, "slurm": state.slurm}
                       for shard, state in states.items()]}
