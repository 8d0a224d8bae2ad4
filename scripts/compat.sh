#!/usr/bin/env bash
# Run the same short scenario on every server line Maven Central serves as an integ-test zip and write
# the matrix to docs/compatibility.md (scripts/compat_scenario.py says what each step checks).
#
#   scripts/compat.sh                                      every line below, one after the other
#   scripts/compat.sh opensearch:2.0.0 elasticsearch:8.19.0  only these (DISTRIBUTION:VERSION)
#
# Each node is a single node on 127.0.0.1 started and stopped (by its PID) through scripts/dev-cluster.sh,
# heap PUSHAGENT_CLUSTER_HEAP (512m). Not run by CI, which runs the test suite on OpenSearch 2.19.1 and
# Elasticsearch 8.15.0; this is how the other lines are checked. PUSHAGENT_COMPAT_DOC writes elsewhere.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEV_CLUSTER="$ROOT/scripts/dev-cluster.sh"
SCENARIO="$ROOT/scripts/compat_scenario.py"
DOC="${PUSHAGENT_COMPAT_DOC:-$ROOT/docs/compatibility.md}"
LINES=("$@")
# OpenSearch 1.3 is past its end of life but still widely run, and like 2.0 it has no point-in-time API.
[ ${#LINES[@]} -gt 0 ] || LINES=(opensearch:1.3.20 opensearch:2.0.0 opensearch:2.19.1 opensearch:3.6.0
                                elasticsearch:7.17.29 elasticsearch:8.19.0)
export PUSHAGENT_CLUSTER_HEAP="${PUSHAGENT_CLUSTER_HEAP:-512m}"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/pushagent-compat.XXXXXX")
chmod 755 "$WORK"   # as root the node runs as another user, which must reach its directory
RUNNING=()          # distribution, version, directory of the node up now

log() { echo "compat: $*" >&2; }

node() {  # node ACTION DISTRIBUTION VERSION [DIR]: dev-cluster.sh for one server line
  local action=$1 distribution=$2 version=$3; shift 3
  PUSHAGENT_CLUSTER="$distribution" PUSHAGENT_OPENSEARCH_VERSION="$version" \
    PUSHAGENT_ELASTICSEARCH_VERSION="$version" "$DEV_CLUSTER" "$action" "$@"
}

stop_running() {
  [ ${#RUNNING[@]} -eq 3 ] || return 0
  node stop "${RUNNING[@]}" || true
  RUNNING=()
}

cleanup() { stop_running; rm -rf "$WORK"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

run_line() {
  local distribution=${1%%:*} version=${1#*:} dir url started start_log
  dir="$WORK/$distribution-$version"; mkdir -p "$dir"; chmod 755 "$dir"
  start_log="$dir/start.log"
  log "$distribution $version: starting"
  started=$(date +%s.%N)
  RUNNING=("$distribution" "$version" "$dir")
  if ! url=$(node start "$distribution" "$version" "$dir" 2>"$start_log"); then
    log "$distribution $version did not start: $(tail -1 "$start_log")"
    python3 "$SCENARIO" run --server "$distribution $version" --out "$WORK/result-$1.json" \
      --start-error "$(grep -v '^\s*$' "$start_log" | tail -3 | tr '\n' ' ' | cut -c1-300)"
    stop_running; return
  fi
  local seconds; seconds=$(python3 -c "import sys; print(round($(date +%s.%N) - $started, 1))")
  log "$distribution $version: up at $url in $seconds s; running the scenario"
  python3 "$SCENARIO" run --url "$url" --node-dir "$dir" --server "$distribution $version" \
    --start-seconds "$seconds" --work "$WORK" --out "$WORK/result-$1.json"
  stop_running
}

results=()
for line in "${LINES[@]}"; do
  run_line "$line"
  results+=("$WORK/result-$line.json")
done
python3 "$SCENARIO" render "${results[@]}" > "$DOC.tmp"
mv "$DOC.tmp" "$DOC"
log "wrote $DOC"
