#!/usr/bin/env bash
# Install everything, then run the whole test suite (servers are started and stopped by the tests).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
exec python3 -m pytest -q -rs -p no:cacheprovider "$@"
