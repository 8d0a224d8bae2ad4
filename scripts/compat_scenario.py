#!/usr/bin/env python3
"""The short scenario scripts/compat.sh runs on each server line, and the matrix it writes.

    compat_scenario.py run --url URL --node-dir DIR --server "opensearch 2.0.0" --start-seconds S --work DIR --out FILE
    compat_scenario.py render FILE... > docs/compatibility.md

`run` drives the real CLI (`python -m pushagent`) against one node and writes one JSON result:
each step passes or fails with a short reason. It also reads the node's deprecation log, so a
request the server accepts but deprecates (CRITICAL: removed in the next major) is named.
"""

import argparse
import dataclasses
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import generate_data  # noqa: E402

INDEX = "compat-words"
BATCH_SIZE, DELETES = 2_000, 100
DELETED_IDS = [f"w{number:08d}" for number in range(BATCH_SIZE - DELETES, BATCH_SIZE)]
STEPS = {
    "push": "push a generated batch of 2,000 records with --embedding-version; it verifies at the end",
    "re-push": "push the same files again: every record current, nothing indexed",
    "delete batch": "a second batch of 100 delete operations (op_field, allow_delete: true) on ids of the first",
    "verify --full": "verify --full of the first batch: the scan reads every document; the only differences "
                     "allowed are the 100 ids the delete batch removed",
    "drain": "a document of the first batch edited by hand (its stamp kept): `verify --full --recompute "
             "--repair` queues it and drain puts the batch's content back",
    "doctor": "doctor exits 0 and the server logs no CRITICAL deprecation for its probes",
}
DOC_HEADER = """# Compatibility

The same short scenario on every server line that Maven Central serves as an integ-test zip, run by
[`scripts/compat.sh`](../scripts/compat.sh): one single-node server at a time, on 127.0.0.1, started and
stopped by the script through `scripts/dev-cluster.sh` (512 MiB heap). CI runs the test suite on
OpenSearch 2.19.1 and Elasticsearch 8.15.0 only; this matrix is how the other lines are checked.

What differs between the lines, and how the agent meets it:

- `verify --full` reads through a point in time where the server has one (OpenSearch 2.4 and later,
  Elasticsearch 7.10 and later) and through a scroll sorted on `_doc` where it has none (OpenSearch
  before 2.4, such as 2.0 and 1.3). The version in `GET /` says so when the agent may read it; otherwise
  the refused PIT request (HTTP 400 "no handler found", 404 or 405) does. The scroll needs only read
  privilege, is cleared at the end, and its pages must add up to its total like the PIT's.
- The Elasticsearch integ-test zips serve no `GET /` (HTTP 405): `doctor` then reads the cluster name and
  version from `GET /_nodes/_local`, and does not fail the connection for it.
- Without security, Elasticsearch 7 routes `POST /_security/user/_has_privileges` as a typed index request
  (a CRITICAL deprecation in its log): `doctor` first asks `GET /_security/_authenticate` and skips the
  privilege check where that is not served.
"""


@dataclasses.dataclass
class Step:
    ok: bool
    short: str              # the matrix cell
    detail: str = ""        # the per-server list
    seconds: float = 0.0


class Scenario:
    def __init__(self, url: str, node_dir: Path, work: Path):
        self.url, self.node_dir, self.work = url.rstrip("/"), node_dir, work
        self.state = work / "state"
        self.first_batch = None

    def cli(self, *args, env=None) -> tuple[int, dict, str]:
        """(exit code, JSON report or {}, stderr) of one pushagent command against the node."""
        environ = {k: v for k, v in os.environ.items() if not k.startswith("PUSHAGENT_")}
        environ.update({"PYTHONPATH": str(ROOT), "PUSHAGENT_REQUESTS_PER_MINUTE": "6000", **(env or {})})
        done = subprocess.run([sys.executable, "-m", "pushagent", *map(str, args), "--url", self.url, "--state-dir",
                               str(self.state), "--json"], capture_output=True, text=True, timeout=600, env=environ)
        try:
            report = json.loads(done.stdout) if done.stdout.strip() else {}
        except ValueError:
            report = {}
        return done.returncode, report, done.stderr

    def push(self, *inputs, index=INDEX, extra=(), env=None):
        return self.cli("push", *inputs, "--index", index, "--id-field", "ipa_id", *extra, env=env)

    def count(self, index: str) -> int:
        requests.post(f"{self.url}/{index}/_refresh", timeout=60)
        return requests.get(f"{self.url}/{index}/_count", timeout=60).json()["count"]

    # -- the steps, in order: each returns a Step ---------------------------------------------------------

    def step_push(self) -> Step:
        requests.delete(f"{self.url}/{INDEX}", timeout=60)  # a node used before
        data = self.work / "words-0001.jsonl"
        generate_data.write_records(str(data), BATCH_SIZE, 8, 42)
        code, report, stderr = self.push(data, extra=["--embedding-version", "v1"])
        self.first_batch = report.get("batch_id")
        if code == 0 and report.get("status") == "verified":
            return Step(True, "pass", f"{report['indexed']:,} indexed, verified")
        return Step(False, f"fail: {failure(code, report, stderr)}")

    def step_re_push(self) -> Step:
        code, report, stderr = self.push(self.work / "words-0001.jsonl", extra=["--embedding-version", "v1"])
        if code == 0 and report.get("indexed") == 0 and report.get("current") == BATCH_SIZE:
            return Step(True, "pass", f"{report['current']:,} current, 0 indexed, {report['status']}")
        return Step(False, f"fail: {failure(code, report, stderr)}",
                    f"indexed {report.get('indexed')}, current {report.get('current')}")

    def step_delete_batch(self) -> Step:
        deletes = self.work / "deletes-0002.jsonl"
        deletes.write_text("".join(json.dumps({"ipa_id": doc_id, "op": "delete"}) + "\n" for doc_id in DELETED_IDS))
        config = self.work / "deletes.yaml"
        config.write_text("op_field: op\nallow_delete: true\n")
        code, report, stderr = self.push(deletes, extra=["--config", config, "--embedding-version", "v1"])
        left = self.count(INDEX)
        applied = f"the {DELETES} deletes were applied ({left:,} documents left)" if left == BATCH_SIZE - DELETES \
            else f"{BATCH_SIZE - left} of {DELETES} deletes applied"
        if code == 0 and report.get("status") == "verified" and left == BATCH_SIZE - DELETES:
            return Step(True, "pass", f"{applied}, verified")
        problems = report.get("verification", {}).get("problems") or [""]
        short = failure(code, report, stderr)
        count = report.get("verification", {}).get("count", {})
        if left == BATCH_SIZE - DELETES and count.get("expected") == DELETES:
            short = (f"the deletes are applied, but verification counts the deleted ids as documents to hold "
                     f"(count: {count['expected']:,} expected, {count['actual']:,} found; exit {code})")
        return Step(False, f"fail: {short}", f"{applied}; {problems[0][:300]}")

    def step_verify_full(self) -> Step:
        code, report, stderr = self.cli("verify", "--batch-id", self.first_batch, "--full")
        full = report.get("verification", {}).get("full", {})
        api = "scroll" if "has no point-in-time API" in stderr else "point in time"
        if "scanned" not in full:
            return Step(False, f"fail: {full.get('error') or failure(code, report, stderr)}")
        only_deletes = (full["missing"] == DELETES and set(full["missing_ids"]) <= set(DELETED_IDS)
                        and not full["extra"] and not full["mismatched"])
        superseded = f", superseded {full['superseded']}" if "superseded" in full else ""
        detail = (f"{full['scanned']:,} scanned through a {api} ({full['ids_per_s']:,.0f} ids/s), missing "
                  f"{full['missing']}, extra {full['extra']}, mismatched {full['mismatched']}{superseded}; "
                  f"verify exited {code}")
        if code == 0 or (code == 3 and only_deletes):
            note = "" if code == 0 else ": the 100 missing are the deleted ids, which verify still counts " \
                                        "against the first batch (see the delete batch)"
            return Step(True, f"pass ({api})", detail + note)
        return Step(False, f"fail ({api}): {failure(code, report, stderr)}", detail)

    def step_drain(self) -> Step:
        # A document edited by hand: verify --full --repair queues it, drain must put our content back.
        doc_id, url = "w00000007", f"{self.url}/{INDEX}/_doc/w00000007"
        original = requests.get(url, timeout=60).json()["_source"]
        requests.put(url, json={**original, "word": "edited by hand"}, params={"refresh": "true"},
                     timeout=60).raise_for_status()
        code, report, stderr = self.cli("verify", "--batch-id", self.first_batch, "--full", "--recompute",
                                        "--repair")
        queued = report.get("verification", {}).get("full", {}).get("mismatched_ids")
        if queued != [doc_id]:
            return Step(False, f"fail: verify --full --repair found {queued}, not [{doc_id}]",
                        failure(code, report, stderr))
        code, report, stderr = self.cli("drain", "--all")
        restored = requests.get(url, timeout=60).json().get("_source", {}) == original
        if code == 0 and restored:
            return Step(True, "pass", f"{doc_id}, edited by hand, queued by verify --full --recompute --repair, "
                                      f"restored by drain ({report.get('acked')} acknowledged)")
        return Step(False, f"fail: {failure(code, report, stderr)}", f"restored: {restored}")

    def step_doctor(self) -> Step:
        code, report, stderr = self.cli("doctor", "--index", INDEX)
        checks = {check["name"]: check for check in report.get("checks", [])}
        failed = [f"{c['name']}: {c['detail']}" for c in checks.values() if c["status"] == "fail"]
        shown = "; ".join(f"{name}: {checks[name]['detail']}" for name in ("cluster", "privileges") if name in checks)
        if code == 0:
            return Step(True, "pass", shown)
        return Step(False, f"fail: {failed[0] if failed else failure(code, report, stderr)}", shown)


def failure(code: int, report: dict, stderr: str) -> str:
    """The first thing a user would read about a failed command, short enough for the matrix."""
    verification = report.get("verification", {})
    if verification.get("problems"):
        failed = [name for name in ("count", "sample", "timestamp", "full")
                  if not verification.get(name, {}).get("ok", True)]
        count = verification.get("count", {})
        if "count" in failed and "actual" in count:
            failed[0] = f"count: holds {count['actual']:,}, expected {count['expected']:,}"
        return f"exit {code}, {report.get('status')} ({'; '.join(failed)})"
    if report.get("error"):
        return f"exit {code}: {report['error']}"
    lines = [line for line in stderr.splitlines() if line.strip()]
    return f"exit {code}: {lines[-1][:300] if lines else 'no output'}"


def critical_deprecations(node_dir: Path) -> list[str]:
    """Messages of the CRITICAL deprecations in the node's JSON deprecation log (7.x, 8.x and OpenSearch)."""
    found = []
    for log in sorted((node_dir / "logs").glob("*_deprecation.json")):
        for line in log.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if "CRITICAL" in (entry.get("level"), entry.get("log.level")):
                found.append(str(entry.get("message"))[:200])
    return found


def run(args) -> dict:
    result = {"server": args.server, "start_seconds": args.start_seconds}
    if args.start_error:
        return {**result, "steps": {name: dataclasses.asdict(Step(False, "fail: the node did not start",
                                                                    args.start_error)) for name in STEPS}}
    scenario = Scenario(args.url, Path(args.node_dir), Path(tempfile.mkdtemp(prefix="compat-", dir=args.work)))
    return {**result, "java": java_version(args.url), "steps": run_steps(scenario)}


def java_version(url: str) -> str | None:
    fields = {"filter_path": "nodes.*.jvm.version,nodes.*.jvm.vm_vendor"}
    try:
        nodes = requests.get(f"{url}/_nodes/_local/jvm", params=fields, timeout=30).json().get("nodes", {})
    except (requests.RequestException, ValueError):
        return None
    jvm = next(iter(nodes.values()), {}).get("jvm", {})
    return f"{jvm.get('vm_vendor', '')} {jvm.get('version', '')}".strip() or None


def run_steps(scenario: Scenario) -> dict:
    steps = {}
    for name in STEPS:
        before, started = critical_deprecations(scenario.node_dir), time.monotonic()
        try:
            step = getattr(scenario, "step_" + re.sub(r"\W+", "_", name).strip("_"))()
        except Exception as error:  # one broken step must not hide the others
            step = Step(False, f"fail: {type(error).__name__}: {str(error)[:200]}")
        new = critical_deprecations(scenario.node_dir)[len(before):]
        if new:
            step.detail += f"; the server logged {len(new)} CRITICAL deprecation(s): {new[0]}"
            step.ok, step.short = (False, "fail: CRITICAL deprecation logged") if name == "doctor" else \
                (step.ok, step.short + " (deprecation logged)")
        step.seconds = round(time.monotonic() - started, 1)
        steps[name] = dataclasses.asdict(step)
    return steps


def render(paths: list[str]) -> str:
    results = [json.loads(Path(path).read_text()) for path in paths]
    servers = [pretty(result["server"]) for result in results]
    lines = [DOC_HEADER, f"Last run: {datetime.date.today().isoformat()}, pushagent commit {commit()}.", "",
             "| step | " + " | ".join(servers) + " |", "| --- |" + " --- |" * len(servers)]
    for name in STEPS:
        cells = [cell(result["steps"].get(name, {}).get("short", "not run")) for result in results]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| node start (s) | " + " | ".join(str(r["start_seconds"]) for r in results) + " |", "",
              "## What each step checks", ""]
    lines += [f"- **{name}**: {what}." for name, what in STEPS.items()]
    for server, result in zip(servers, results):
        lines += ["", f"## {server}", "", f"Java: {result.get('java') or 'unknown'}; started in "
                  f"{result['start_seconds']} s.", "", "| step | result | seconds | detail |",
                  "| --- | --- | --- | --- |"]
        for name, step in result["steps"].items():
            lines.append(f"| {name} | {cell(step['short'])} | {step['seconds']} | {cell(step['detail'])} |")
    lines += ["", "## Rerun", "", "```bash", "scripts/compat.sh                                  # every line, "
              "one after the other", "scripts/compat.sh opensearch:2.0.0 elasticsearch:8.19.0   # only these",
              "```", "", "It needs Maven (the zips come from Maven Central), Java 17, and Java 21 or newer for "
              "OpenSearch 3 (found under /usr/lib/jvm, or set OPENSEARCH_JAVA_HOME). It rewrites this file with the "
              "lines it ran.", ""]
    return "\n".join(lines)


def cell(text: str) -> str:
    """Text that stays inside one Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def pretty(server: str) -> str:
    distribution, version = server.split()
    names = {"opensearch": "OpenSearch", "elasticsearch": "Elasticsearch"}
    return f"{names.get(distribution, distribution)} {version}"


def commit() -> str:
    done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("run", help="run the scenario against one node, write its JSON result")
    one.add_argument("--url", help="the node's URL")
    one.add_argument("--node-dir", help="the dev-cluster.sh directory (its logs/ is read)")
    one.add_argument("--server", required=True, help='"DISTRIBUTION VERSION"')
    one.add_argument("--start-seconds", type=float, default=None)
    one.add_argument("--start-error", help="the node did not start: record every step as failed with this reason")
    one.add_argument("--work", default=None, help="where the scenario's inputs and state go [a temporary directory]")
    one.add_argument("--out", required=True)
    matrix = commands.add_parser("render", help="write the Markdown matrix of JSON results to stdout")
    matrix.add_argument("results", nargs="+")
    args = parser.parse_args()
    if args.command == "run":
        Path(args.out).write_text(json.dumps(run(args), indent=2))
    else:
        sys.stdout.write(render(args.results))


if __name__ == "__main__":
    main()
