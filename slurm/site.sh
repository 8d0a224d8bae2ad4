# shellcheck shell=bash
# Site settings of the pushagent Slurm jobs: the one file a site edits.
# Every value can also be set in the environment of the shell that submits.
# Read by submit.sh (the sbatch options) and by every job, through pushagent-job.sh.

# sbatch options; submit.sh passes them (with a plain `sbatch`, give them yourself, e.g. --account=...)
PUSHAGENT_ACCOUNT=${PUSHAGENT_ACCOUNT:-}                  # --account, e.g. proj0042; empty: your default account
PUSHAGENT_PARTITION=${PUSHAGENT_PARTITION:-}              # --partition; empty: the cluster's default
PUSHAGENT_MAIL_TYPE=${PUSHAGENT_MAIL_TYPE:-FAIL,REQUEUE}  # --mail-type: mail the owner when a job fails or requeues
PUSHAGENT_MAIL_USER=${PUSHAGENT_MAIL_USER:-}              # --mail-user; empty: the submitting user

# inside every job
PUSHAGENT_ACTIVATE=${PUSHAGENT_ACTIVATE:-}   # e.g. 'module load python/3.11 && source ~/venvs/pushagent/bin/activate'
PUSHAGENT_CMD=${PUSHAGENT_CMD:-pushagent}    # the command, once activated (or e.g. "python3 -m pushagent")
PUSHAGENT_CONFIG=${PUSHAGENT_CONFIG:-}       # --config FILE; empty: pushagent's own search (./pushagent.yaml, ...)
PUSHAGENT_MAX_REQUEUES=${PUSHAGENT_MAX_REQUEUES:-5}  # requeues of an interrupted push before the job gives up
PUSHAGENT_REPORT_DIR=${PUSHAGENT_REPORT_DIR:-}       # each run's JSON report; empty: beside the job's log
PUSHAGENT_DRAIN_WAIT=${PUSHAGENT_DRAIN_WAIT:-10m}    # how long a job's drain waits for queued items to fall due
# A cluster that answers nothing useful for outage_seconds stops the push with its checkpoint; in a job it
# exits 75 and the job is requeued (up to PUSHAGENT_MAX_REQUEUES) to try again, instead of failing.
export PUSHAGENT_REQUEUE_ON_OUTAGE=${PUSHAGENT_REQUEUE_ON_OUTAGE:-true}
