#!/usr/bin/env bash
# Start and stop a local single-node OpenSearch (default) or Elasticsearch for tests, the demo and the benchmarks.
#
#   scripts/dev-cluster.sh start [DIR] [PORT]   start (DIR default $TMPDIR/pushagent-dev-cluster,
#                                                PORT default a free one);
#                                                prints the URL on stdout when the node answers
#   scripts/dev-cluster.sh stop [DIR]            stop the node started in DIR (by its PID file)
#   scripts/dev-cluster.sh url [DIR]             print the URL of the node running in DIR
#   scripts/dev-cluster.sh fetch                 only download and unpack the distribution
#
# PUSHAGENT_CLUSTER=elasticsearch picks Elasticsearch 8.15.0 instead of OpenSearch 2.19.1: the
# tests start one for the code paths only Elasticsearch has (its point-in-time API). Versions:
# PUSHAGENT_OPENSEARCH_VERSION, PUSHAGENT_ELASTICSEARCH_VERSION; heap: PUSHAGENT_CLUSTER_HEAP (512m). Java:
# OPENSEARCH_JAVA_HOME / ES_JAVA_HOME, else the oldest installed Java the line runs on (21+ for OpenSearch 3).
# The integ-test zip comes from Maven Central through Maven (cached in ~/.m2) and is
# unpacked once (~/.cache/pushagent, or /var/cache/pushagent for root). Both distributions
# refuse to run as root, so as root the node runs as the system user
# `pushagent-search`, created on first use; DIR must then be reachable by that user.
set -euo pipefail

DISTRIBUTION="${PUSHAGENT_CLUSTER:-opensearch}"
case "$DISTRIBUTION" in
  opensearch)
    VERSION="${PUSHAGENT_OPENSEARCH_VERSION:-2.19.1}"; GROUP="org.opensearch"; ENV_PREFIX="OPENSEARCH"
    DISTRIBUTION_SETTINGS=() ;;
  elasticsearch)
    VERSION="${PUSHAGENT_ELASTICSEARCH_VERSION:-8.15.0}"; GROUP="org.elasticsearch"; ENV_PREFIX="ES"
    # The integ-test zip ships the security module, which would demand TLS and passwords; the
    # tests talk plain HTTP to loopback like they do to OpenSearch.
    DISTRIBUTION_SETTINGS=(-Expack.security.enabled=false) ;;
  *) echo "dev-cluster: PUSHAGENT_CLUSTER is opensearch or elasticsearch, not $DISTRIBUTION" >&2; exit 2 ;;
esac
ARTIFACT="${GROUP}.distribution.integ-test-zip:${DISTRIBUTION}:${VERSION}:zip"
MAVEN_DIR="$HOME/.m2/repository/${GROUP//.//}/distribution/integ-test-zip/${DISTRIBUTION}/${VERSION}"
ZIP="$MAVEN_DIR/${DISTRIBUTION}-${VERSION}.zip"
if [ "$(id -u)" -eq 0 ]; then CACHE="${PUSHAGENT_CACHE:-/var/cache/pushagent}"; else CACHE="${PUSHAGENT_CACHE:-$HOME/.cache/pushagent}"; fi
DEFAULT_DIR="${TMPDIR:-/tmp}/pushagent-dev-cluster"
HOME_DIR="$CACHE/${DISTRIBUTION}-${VERSION}"
PID_FILE="${DISTRIBUTION}.pid"
RUN_USER="pushagent-search"
HEAP="${PUSHAGENT_CLUSTER_HEAP:-512m}"
NAME="$DISTRIBUTION $VERSION"

log() { echo "dev-cluster: $*" >&2; }

# OpenSearch 3 needs Java 21; the older lines (and Elasticsearch 7.17) are tested here on 17.
required_java() {
  if [ "$DISTRIBUTION" = opensearch ] && [ "${VERSION%%.*}" -ge 3 ]; then echo 21; else echo 17; fi
}

java_major() {
  local version
  version=$(sed -n 's/^JAVA_VERSION="\([0-9]*\).*/\1/p' "$1/release" 2>/dev/null)
  [ -n "$version" ] || version=$("$1/bin/java" -version 2>&1 | sed -n '1s/.*version "\([0-9]*\).*/\1/p')
  echo "${version:-0}"
}

# ${ENV_PREFIX}_JAVA_HOME when set, else the oldest installed Java that this server line runs on:
# the one closest to what it was released for.
find_java_home() {
  local override="${ENV_PREFIX}_JAVA_HOME" minimum best="" best_major=1000 candidate major java
  if [ -n "${!override:-}" ]; then echo "${!override}"; return; fi
  minimum=$(required_java)
  java=$(command -v java 2>/dev/null) && java=$(dirname "$(dirname "$(readlink -f "$java")")")
  for candidate in /usr/lib/jvm/* /opt/*jdk* /opt/java/* ${java:+"$java"}; do
    [ -x "$candidate/bin/java" ] || continue
    major=$(java_major "$candidate")
    if [ "$major" -ge "$minimum" ] && [ "$major" -lt "$best_major" ]; then best=$candidate; best_major=$major; fi
  done
  [ -n "$best" ] || {
    log "$NAME needs Java $minimum or newer and none is installed: install openjdk-$minimum-jre-headless or set $override"
    exit 1; }
  echo "$best"
}

fetch() {
  local attempt
  for attempt in 1 2 3 4; do
    [ -s "$ZIP" ] && break
    log "downloading $ARTIFACT (attempt $attempt)"
    mvn -q -B dependency:get -Dartifact="$ARTIFACT" -Dtransitive=false >&2 || sleep $((attempt * 5))
  done
  [ -s "$ZIP" ] || { log "could not download $ARTIFACT from Maven Central"; exit 1; }
  if [ ! -x "$HOME_DIR/bin/$DISTRIBUTION" ]; then
    mkdir -p "$CACHE"
    local tmp; tmp=$(mktemp -d "$CACHE/unpack.XXXXXX")
    unzip -q "$ZIP" -d "$tmp"
    rm -rf "$HOME_DIR"; mv "$tmp/${DISTRIBUTION}-${VERSION}" "$HOME_DIR"; rm -rf "$tmp"
  fi
}

ensure_run_user() {
  [ "$(id -u)" -eq 0 ] || return 0
  id "$RUN_USER" >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin "$RUN_USER"
}

as_run_user() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u "$RUN_USER" -- "$@"; else "$@"; fi
}

# As root the node runs as $RUN_USER, who must be able to enter every parent of DIR: a parent of mode
# 0700 (as `mktemp -d` makes them) ends the node in a Java AccessDeniedException. Refuse first, by name.
refuse_unreachable() {
  local path="" parts part
  [ "$(id -u)" -eq 0 ] || return 0
  IFS=/ read -ra parts <<<"${1#/}"
  for part in "${parts[@]}"; do
    path="$path/$part"
    if ! runuser -u "$RUN_USER" -- test -x "$path"; then
      log "the node runs as user $RUN_USER, who cannot enter $path (mode $(stat -c %a "$path")):" \
        "give a DIR outside it, or chmod o+x '$path'"
      exit 2
    fi
  done
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

start() {
  local dir port java_home
  dir=$(mkdir -p "${1:-$DEFAULT_DIR}" && cd "${1:-$DEFAULT_DIR}" && pwd)
  port="${2:-$(free_port)}"
  if [ -s "$dir/url" ] && [ -s "$dir/$PID_FILE" ] && kill -0 "$(cat "$dir/$PID_FILE")" 2>/dev/null; then
    cat "$dir/url"; return
  fi
  ensure_run_user; refuse_unreachable "$dir"; fetch
  java_home=$(find_java_home)
  rm -rf "$dir/config" "$dir/data" "$dir/logs"
  cp -r "$HOME_DIR/config" "$dir/config"
  mkdir -p "$dir/data" "$dir/logs"
  [ "$(id -u)" -eq 0 ] && chown -R "$RUN_USER" "$dir" "$HOME_DIR"
  (cd "$dir" && as_run_user env "${ENV_PREFIX}_JAVA_HOME=$java_home" "${ENV_PREFIX}_PATH_CONF=$dir/config" \
      "${ENV_PREFIX}_JAVA_OPTS=-Xms$HEAP -Xmx$HEAP" "$HOME_DIR/bin/$DISTRIBUTION" -d -p "$dir/$PID_FILE" \
      "${DISTRIBUTION_SETTINGS[@]}" -Ecluster.name=pushagent-dev -Enode.name=dev -Ediscovery.type=single-node \
      -Enetwork.host=127.0.0.1 -Ehttp.port="$port" -Etransport.port=0 \
      -Epath.data="$dir/data" -Epath.logs="$dir/logs" \
      -Ecluster.routing.allocation.disk.threshold_enabled=false >"$dir/stdout.log" 2>&1) || {
    log "$NAME did not start; see $dir/stdout.log"; tail -20 "$dir/stdout.log" >&2; exit 1; }
  local url="http://127.0.0.1:$port"
  for _ in $(seq 1 180); do
    if curl -fsS "$url/_cluster/health?wait_for_status=yellow&timeout=1s" >/dev/null 2>&1; then
      echo "$url" > "$dir/url"; echo "$url"; return
    fi
    sleep 1
  done
  log "$NAME did not answer on $url within 180 s; logs in $dir/logs"; stop "$dir"; exit 1
}

stop() {
  local dir="${1:-$DEFAULT_DIR}" pid
  [ -s "$dir/$PID_FILE" ] || { log "no $DISTRIBUTION node running in $dir"; return 0; }
  pid=$(cat "$dir/$PID_FILE")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$dir/$PID_FILE" "$dir/url"
}

case "${1:-}" in
  start) shift; start "$@" ;;
  stop) shift; stop "$@" ;;
  url) cat "${2:-$DEFAULT_DIR}/url" ;;
  fetch) fetch ;;
  *) echo "usage: $0 start [DIR] [PORT] | stop [DIR] | url [DIR] | fetch" >&2; exit 2 ;;
esac
