#!/usr/bin/env bash
# The main job end to end on this machine: install, start a local OpenSearch,
# generate sample records, push and verify them, and end with the push's summary.
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
  --state-dir "$WORK/state" > "$WORK/summary.txt"
code=$?
set -e
echo "== documents in the index: $(curl -s "$url/words/_count" | python3 -c 'import json,sys; print(json.load(sys.stdin)["count"])')" >&2
echo "== the batches' sync-state records (pushagent state show BATCH prints one whole), and the audit log's hash chain" >&2
pushagent state list --state-dir "$WORK/state"
pushagent state audit --state-dir "$WORK/state"
echo "== stop the cluster with: scripts/dev-cluster.sh stop; the push's summary (--json gives the full report):" >&2
cat "$WORK/summary.txt"
exit "$code"
