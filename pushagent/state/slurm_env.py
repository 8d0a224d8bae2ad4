"""The Slurm job this process runs in, read from the variables Slurm sets; empty outside Slurm."""

import os
import socket

# key in run states, reports and sync-state records -> Slurm's variable
VARIABLES = {
    "job_id": "SLURM_JOB_ID",
    "array_job_id": "SLURM_ARRAY_JOB_ID",
    "array_task_id": "SLURM_ARRAY_TASK_ID",
    "restart_count": "SLURM_RESTART_COUNT",
    "node": "SLURMD_NODENAME",
    "job_name": "SLURM_JOB_NAME",
}
NUMBERS = ("job_id", "array_job_id", "array_task_id", "restart_count")


def slurm_facts(environ=None) -> dict:
    """job_id, array_job_id, array_task_id, restart_count, node and job_name; {} outside a job.

    Slurm sets SLURM_RESTART_COUNT only once a job has been requeued: 0 before.
    Ids are numbers, and None where they do not apply (array ids of a plain job).
    """
    environ = os.environ if environ is None else environ
    if not environ.get("SLURM_JOB_ID"):
        return {}
    facts = {key: environ.get(name) or None for key, name in VARIABLES.items()}
    for key in NUMBERS:
        facts[key] = int(facts[key]) if facts[key] and facts[key].isdigit() else None
    facts["restart_count"] = facts["restart_count"] or 0
    facts["node"] = facts["node"] or socket.gethostname().split(".")[0]
    return facts
