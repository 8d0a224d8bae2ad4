#!/usr/bin/env bash
# Submit a batch as a Slurm array of N shards and a verify job that starts once every shard succeeded
# (--dependency=afterok); prints the batch id and both job ids, one key=value a line.
#
#     slurm/submit.sh [-n SHARDS] [-b BATCH_ID] INPUT... [pushagent push flags]
#
# -n  number of shards, i.e. array tasks [4]; with fewer input files than shards, the files are
#     split by byte ranges (plain JSONL only)
# -b  batch id [stem of the first input and the UTC time]; submit again with the same id to resume
#     the shards from their checkpoints
# Site values (account, partition, mail, activation) come from slurm/site.sh; other sbatch options
# from sbatch's own variables, e.g. SBATCH_TIMELIMIT=2:00:00.
set -euo pipefail
slurm_dir=$(cd "$(dirname "$0")" && pwd)
source "$slurm_dir/site.sh"

usage() { sed -n '5p' "$0" | sed 's/^# *//' >&2; exit 2; }
shards=4 batch_id=
while getopts "n:b:h" option; do
  case $option in
    n) shards=$OPTARG ;;
    b) batch_id=$OPTARG ;;
    *) usage ;;
  esac
done
shift $((OPTIND - 1))
(( $# )) || usage
[[ $shards =~ ^[1-9][0-9]*$ ]] || { echo "submit.sh: -n needs a positive number, got '$shards'" >&2; exit 2; }
if [[ -z $batch_id ]]; then
  stem=$(basename "$1")
  batch_id=${stem%%.*}-$(date -u +%Y%m%dT%H%M%SZ)
fi

# The jobs run copies of the templates: tell them where slurm/ is.
export PUSHAGENT_HOME=${slurm_dir%/slurm}
site=()
[[ -z $PUSHAGENT_ACCOUNT ]] || site+=(--account="$PUSHAGENT_ACCOUNT")
[[ -z $PUSHAGENT_PARTITION ]] || site+=(--partition="$PUSHAGENT_PARTITION")
[[ -z $PUSHAGENT_MAIL_TYPE ]] || site+=(--mail-type="$PUSHAGENT_MAIL_TYPE")
[[ -z $PUSHAGENT_MAIL_USER ]] || site+=(--mail-user="$PUSHAGENT_MAIL_USER")

array_job=$(sbatch --parsable "${site[@]}" --array="0-$((shards - 1))" "$slurm_dir/push-array.sbatch" \
  "$@" --batch-id "$batch_id")
array_job=${array_job%%;*}
verify_job=$(sbatch --parsable "${site[@]}" --dependency="afterok:$array_job" --kill-on-invalid-dep=yes \
  "$slurm_dir/verify.sbatch" "$batch_id")
verify_job=${verify_job%%;*}
echo "batch_id=$batch_id"
echo "array_job=$array_job"
echo "verify_job=$verify_job"
