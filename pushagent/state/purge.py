"""`pushagent queue purge`: clear dead-lettered items once someone has dealt with them, on the record.

Dead items otherwise stay for good (requeue-dead only dead-letters them
again when the data is still wrong) and keep `status` in warning. Every
purge appends an entry to the audit log: who removed how many items of which
batch, and why they matched.
"""

from pushagent.state.records import audit_event

EVENT = "queue_purge"


def purge_dead(retry_queue, state_dir, batch_id=None, reason=None, older_than=None) -> dict:
    """Delete the dead items matching every given filter; return the audit entry written for it."""
    purged = retry_queue.purge(batch_id, reason, older_than)
    return audit_event(state_dir, EVENT, batch_id=batch_id, reason_contains=reason, older_than_s=older_than,
                       purged=purged)
