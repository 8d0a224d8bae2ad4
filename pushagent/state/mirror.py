"""Off-cluster copy of a batch's state in S3-compatible storage (`state_mirror: s3://bucket/prefix`).

After each batch, also an interrupted one, the files that say what the agent
pushed are uploaded under the prefix with their local layout, so the remote
side can audit the cluster without any inbound connection.
"""

import logging

from pushagent.errors import PushAgentError

# Relative to state_dir and to the mirror prefix alike.
MIRRORED = ("sync-state/{batch_id}.json", "audit.jsonl", "audit.head", "runs/{run_key}.json")

log = logging.getLogger(__name__)


def mirror_state(config, batch_id: str, run_key: str | None = None) -> dict | None:
    """Upload the batch's sync-state record, the audit log with its head and the run checkpoint, where they exist.

    `run_key` names the run checkpoint of one shard; the batch id names a whole batch's.

    Returns {"uploaded": [urls]} plus "error" when an upload failed, or None
    without `state_mirror`. A failure is logged, not fatal: the push itself
    is done, and the next batch uploads the whole audit log again.
    """
    if not config.state_mirror:
        return None
    from pushagent.inputs import s3  # boto3 is imported only when a mirror is configured
    uploaded = []
    try:
        for relative in (name.format(batch_id=batch_id, run_key=run_key or batch_id) for name in MIRRORED):
            path = config.state_path / relative
            if path.is_file():
                url = f"{config.state_mirror.rstrip('/')}/{relative}"
                s3.upload(url, path.read_bytes(), config.s3_endpoint_url)
                uploaded.append(url)
    except PushAgentError as error:
        log.warning("state mirror: upload failed: %s", error)
        return {"uploaded": uploaded, "error": str(error)}
    log.info("state mirror: uploaded %d file(s) to %s", len(uploaded), config.state_mirror)
    return {"uploaded": uploaded}
