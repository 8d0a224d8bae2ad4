"""`verify --full --delete-extra`: delete what the index holds and a snapshot batch no longer does.

The deletions carry the batch's version with `version_type: external`, so a
document a newer write put there meanwhile answers 409 and stays. A guard
refuses, before anything is deleted, when the extra documents exceed
`max_delete_fraction` of the batch's: a truncated snapshot must not empty the
index. Every run that deletes is written to the audit log.
"""

import threading

from pushagent.cluster.bulk import ChunkSender, Outcome
from pushagent.cluster.ratelimit import bucket_for
from pushagent.cluster.transport import TransferStats
from pushagent.documents.builder import Doc, action_line
from pushagent.errors import ConfigError
from pushagent.runs.fullscan import DIFF
from pushagent.state.records import audit_event

EVENT = "delete_extra"
LISTED = 20


class DeleteRefused(ConfigError):
    """--delete-extra refused before deleting anything (the scan's findings are still recorded)."""


def over_threshold(extra: int, batch_docs: int, fraction: float) -> bool:
    """More extra documents than `fraction` of the batch's: a shrinking snapshot to look at first."""
    return extra > fraction * max(batch_docs, 1)


def delete_extra(config, cluster, table, settings, batch_id: str, snapshot: bool, force: bool) -> dict:
    """Delete, on `cluster`, the extra documents the full scan found in `table`; returns what happened (also
    audited)."""
    if not snapshot:
        raise DeleteRefused("--delete-extra deletes every document of the index that the batch does not hold: only "
                          "for a batch that is the whole index; nothing was deleted",
                          hint="add --snapshot if this batch is a full snapshot of the index")
    extra = table.query(DIFF["extra"] + " ORDER BY 1, 2", {"batch": batch_id}).fetchall()
    _refuse_unless_allowed(config, len(extra), table.counts()["distinct"], force)
    deletes = [_delete(index, doc_id, settings.batch_version) for index, doc_id, _ in extra]
    outcome = _send_deletes(config, cluster, deletes)
    done = {"extra": len(extra), "deleted": len(outcome.indexed), "kept_newer": len(outcome.current),
            "failed": len(outcome.retry) + len(outcome.dead), "ids": [doc_id for _, doc_id, _ in extra[:LISTED]]}
    if extra:
        audit_event(config.state_path, EVENT, batch_id=batch_id, forced=force, **done)
    return done


def _refuse_unless_allowed(config, extra: int, batch_docs: int, force: bool) -> None:
    if not config.allow_delete:
        raise DeleteRefused("--delete-extra deletes documents, which allow_delete forbids; nothing was deleted",
                          hint="set allow_delete: true (or PUSHAGENT_ALLOW_DELETE=true) to let this batch delete")
    if over_threshold(extra, batch_docs, config.max_delete_fraction) and not force:
        raise DeleteRefused(
            f"refusing to delete {extra} extra documents: {extra / max(batch_docs, 1):.1%} of the batch's "
            f"{batch_docs}, above max_delete_fraction ({config.max_delete_fraction:.0%}); nothing was deleted",
            hint="check that the snapshot is whole (a truncated input looks like this); --force deletes anyway")


def _delete(index: str, doc_id: str, version: int) -> Doc:
    return Doc(index, doc_id, version, "delete", action_line("delete", index, doc_id, version), None, "",
               "verify --delete-extra", 0)


def _send_deletes(config, cluster, docs: list):
    stats = TransferStats()
    sender = ChunkSender(cluster.transport(stats), config, stats, bucket_for(config), threading.Event())
    outcome = Outcome()
    for start in range(0, len(docs), config.chunk_docs):
        outcome.merge(sender.resolve(docs[start:start + config.chunk_docs]))
    return outcome
