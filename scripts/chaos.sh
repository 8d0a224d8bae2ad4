#!/usr/bin/env bash
# The full chaos suite (crashes, wire faults, outage, full disk, bad input) at full scale;
# writes its table to docs/reliability.md. The default test run has the quick subset.
set -euo pipefail
cd "$(dirname "$0")/.."
PUSHAGENT_CHAOS_FULL=1 PUSHAGENT_RELIABILITY_OUT=docs/reliability.md \
  exec python3 -m pytest -q -p no:cacheprovider tests/chaos "$@"
