#!/usr/bin/env bash
# Install what pushagent, its tests and its demo need on a fresh Debian machine:
# system packages (Java 17 and Maven for the local OpenSearch, servers the tests
# talk to, Slurm and munge for the single-node Slurm the slurm/ tests start), then
# this package with its test extras. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

retry() {
  local attempt
  for attempt in 1 2 3 4; do
    "$@" && return 0
    echo "install: attempt $attempt of '$*' failed; retrying" >&2
    sleep $((attempt * 5))
  done
  return 1
}

# command -> Debian package providing it
declare -A PACKAGES=(
  [java]=openjdk-17-jre-headless [mvn]=maven [unzip]=unzip [curl]=curl
  [sbatch]=slurm-wlm [munge]=munge
  [prometheus-pushgateway]=prometheus-pushgateway
  [redis-server]=redis-server
  [nginx]=nginx   # TLS + API key + limit_req front of the test cluster (tests/tlsnginx.py)
)
missing=()
for command in "${!PACKAGES[@]}"; do
  # nginx lives in /usr/sbin, which a non-root PATH may lack
  command -v "$command" >/dev/null 2>&1 || [ -x "/usr/sbin/$command" ] || missing+=("${PACKAGES[$command]}")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install: please install: ${missing[*]}" >&2; exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  retry apt-get update -q
  retry apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

retry python3 -m pip install -q --disable-pip-version-check -e '.[test]'
scripts/dev-cluster.sh fetch
