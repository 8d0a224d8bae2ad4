#!/usr/bin/env bash
# Submit a batch as a Slurm array of N shards and a verify job that starts once every shard succeeded
# (--dependency=afterok), or with -n 1 as one push.sbatch job; prints the batch id and the job ids,
# one key=value a line.
#
#     slurm/submit.sh [-n SHARDS] [-b BATCH_ID] INPUT... [pushagent push flags]
#
# -n  number of shards, i.e. array tasks [4]; with fewer input files than shards, the files are
#     split by byte ranges (plain JSONL only)
# -b  batch id [with shards: stem of the first input and the UTC time; alone: derived by pushagent
#     from the inputs]; submit again with the same id to resume from the checkpoints
# Site values (account, partition, mail, activation) come from slurm/site.sh; other sbatch options
# from sbatch's own variables, e.g. SBATCH_TIMELIMIT=2:00:00.
set -euo pipefail
slurm_dir=$(cd "$(dirname "$0")" && pwd)
source "$slurm_dir/site.sh"

usage() { sed -n '6p' "$0" | sed 's/^# *//' >&2; exit 2; }
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

# With fewer input files than shards, pushagent splits them by byte ranges, which a gzip file does not
# allow: refuse now rather than let every task fail at run time. Globs, directories and s3:// prefixes
# are counted by pushagent itself.
refuse_unsplittable_gzip() {
  local inputs=0 gzip=
  for input in "$@"; do
    [[ $input != -* ]] || break
    [[ $input != s3://* && ! -d $input && $input != *[*?[]* ]] || return 0
    inputs=$((inputs + 1))
    [[ $input != *.gz ]] || gzip=$input
  done
  if [[ -n $gzip ]] && (( inputs < shards )); then
    echo "submit.sh: cannot push $inputs input file(s) as $shards shards: $gzip is gzip, which cannot be split" \
      "between shards; give -n $inputs or fewer, or plain .jsonl inputs" >&2
    exit 2
  fi
}
(( shards == 1 )) || refuse_unsplittable_gzip "$@"

# The jobs run copies of the templates: tell them where slurm/ is.
export PUSHAGENT_HOME=${slurm_dir%/slurm}
site=()
[[ -z $PUSHAGENT_ACCOUNT ]] || site+=(--account="$PUSHAGENT_ACCOUNT")
[[ -z $PUSHAGENT_PARTITION ]] || site+=(--partition="$PUSHAGENT_PARTITION")
[[ -z $PUSHAGENT_MAIL_TYPE ]] || site+=(--mail-type="$PUSHAGENT_MAIL_TYPE")
[[ -z $PUSHAGENT_MAIL_USER ]] || site+=(--mail-user="$PUSHAGENT_MAIL_USER")

if (( shards == 1 )); then
  push_job=$(sbatch --parsable "${site[@]}" "$slurm_dir/push.sbatch" "$@" ${batch_id:+--batch-id "$batch_id"})
  [[ -z $batch_id ]] || echo "batch_id=$batch_id"
  echo "push_job=${push_job%%;*}"
  exit
fi

# Every shard and the verify job must know the batch id before any of them runs.
if [[ -z $batch_id ]]; then
  stem=$(basename "$1")
  batch_id=${stem%%.*}-$(date -u +%Y%m%dT%H%M%SZ)
fi
array_job=$(sbatch --parsable "${site[@]}" --array="0-$((shards - 1))" "$slurm_dir/push-array.sbatch" \
  "$@" --batch-id "$batch_id")
array_job=${array_job%%;*}
verify_job=$(sbatch --parsable "${site[@]}" --dependency="afterok:$array_job" --kill-on-invalid-dep=yes \
  "$slurm_dir/verify.sbatch" "$batch_id")
verify_job=${verify_job%%;*}
echo "batch_id=$batch_id"
echo "array_job=$array_job"
echo "verify_job=$verify_job"
