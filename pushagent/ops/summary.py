"""What a person reads at the end of push, drain and verify: the facts of the `--json` report in a few lines.

The summary answers three questions: where did the records go, did the
index prove it, and what to do next. Counters are taken from the report as
the ledger names them, so a new outcome shows up without a change here.
"""

import dataclasses

from pushagent.ops.progress import human_bytes, human_duration
from pushagent.state.ledger import Ledger

ID_LIMIT = 3          # ids shown on a line; the --json report and `verify --full` list more
CHECK_NAMES = {"count": "count", "sample": "sample", "timestamp": "timestamps", "full": "full scan"}


def summary_lines(report: dict) -> list[str]:
    """The summary of a push, drain or verify report, one fact per line."""
    lines = [_headline(report)]
    if not _nothing_due(report):
        lines += [line for line in (_counters_line(report), _transfer_line(report)) if line]
    lines += verification_lines(report.get("verification"))
    lines.append("  next: " + next_step(report))
    return lines


def _headline(report: dict) -> str:
    batch = report.get("batch_id") or "(all batches)"
    if _nothing_due(report):
        return f"batch {batch}: nothing was due, nothing sent"
    words = {"dry_run": "dry run finished, nothing was sent", "verification_failed": "verification FAILED",
             "stopped": "stopped at the first record that could not be indexed (--on-error stop)"}
    headline = f"batch {batch}: {words.get(report['status'], report['status'])}"
    outside = sum(report.get(name, 0) for name in ("queued", "dead", "quarantined"))
    if outside and report["status"] in ("pushed", "verified", "verification_failed"):
        headline += f"; {outside:,} record{'s' * (outside != 1)} not in the index"
    return headline


def _nothing_due(report: dict) -> bool:
    return "remaining" in report and report["status"] == "incomplete" and not report.get("read")


def _counters_line(report: dict) -> str:
    # The ledger's outcomes, then any the run's own counters add (a newer ledger than this module knows).
    names = [field.name for field in dataclasses.fields(Ledger)]
    names += [name for name in report.get("this_run", {}) if name not in names and name != "would_send"]
    if "would_send" in report:
        names = [("would_send" if name == "indexed" else name) for name in names]
    if "taken" in report:       # a drain reads nothing: it takes items from the retry queue
        names = [("taken" if name == "read" else name) for name in names]
    # `unchanged` only means something to --incremental: it is shown when there are any.
    parts = [f"{name.replace('_', ' ')} {report[name]:,}" for name in names
             if name in report and (name != "unchanged" or report[name])]
    parts += [f"{name} {report[name]:,}" for name in ("duplicates", "superseded", "acked") if report.get(name)]
    return "  " + ", ".join(parts) if parts else ""


def _transfer_line(report: dict) -> str:
    if "bytes_sent" not in report:
        return ""
    seconds = report.get("duration_s") or 0.0
    rate = report.get("docs_per_s", report.get("items_per_s", 0.0))
    requests = report.get("requests", 0)
    if report["status"] == "dry_run":
        return f"  wrote {requests} request bodies, {_seconds(seconds)}, {rate:,.0f} records/s"
    return (f"  sent {human_bytes(report['bytes_sent'])} in {requests} request{'s' * (requests != 1)}"
            f" ({report.get('retries', 0)} retries), {_seconds(seconds)}, {rate:,.0f} records/s")


def _seconds(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else human_duration(seconds)


def _ids(ids) -> str:
    ids = list(ids or [])
    if not ids:
        return ""
    shown = ", ".join(str(i) for i in ids[:ID_LIMIT])
    return f" ({shown}{', ...' if len(ids) > ID_LIMIT else ''})"


def verification_lines(verification: dict | None) -> list[str]:
    """One line per check: passed or FAILED, with the first ids where something failed."""
    if not verification:
        return []
    lines = [f"  verification {'passed' if verification['ok'] else 'FAILED'}:"]
    for name, label in CHECK_NAMES.items():
        check = verification.get(name)
        if check is not None:
            lines.append(f"    {label:<10} {'ok  ' if check['ok'] else 'FAIL'} {_check_detail(name, check)}")
    return lines


def _check_detail(name: str, check: dict) -> str:
    if "error" in check:
        return f"could not check: {check['error']}"
    return {"count": _count_detail, "sample": _sample_detail, "timestamp": _timestamp_detail,
            "full": _full_detail}[name](check)


def _count_detail(check: dict) -> str:
    text = f"{check['actual']:,} documents in the index, {check['expected']:,} expected"
    if check.get("superseded"):
        text += f", {check['superseded']:,} superseded by later batches"
    if check.get("missing"):
        text += f"; {check['missing']:,} missing{_ids(check.get('missing_ids'))}"
    if check.get("waiting_in_queue"):
        text += f"; {check['waiting_in_queue']} wait in the retry queue"
    if check.get("replaced_ids"):
        text += f"; {len(check['replaced_ids'])} replaced by another writer{_ids(check['replaced_ids'])}"
    if check.get("still_present_ids"):
        text += f"; {len(check['still_present_ids'])} deleted ids still present{_ids(check['still_present_ids'])}"
    return text


def _sample_detail(check: dict) -> str:
    bad = len(check["mismatched"]) + len(check["missing"])
    text = f"{check['size'] - bad} of {check['size']} sampled documents match the source"
    if check["mismatched"]:
        text += f"; {len(check['mismatched'])} differ{_ids(check['mismatched'])}"
    if check["missing"]:
        text += f"; {len(check['missing'])} missing{_ids(check['missing'])}"
    return text


def _timestamp_detail(check: dict) -> str:
    if check["ok"]:
        return f"none last updated before {check['expected_date']}"
    return f"{check['older']:,} last updated before {check['expected_date']}{_ids(check['ids'])}"


def _full_detail(check: dict) -> str:
    parts = [f"{check[kind]:,} {kind}{_ids(check.get(kind + '_ids'))}" for kind in ("missing", "mismatched", "extra")]
    return ", ".join(parts)


def next_step(report: dict) -> str:
    """The one thing to do now, from the report's status, counters and checks."""
    batch = report.get("batch_id")
    scope = f" --batch-id {batch}" if batch else ""
    status = report["status"]
    if status == "dry_run":
        return "read the request bodies in the --dry-run directory; push without --dry-run to send them"
    if status == "interrupted":
        return "run the same command again: it resumes where it stopped"
    if status == "failed":
        return "fix the cause named by `pushagent: error:`, then run the same command again: it resumes"
    if status == "stopped":
        return (f"`pushagent queue list --status dead{scope}` shows why; the same command pushes the rest "
                "(the refused records stay in the dead letter)")
    if report.get("enqueued"):
        return (f"`pushagent drain --all{scope}` sends the {_documents(report['enqueued'])} just queued, "
                "then verify again")
    return _verification_step(report.get("verification"), scope) or _queue_step(report, scope) or "nothing to do"


def _queue_step(report: dict, scope: str) -> str:
    remaining = report.get("remaining")
    if remaining is not None:
        return _drain_step(report, remaining, scope)
    if report.get("queued"):
        return (f"`pushagent drain --all{scope}` sends the {report['queued']} queued records now "
                "(a later `pushagent drain` sends them when they fall due)")
    if report.get("dead") or report.get("quarantined"):
        refused = report.get("dead", 0) + report.get("quarantined", 0)
        return f"`pushagent queue list --status dead{scope}` shows why {_records(refused)} refused"
    return ""


def _items(count: int) -> str:
    return f"{count} item is" if count == 1 else f"{count} items are"


def _records(count: int) -> str:
    return f"{count} record was" if count == 1 else f"{count} records were"


def _documents(count: int) -> str:
    return f"{count:,} document" + "s" * (count != 1)


def _drain_step(report: dict, remaining: dict, scope: str) -> str:
    waiting = remaining.get("due", 0) + remaining.get("later", 0)
    if waiting:
        when = f", the next due {report['next_due_at']}" if report.get("next_due_at") else ""
        return (f"{_items(waiting)} waiting for the next attempt{when}: `pushagent drain --all{scope}` sends "
                "them now, `--wait 10m` waits for them")
    if remaining.get("dead"):
        return (f"{_items(remaining['dead'])} dead: `pushagent queue list --status dead{scope}` shows why, "
                "`pushagent queue requeue-dead` makes them pending again")
    if remaining.get("leased"):
        return f"{_items(remaining['leased'])} being sent by another drainer"
    if report.get("read") and scope:
        return f"`pushagent verify{scope}` checks the batch again"
    return ""


def _verification_step(verification: dict | None, scope: str) -> str:
    if not verification or verification["ok"]:
        return ""
    count, full = verification.get("count") or {}, verification.get("full") or {}
    if count.get("waiting_in_queue"):
        return f"`pushagent drain --all{scope}`, then verify again"
    if count.get("missing") or full.get("missing") or full.get("mismatched") or count.get("replaced_ids"):
        return f"`pushagent verify{scope} --full --repair`, then `pushagent drain --all{scope}`"
    if not (verification.get("sample") or {}).get("ok", True):
        return f"`pushagent verify{scope} --full --recompute` finds every document something else changed"
    return "see the failed checks above; `pushagent verify --full` lists every document that differs"


def format_table(rows: list[dict]) -> str:
    """Rows of equal keys as aligned columns under a header of their keys; an empty value shows as -."""
    columns = list(rows[0])
    cells = [[column.replace("_", " ") for column in columns]]
    cells += [["-" if row[column] in (None, "") else str(row[column]) for column in columns] for row in rows]
    widths = [max(len(line[n]) for line in cells) for n in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in cells)
