"""Sort bulk answers into outcomes (SPEC section 4, item classes)."""

INDEXED = "indexed"
CURRENT = "current"
RETRYABLE = "retryable"
PERMANENT = "permanent"
MISSING_INDEX = "missing_index"     # the cluster refuses to create the target index: stop, nothing is sent

RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
REJECTED_EXECUTION = ("es_rejected_execution_exception", "opensearch_rejected_execution_exception",
                      "rejected_execution_exception")
AUTH_STATUSES = frozenset({401, 403})


def classify_item(item: dict) -> tuple[str, str | None]:
    """(outcome, reason) for one entry of a bulk response's `items`."""
    op, result = next(iter(item.items()))
    status = result.get("status", 0)
    if 200 <= status < 300 or (op == "delete" and status == 404):
        return INDEXED, None
    error = result.get("error") or {}
    reason = f"{status} {error.get('type', 'error')}: {error.get('reason', '')}".strip()
    if status == 409:
        return CURRENT, reason      # the reason names the version the cluster holds
    if status in RETRYABLE_STATUSES or error.get("type") in REJECTED_EXECUTION:
        return RETRYABLE, reason
    if error.get("type") == "index_not_found_exception":
        return MISSING_INDEX, reason
    return PERMANENT, reason


def item_error(item: dict) -> tuple[int, str, str]:
    """(status, error type, the cluster's reason) of one refused entry of a bulk response's `items`."""
    result = next(iter(item.values()))
    error = result.get("error") or {}
    return result.get("status", 0), error.get("type", "error"), str(error.get("reason", ""))


def request_outcome(status: int) -> str:
    """What a whole-request HTTP status means: ok, auth, too_large, retryable or fatal."""
    if status == 200:
        return "ok"
    if status in AUTH_STATUSES:
        return "auth"
    if status == 413:
        return "too_large"
    if status in RETRYABLE_STATUSES:
        return "retryable"
    return "fatal"
