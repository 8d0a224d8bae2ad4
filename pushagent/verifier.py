"""Prove what arrived: count, sample checksums, timestamps, and an optional full scan.

Every check needs only read privilege on the target index: _count, _mget,
_search and point-in-time searches. The expected side is a DocTable: what
the push delivered, or the source files loaded by `load_sources`.
"""

import dataclasses
import tempfile
import time
from pathlib import Path

from .builder import Builder, Doc, canonical_checksum
from .doctable import DocTable
from .errors import PushAgentError
from .fullscan import full_scan, recomputed_checksum, stamped_checksum
from .reader import expand_inputs, read_lines

LIST_LIMIT = 20             # ids listed per problem in a report
FULL_LIST_LIMIT = 1000      # ids listed per category by --full (all of them go to --enqueue-missing)
COUNT_SETTLE_SECONDS = 5.0  # several default refresh intervals (1 s): a busy node refreshes late
COUNT_TIMEOUT_SECONDS = 60.0
LOAD_BATCH = 5_000


@dataclasses.dataclass
class VerifySpec:
    """What to verify against: the batch's stamps and field names."""

    embedding_version: str | None
    expected_date: str | None       # ISO 8601: documents last updated before it are stale
    embedding_version_field: str = "embedding_version"
    timestamp_field: str = "last_updated"
    checksum_field: str = "sync_checksum"
    expected_count: int | None = None  # overrides the table's distinct count (--expected-count)

    @property
    def stamped_fields(self) -> tuple:
        return (self.embedding_version_field, self.timestamp_field, self.checksum_field)


def version_query(spec: VerifySpec) -> dict:
    # match_phrase works whether the field was mapped as keyword or (dynamically) as text.
    if spec.embedding_version is None:
        return {"match_all": {}}
    return {"match_phrase": {spec.embedding_version_field: spec.embedding_version}}


def settled_count(client, index: str, query: dict, expected: int) -> int:
    """_count, polled until it equals `expected` or stops changing.

    A search only sees refreshed segments. `_refresh` would need the
    maintenance privilege, and `refresh=wait_for` belongs on the last bulk
    request, which does not exist with several requests in flight; so we
    poll, which needs only read: the count is final once it has not moved
    for several refresh intervals. An index with refresh disabled
    (refresh_interval -1) never settles to the truth; the report says so.
    Each search also wakes a search-idle shard, which refreshes only then.
    """
    deadline = time.monotonic() + COUNT_TIMEOUT_SECONDS
    last, since = None, time.monotonic()
    while True:
        value = client.request("POST", f"/{index}/_count", {"query": query})["count"]
        if value == expected or time.monotonic() > deadline:
            return value
        if value != last:
            last, since = value, time.monotonic()
        elif time.monotonic() - since >= COUNT_SETTLE_SECONDS:
            return value
        time.sleep(0.5)


def check_count(client, table: DocTable, spec: VerifySpec, indices: list) -> dict:
    """Documents with embedding_version == V, per index, against the distinct ids expected."""
    if spec.embedding_version is None and spec.expected_count is None:
        # Without a version the index may hold other batches' documents: nothing to count against.
        return {"ok": True, "skipped": "no embedding_version to count by (push with --embedding-version)"}
    counts = table.counts()
    expected = counts["per_index"] if spec.expected_count is None else {indices[0]: spec.expected_count}
    actual = {index: settled_count(client, index, version_query(spec), expected.get(index, 0)) for index in indices}
    total_expected, total_actual = sum(expected.values()), sum(actual.values())
    result = {"ok": actual == {i: expected.get(i, 0) for i in indices}, "expected": total_expected,
              "actual": total_actual, "duplicates": counts["duplicates"], "per_index": actual}
    return result


def check_sample(client, sample: list, spec: VerifySpec) -> dict:
    """One _mget of the sampled ids; the checksum is recomputed from each returned _source.

    A document with a higher version whose own stamp matches its content was
    replaced by a newer batch on purpose (external versioning): it is listed
    as `newer`, not as a mismatch. An edit made behind the agent's back also
    raises the version, but leaves a stamp that no longer matches.
    """
    if not sample:
        return {"ok": True, "size": 0, "mismatched": [], "missing": [], "newer": [], "ids": []}
    body = {"docs": [{"_index": index, "_id": doc_id} for index, doc_id, _, _ in sample]}
    found = client.request("POST", "/_mget", body)["docs"]
    result = {"mismatched": [], "missing": [], "newer": []}
    for (index, doc_id, expected, version), doc in zip(sample, found):
        if not doc.get("found"):
            result["missing"].append(doc_id)
            continue
        actual = canonical_checksum(doc["_source"], spec.stamped_fields)
        if actual != expected:
            newer = doc.get("_version", 0) > version and doc["_source"].get(spec.checksum_field) == actual
            result["newer" if newer else "mismatched"].append(doc_id)
    return {"ok": not (result["mismatched"] or result["missing"]), "size": len(sample), **result,
            "ids": [doc_id for _, doc_id, _, _ in sample]}


def check_timestamp(client, indices: list, spec: VerifySpec) -> dict:
    """Documents (of the embedding version) older than the expected date: updates this batch missed."""
    if not spec.expected_date:
        return {"ok": True, "skipped": "no embedding_version and no --expected-date: nothing to compare with"}
    query = {"range": {spec.timestamp_field: {"lt": spec.expected_date}}}
    if spec.embedding_version is not None:
        query = {"bool": {"filter": [query, version_query(spec)]}}
    older, ids = 0, []
    for index in indices:
        # Settled like the count: the documents this batch just re-stamped may not be searchable yet.
        found = settled_count(client, index, query, 0)
        older += found
        if found:
            hits = client.request("POST", f"/{index}/_search", {"query": query, "size": LIST_LIMIT, "_source": False})
            ids += [hit["_id"] for hit in hits["hits"]["hits"]][:LIST_LIMIT - len(ids)]
    return {"ok": older == 0, "expected_date": spec.expected_date, "older": older, "ids": ids}


def load_sources(paths, settings, table: DocTable) -> None:
    """Build every source record as the push would and keep its (index, id, checksum) in `table`."""
    builder, batch = Builder(settings), []
    for input_file in expand_inputs(paths):
        for entry in read_lines(input_file):
            item = builder.build(entry.data, input_file.path, entry.number)
            if isinstance(item, Doc) and item.op == "index":
                batch.append(item)
            if len(batch) >= LOAD_BATCH:
                table.add(batch, replace_equal=False)
                batch = []
    table.add(batch, replace_equal=False)


def temporary_table(sample_size: int, seed: str):
    """A DocTable in a temporary directory (bounded memory for any number of ids)."""
    directory = tempfile.TemporaryDirectory(prefix="pushagent-verify-")
    return directory, DocTable(Path(directory.name) / "source.db", sample_size, seed)


def run_checks(client, table: DocTable, spec: VerifySpec, indices: list, sample: list) -> dict:
    """Count, sample and timestamp checks; a cluster error becomes a failed check, not a crash."""
    result = {}
    checks = {"count": lambda: check_count(client, table, spec, indices),
              "sample": lambda: check_sample(client, sample, spec),
              "timestamp": lambda: check_timestamp(client, indices, spec)}
    for name, check in checks.items():
        try:
            result[name] = check()
        except PushAgentError as error:
            result[name] = {"ok": False, "error": error.message}
    return summarize(result)


def add_full_scan(client, result: dict, table: DocTable, indices: list, spec: VerifySpec, recompute: bool) -> dict:
    """The full scan, by stored stamps or (`recompute`) by checksums recomputed from every _source."""
    checksum = recomputed_checksum(spec.stamped_fields) if recompute else stamped_checksum(spec.checksum_field)
    try:
        # A point in time sees what was refreshed when it opened. A search first makes a search-idle
        # shard refresh (it skips scheduled refreshes until searched), and waits out a count that moves.
        expected = table.counts()["per_index"]
        for index in indices:
            settled_count(client, index, {"match_all": {}}, expected.get(index, 0))
        result["full"] = full_scan(client, table, indices, client.info().get("distribution"), checksum,
                                   FULL_LIST_LIMIT)
    except PushAgentError as error:
        result["full"] = {"ok": False, "error": error.message}
    return summarize(result)


def summarize(result: dict) -> dict:
    """Set `ok` and `problems`: one sentence per failed check, saying what to do."""
    checks = {name: value for name, value in result.items() if name in ("count", "sample", "timestamp", "full")}
    result["ok"] = all(check["ok"] for check in checks.values())
    result["problems"] = [_problem(name, check) for name, check in checks.items() if not check["ok"]]
    return result


def _problem(name: str, check: dict) -> str:
    if "error" in check:
        return f"{name}: could not check: {check['error']}"
    if name == "count":
        return (f"count: the index holds {check['actual']} documents of this embedding version, expected "
                f"{check['expected']} distinct ids ({check['duplicates']} input lines repeated an id); "
                "run `pushagent verify --full --enqueue-missing` for this batch, then `pushagent drain` "
                "(an index with refresh_interval -1 shows no new documents to searches until it is refreshed)")
    if name == "sample":
        return (f"sample: {len(check['mismatched'])} of {check['size']} sampled documents differ from the source "
                f"{check['mismatched'][:LIST_LIMIT]} and {len(check['missing'])} are missing "
                f"{check['missing'][:LIST_LIMIT]}; something else wrote to the index: "
                "`verify --full --recompute` finds every such document")
    if name == "timestamp":
        return (f"timestamp: {check['older']} documents were last updated before {check['expected_date']}, "
                f"e.g. {check['ids']}: this batch did not update them (missed updates, or ids no longer in the source)")
    return (f"full scan: {check['missing']} missing {check['missing_ids'][:LIST_LIMIT]}, {check['extra']} extra "
            f"{check['extra_ids'][:LIST_LIMIT]}, {check['mismatched']} mismatched "
            f"{check['mismatched_ids'][:LIST_LIMIT]}; --enqueue-missing queues the missing ones for `drain`")
