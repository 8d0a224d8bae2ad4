"""Chaos suite plumbing: quick or full scale, and the reliability table every scenario adds a row to.

The quick subset runs in the default test run. `scripts/chaos.sh` runs the
full suite (PUSHAGENT_CHAOS_FULL=1) and writes docs/reliability.md.
"""

import os
from pathlib import Path

import pytest

FULL = os.environ.get("PUSHAGENT_CHAOS_FULL") == "1"
COLUMNS = ("scenario", "injected", "records in", "landed", "re-sent", "queued", "dead", "quarantined", "lost")
ROWS = []


def scale(quick, full):
    """The quick value in the default run, the full one under scripts/chaos.sh."""
    return full if FULL else quick


@pytest.fixture
def reliability_row():
    """Call with the row's values (see COLUMNS); the table is written at the end of the session."""
    def add(**values):
        ROWS.append(values)
    return add


def pytest_sessionfinish(session, exitstatus):
    target = os.environ.get("PUSHAGENT_RELIABILITY_OUT")
    if not ROWS or not target or exitstatus != 0:
        return  # a failed session's table would publish a partial run
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in ROWS:
        lines.append("| " + " | ".join(str(row.get(column.replace(" ", "_").replace("-", "_"), ""))
                                        for column in COLUMNS) + " |")
    mode = "full" if FULL else "quick"
    header = (f"# Reliability\n\nProduced by the chaos suite (`scripts/chaos.sh`, {mode} mode) against a real "
              "single-node OpenSearch behind the project's fault-injecting proxy. `lost` counts input records "
              "that are neither in the cluster nor in the retry queue or dead letter: it must be 0.\n\n")
    Path(target).write_text(header + "\n".join(lines) + "\n")
