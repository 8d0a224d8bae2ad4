#!/usr/bin/env bash
# Install everything, then run the whole test suite (servers are started and stopped by the tests).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
PUSHAGENT_CLUSTER=elasticsearch scripts/dev-cluster.sh fetch  # the tests of Elasticsearch-only paths
exec python3 -m pytest -q -rs -p no:cacheprovider "$@"
