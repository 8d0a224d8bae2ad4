#!/usr/bin/env bash
# Time a sample verification and a full scan against a running cluster.
#   scripts/bench_verify.sh [COUNT] [DIMS] [URL]    e.g. scripts/bench_verify.sh 100000 8
# Creates the index bench-verify-<count>, and deletes it at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
count=${1:-100000}; dims=${2:-8}; url=${3:-http://127.0.0.1:9200}
index="bench-verify-$count"
work=$(mktemp -d)
trap 'rm -rf "$work"; curl -s -XDELETE "$url/$index" >/dev/null' EXIT
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PUSHAGENT_REQUESTS_PER_MINUTE=100000
python3 scripts/generate_data.py --count "$count" --dims "$dims" --out "$work/words.jsonl"
python3 -m pushagent push "$work/words.jsonl" --url "$url" --index "$index" --id-field ipa_id \
    --state-dir "$work/state" --embedding-version bench --no-verify --json > "$work/push.json"
batch=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["batch_id"])' "$work/push.json")
report() {  # label, then the verify flags
    local label=$1; shift
    local start end
    start=$(date +%s.%N)
    python3 -m pushagent verify --url "$url" --state-dir "$work/state" --batch-id "$batch" --json "$@" > "$work/v.json" || true
    end=$(date +%s.%N)
    python3 - "$label" "$start" "$end" "$work/v.json" "$count" "$dims" <<'PY'
import json, sys
label, start, end, path, count, dims = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4], *sys.argv[5:]
report = json.load(open(path))
v, report_s = report["verification"], report["duration_s"]
full = v.get("full", {})
line = f"{label}: {count} docs, dims {dims}: ok={v['ok']} wall {end - start:.2f} s (verify {report_s} s)"
if full:
    line += f"; scan {full['scanned']} ids in {full['seconds']} s = {full['ids_per_s']:.0f} ids/s"
print(line)
PY
}
report "count+sample+timestamp"
report "full (stamps)" --full
report "full (recompute)" --full --recompute
