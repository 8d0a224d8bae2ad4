#!/usr/bin/env bash
# The main job end to end on this machine: install, start a local OpenSearch,
# generate sample records, push and verify them, and show the batch's sync-state record.
#
#   scripts/demo.sh [COUNT]      (default 100000 records with 384-float embeddings)
set -euo pipefail
cd "$(dirname "$0")/.."
COUNT="${1:-100000}"
WORK="${TMPDIR:-/tmp}/pushagent-demo"

scripts/install.sh
url=$(scripts/dev-cluster.sh start)
mkdir -p "$WORK"
data="$WORK/words-$COUNT.jsonl.gz"
[ -s "$data" ] || python3 scripts/generate_data.py --count "$COUNT" --out "$data"

echo "== pushing $COUNT records to $url (index words)" >&2
set +e
pushagent push "$data" --url "$url" --index words --id-field ipa_id --embedding-version demo-v1 \
  --state-dir "$WORK/state" --json > "$WORK/report.json"
code=$?
set -e
python3 -m json.tool "$WORK/report.json"
echo "== exit code $code; documents in the index: $(curl -s "$url/words/_count" | python3 -c 'import json,sys; print(json.load(sys.stdin)["count"])')" >&2
batch=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["batch_id"])' "$WORK/report.json")
echo "== the sync-state record of batch $batch, and the audit log's hash chain" >&2
pushagent state show "$batch" --state-dir "$WORK/state"
pushagent state audit --state-dir "$WORK/state"
echo "== stop the cluster with: scripts/dev-cluster.sh stop" >&2
exit "$code"
