"""`pushagent queue stats|list`: the retry queue as JSON or as lines for people."""

import dataclasses
from pathlib import Path

from pushagent.ops.progress import human_duration
from pushagent.state.records import utc_iso
from pushagent.state.retry_queue import QueueItem, configured_queue
from pushagent.state.retry_queue.base import summarize

EMPTY_STATS = summarize([], {}, 0.0)


def read_queue(config, action, empty):
    """action(queue) on the configured queue; `empty` when it is a SQLite file that does not exist yet,
    which looking at it must not create (nor its state directory)."""
    url = config.resolved_queue_url
    if url.startswith("sqlite://") and not Path(url[len("sqlite://"):]).exists():
        return empty
    with configured_queue(config) as retry_queue:
        return action(retry_queue)


def item_summary(item: QueueItem) -> dict:
    """An item without its source line (which can be large): where it came from and why it waits."""
    summary = {k: v for k, v in dataclasses.asdict(item).items() if k not in ("source", "lease")}
    summary["next_attempt_at"] = utc_iso(item.next_attempt_at) if item.next_attempt_at else None
    summary["source_bytes"] = len(item.source or b"")
    return summary


def format_stats(stats: dict) -> str:
    lines = [_counts_line("queue", stats)]
    lines += [_counts_line(f"  {batch_id}", counts) for batch_id, counts in stats["batches"].items()]
    if stats["by_kind"]:
        lines.append("  by kind: " + ", ".join(f"{kind} {n}" for kind, n in sorted(stats["by_kind"].items())))
    return "\n".join(lines)


def _counts_line(label: str, counts: dict) -> str:
    return f"{label}: {counts_text(counts)}"


def counts_text(counts: dict) -> str:
    """Due, later, leased and dead items and the oldest item's age, in words."""
    age = counts.get("oldest_age_s")
    return (f"{counts['due']} due now, {counts['later']} later, {counts['leased']} leased, {counts['dead']} dead"
            + (f", oldest {human_duration(age)} old" if age is not None else ""))


def format_items(items: list) -> str:
    if not items:
        return "no items"
    return "\n".join(f"{item.status:7} {item.kind:11} {item.key}  {item.input_file}:{item.line}"
                     f"  attempts {item.attempts}  {item.last_error[:120]}" for item in items)

