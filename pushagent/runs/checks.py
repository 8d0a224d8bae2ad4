"""Prove what arrived: count, sample checksums, timestamps, and an optional full scan.

Every check needs only read privilege on the target index: _count, _mget,
_search and point-in-time searches. The expected side is a DocTable: what
the push delivered, or the source files loaded by `load_sources`.
"""

import dataclasses
import itertools
import tempfile
import time
from pathlib import Path

from pushagent.cluster.client import keyword_field
from pushagent.cluster.scan import recomputed_checksum, stamped_checksum
from pushagent.documents.builder import Builder, Doc, canonical_checksum
from pushagent.errors import PushAgentError
from pushagent.inputs.reader import expand_inputs, read_lines
from pushagent.runs.fullscan import full_scan
from pushagent.state.doctable import DocTable, deletions_in

LIST_LIMIT = 20             # ids listed per problem in a report
FULL_LIST_LIMIT = 1000      # ids listed per category by --full (all of them go to --enqueue-missing)
COUNT_TIMEOUT_SECONDS = 60.0
LOAD_BATCH = 5_000
MGET_PAGE = 1_000           # ids per _mget when the count falls short and the ids are asked for one by one


@dataclasses.dataclass
class VerifySpec:
    """What to verify against: the batch's stamps and field names."""

    embedding_version: str | None
    expected_date: str | None       # ISO 8601: documents last updated before it are stale
    embedding_version_field: str = "embedding_version"
    timestamp_field: str = "last_updated"
    checksum_field: str = "sync_checksum"
    expected_count: int | None = None  # overrides the table's distinct count (--expected-count)
    batch_id: str | None = None     # the batch stamped into batch_field; None for batches pushed before stamping
    batch_field: str = "sync_batch"
    snapshot: bool = False          # the batch is the whole index: the embedding version's count decides too
    runs_dir: Path | None = None    # where the tables of the other batches are (their deletes supersede ours)
    settle_seconds: float = dataclasses.field(kw_only=True)   # config's count_settle_seconds

    @property
    def stamped_fields(self) -> tuple:
        return (self.embedding_version_field, self.timestamp_field, self.checksum_field, self.batch_field)

    @property
    def by_batch(self) -> bool:
        """Verify the documents stamped with this batch (not the whole embedding version)."""
        return self.batch_id is not None and self.expected_count is None


def exact_match(client, index: str, field: str, value: str) -> dict:
    """A query for documents whose `field` is exactly `value`, whatever the index's mapping.

    A dynamically mapped string is text with a `.keyword` sub-field; a term
    query on the text would match any value sharing a word ("words" in
    "words-0001"). _field_caps needs only read privilege.
    """
    name = keyword_field(client.field_types(index, [field]), field)
    return {"term": {name: value}} if name else {"match_phrase": {field: value}}



def version_query(client, index: str, spec: VerifySpec) -> dict:
    if spec.embedding_version is None:
        return {"match_all": {}}
    return exact_match(client, index, spec.embedding_version_field, spec.embedding_version)


def settled_count(client, index: str, query: dict, expected: int, settle_seconds: float) -> int:
    """_count, polled until it equals `expected` or has not changed for `settle_seconds`.

    A search only sees refreshed segments. `_refresh` would need the
    maintenance privilege, and `refresh=wait_for` belongs on the last bulk
    request, which does not exist with several requests in flight; so we
    poll, which needs only read: the count is final once it has not moved
    for several refresh intervals. An index with refresh disabled
    (refresh_interval -1) never settles to the truth; the report says so.
    Each search also wakes a search-idle shard, which refreshes only then.
    """
    deadline = time.monotonic() + COUNT_TIMEOUT_SECONDS + settle_seconds   # a count still moving: give up
    last, since = None, time.monotonic()
    while True:
        value = client.request("POST", f"/{index}/_count", {"query": query})["count"]
        if value == expected or time.monotonic() > deadline:
            return value
        if value != last:
            last, since = value, time.monotonic()
        elif time.monotonic() - since >= settle_seconds:
            return value
        time.sleep(0.5)


def check_count(client, table: DocTable, spec: VerifySpec, indices: list) -> dict:
    """The batch's documents per index against the distinct ids it left in place.

    By batch: documents stamped with the batch, plus those a later batch has
    since replaced (`superseded`, found by asking for the ids the count lacks),
    must make up every id; ids the batch deleted must be absent. Without a
    batch stamp (older records, --expected-count): documents of the embedding version.
    """
    if not spec.by_batch:
        return _count_by_version(client, table, spec, indices)
    counts = table.counts()
    expected, result = counts["per_index"], _empty_count_result(counts)
    for index in indices:
        want = expected.get(index, 0)
        present = settled_count(client, index, exact_match(client, index, spec.batch_field, spec.batch_id), want,
                                spec.settle_seconds)
        result["per_index"][index] = present
        result["actual"] += present
        if present < want:
            _account_for_shortfall(client, table, spec, index, result)
        if counts["deleted"]:
            _check_deleted(client, table, spec, index, result)
        if spec.embedding_version is not None:
            result["embedding_version_count"] += settled_count(client, index, version_query(client, index, spec),
                                                               want, spec.settle_seconds)
    explained = result["actual"] + result["superseded"] + result["unchanged"]
    result["ok"] = (explained == result["expected"] and result["actual"] <= result["expected"]
                    and not (result["missing_ids"] or result["replaced_ids"] or result["still_present_ids"]))
    if spec.snapshot and spec.embedding_version is not None:
        result["ok"] = result["ok"] and result["embedding_version_count"] == result["expected"]
    return result


def _empty_count_result(counts: dict) -> dict:
    return {"by": "batch", "expected": counts["distinct"], "actual": 0, "superseded": 0, "unchanged": 0, "missing": 0,
            "missing_ids": [], "replaced_ids": [], "deleted": counts["deleted"], "still_present_ids": [],
            "duplicates": counts["duplicates"], "embedding_version_count": 0, "per_index": {}}


def _count_by_version(client, table: DocTable, spec: VerifySpec, indices: list) -> dict:
    if spec.embedding_version is None and spec.expected_count is None:
        # Without a version the index may hold other batches' documents: nothing to count against.
        return {"ok": True, "skipped": "no embedding_version to count by (push with --embedding-version)"}
    counts = table.counts()
    expected = counts["per_index"] if spec.expected_count is None else {indices[0]: spec.expected_count}
    actual = {index: settled_count(client, index, version_query(client, index, spec), expected.get(index, 0),
                                   spec.settle_seconds) for index in indices}
    return {"ok": actual == {i: expected.get(i, 0) for i in indices}, "by": "embedding_version",
            "expected": sum(expected.values()), "actual": sum(actual.values()), "duplicates": counts["duplicates"],
            "per_index": actual}


def _stamped_elsewhere(source: dict, spec: VerifySpec) -> bool:
    """Written by another pushagent batch (a later one, since versions only move up)."""
    stamp = source.get(spec.batch_field)
    return stamp is not None and stamp != spec.batch_id


def _account_for_shortfall(client, table: DocTable, spec: VerifySpec, index: str, result: dict) -> None:
    """Sort the batch's ids that do not carry its stamp: superseded by a later batch, unchanged since an
    earlier one (--incremental left it as it was), replaced by hand, or missing."""
    for page in _pages(table.documents(index)):
        ours = {doc_id: (version, checksum) for doc_id, version, checksum in page}
        missing = []
        for doc_id, doc in _fetch(client, index, list(ours), [spec.batch_field, spec.checksum_field]):
            kind = _without_our_stamp(doc, spec, *ours[doc_id])
            if kind == "missing":
                missing.append(doc_id)
            elif kind == "replaced":
                result["replaced_ids"].append(doc_id)
            elif kind:
                result[kind] += 1
        deleted_later = deleted_by_later_batches(spec, index, {i: ours[i][0] for i in missing})
        missing = [doc_id for doc_id in missing if doc_id not in deleted_later]
        result["superseded"] += len(deleted_later)
        result["missing"] += len(missing)
        result["missing_ids"] += missing[:LIST_LIMIT - len(result["missing_ids"])]


def _without_our_stamp(doc: dict, spec: VerifySpec, version: int, checksum: str) -> str:
    """What became of one of the batch's documents: "" (it carries our stamp), superseded, unchanged,
    replaced or missing."""
    if not doc.get("found"):
        return "missing"
    stamp = doc["_source"].get(spec.batch_field)
    if stamp == spec.batch_id:
        return ""
    if stamp is None:
        return "replaced"
    if doc.get("_version", 0) > version:
        return "superseded"
    # An earlier batch's document: ours if its content is (--incremental did not send it), else our write is lost.
    return "unchanged" if doc["_source"].get(spec.checksum_field) == checksum else "missing"


def _check_deleted(client, table: DocTable, spec: VerifySpec, index: str, result: dict) -> None:
    """Ids the batch deleted are absent, unless a later batch wrote them again."""
    for page in _pages(table.documents(index, "delete")):
        for doc_id, doc in _fetch(client, index, [doc_id for doc_id, _, _ in page], [spec.batch_field]):
            if doc.get("found") and not _stamped_elsewhere(doc["_source"], spec):
                result["still_present_ids"].append(doc_id)


def _pages(rows):
    rows = iter(rows)
    while page := list(itertools.islice(rows, MGET_PAGE)):
        yield page


def _fetch(client, index: str, doc_ids: list, fields: list):
    """(id, _mget answer) for each id, only `fields` of each _source."""
    found = client.request("POST", f"/{index}/_mget", {"ids": doc_ids}, params={"_source_includes": ",".join(fields)})
    return zip(doc_ids, found["docs"])


def deleted_by_later_batches(spec: VerifySpec, index: str, versions: dict) -> set:
    """The ids of `versions` ({id: our version}) that another batch of this state directory deleted with a
    higher version, as its table of documents says."""
    if not versions or spec.runs_dir is None:
        return set()
    deleted = set()
    for other in sorted(spec.runs_dir.glob("*.docs.db")):
        if not other.name.startswith(f"{spec.batch_id}."):
            deleted |= {doc_id for doc_id, version in deletions_in(other, index, list(versions)).items()
                        if version > versions[doc_id]}
    return deleted


def check_sample(client, sample: list, spec: VerifySpec) -> dict:
    """One _mget of the sampled ids; the checksum is recomputed from each returned _source.

    A document a later batch replaced carries that batch's stamp: it is listed
    as `superseded`, not as a mismatch. An edit made behind the agent's back
    keeps this batch's stamp (or none) over content that no longer matches.
    Batches pushed before batch stamps count a higher version whose own
    checksum stamp matches its content as superseded.
    """
    if not sample:
        return {"ok": True, "size": 0, "mismatched": [], "missing": [], "superseded": [], "ids": []}
    body = {"docs": [{"_index": index, "_id": doc_id} for index, doc_id, _, _ in sample]}
    found = client.request("POST", "/_mget", body)["docs"]
    result = {"mismatched": [], "missing": [], "superseded": []}
    for (index, doc_id, expected, version), doc in zip(sample, found):
        if not doc.get("found"):
            deleted_later = deleted_by_later_batches(spec, index, {doc_id: version})
            result["superseded" if deleted_later else "missing"].append(doc_id)
            continue
        actual = canonical_checksum(doc["_source"], spec.stamped_fields)
        if actual != expected:
            result["superseded" if _superseded(doc, actual, version, spec) else "mismatched"].append(doc_id)
    return {"ok": not (result["mismatched"] or result["missing"]), "size": len(sample), **result,
            "ids": [doc_id for _, doc_id, _, _ in sample]}


def _superseded(doc: dict, actual: str, version: int, spec: VerifySpec) -> bool:
    if spec.batch_id is not None:
        return _stamped_elsewhere(doc["_source"], spec) and doc["_source"].get(spec.checksum_field) == actual
    return doc.get("_version", 0) > version and doc["_source"].get(spec.checksum_field) == actual


def check_timestamp(client, indices: list, spec: VerifySpec) -> dict:
    """Documents last updated before the expected date: of this batch, or (a batch without stamps) of the
    whole embedding version, where they are updates this batch missed."""
    if not spec.expected_date:
        return {"ok": True, "skipped": "no embedding_version and no --expected-date: nothing to compare with"}
    older, ids = 0, []
    for index in indices:
        query = {"bool": {"filter": [{"range": {spec.timestamp_field: {"lt": spec.expected_date}}},
                                     _timestamp_scope(client, index, spec)]}}
        # Settled like the count: the documents this batch just re-stamped may not be searchable yet.
        found = settled_count(client, index, query, 0, spec.settle_seconds)
        older += found
        if found:
            hits = client.request("POST", f"/{index}/_search", {"query": query, "size": LIST_LIMIT, "_source": False})
            ids += [hit["_id"] for hit in hits["hits"]["hits"]][:LIST_LIMIT - len(ids)]
    return {"ok": older == 0, "expected_date": spec.expected_date, "older": older, "ids": ids}


def _timestamp_scope(client, index: str, spec: VerifySpec) -> dict:
    # Not the whole embedding version, even for a snapshot: --incremental leaves unchanged documents with the
    # time of the batch that last changed them. A snapshot's extra documents are the count's and --full's.
    if spec.by_batch:
        return exact_match(client, index, spec.batch_field, spec.batch_id)
    return version_query(client, index, spec)


def load_sources(paths, settings, table: DocTable, s3_endpoint_url: str | None = None) -> None:
    """Build every source record as the push would and keep its (index, id, checksum, op) in `table`;
    the last line of a repeated id wins, as in the push."""
    builder, batch = Builder(settings), []
    for input_file in expand_inputs(paths, s3_endpoint_url):
        for entry in read_lines(input_file):
            item = builder.build(entry.data, input_file.path, entry.number)
            if isinstance(item, Doc):
                batch.append(item)
            if len(batch) >= LOAD_BATCH:
                table.add(batch)
                batch = []
    table.add(batch)


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
    checksum = (recomputed_checksum(spec.stamped_fields, spec.batch_field) if recompute
                else stamped_checksum(spec.checksum_field, spec.batch_field))
    try:
        # A point in time sees what was refreshed when it opened. A search first makes a search-idle
        # shard refresh (it skips scheduled refreshes until searched), and waits out a count that moves.
        expected = table.counts()["per_index"]
        for index in indices:
            settled_count(client, index, {"match_all": {}}, expected.get(index, 0), spec.settle_seconds)
        full = full_scan(client, table, indices, client.info().get("distribution"), checksum, FULL_LIST_LIMIT,
                         spec.batch_id, lambda index, versions: deleted_by_later_batches(spec, index, versions))
        # Documents of other batches are the index's business, unless this batch is the whole index.
        full["ok"] = not (full["missing"] or full["mismatched"] or (spec.snapshot and full["extra"]))
        result["full"] = full
    except PushAgentError as error:
        result["full"] = {"ok": False, "error": error.message}
    return summarize(result)


def summarize(result: dict) -> dict:
    """Set `ok` and `problems`: one sentence per failed check, saying what to do."""
    checks = {name: value for name, value in result.items() if name in ("count", "sample", "timestamp", "full")}
    result["ok"] = all(check["ok"] for check in checks.values())
    result["problems"] = [_problem(name, check) for name, check in checks.items() if not check["ok"]]
    return result


def _count_problem(check: dict) -> str:
    if check.get("by") != "batch":
        return (f"count: the index holds {check['actual']} documents of this embedding version, expected "
                f"{check['expected']} distinct ids ({check['duplicates']} input lines repeated an id); "
                "run `pushagent verify --full --repair` for this batch, then `pushagent drain` "
                "(an index with refresh_interval -1 shows no new documents to searches until it is refreshed)")
    parts = [f"count: {check['actual']} documents carry this batch, {check['superseded']} were superseded by "
             f"later batches and {check.get('unchanged', 0)} were unchanged, of {check['expected']} distinct ids it "
             "delivered"]
    if check.get("waiting_in_queue"):
        parts.append(f"{check['waiting_in_queue']} records of this batch are waiting in the retry queue: "
                     "`pushagent drain --all` sends them, then verify again")
    elif check["missing"]:
        parts.append(f"{check['missing']} are missing {check['missing_ids']}: run `pushagent verify --full --repair` "
                     "for this batch, then `pushagent drain`")
    if check["replaced_ids"]:
        parts.append(f"{len(check['replaced_ids'])} were replaced by a writer other than pushagent "
                     f"{check['replaced_ids'][:LIST_LIMIT]}: `verify --full --repair` restores them")
    if check["still_present_ids"]:
        parts.append(f"{len(check['still_present_ids'])} ids this batch deleted are still in the index "
                     f"{check['still_present_ids'][:LIST_LIMIT]}")
    if check["actual"] > check["expected"]:
        parts.append("the index holds more documents stamped with this batch than it delivered: another push "
                     "used the same --batch-id")
    if check.get("embedding_version_count", check["expected"]) != check["expected"] and len(parts) == 1:
        parts.append(f"this snapshot's embedding version has {check['embedding_version_count']} documents in the "
                     "index: `verify --full` lists the extra ones")
    if len(parts) == 1:
        parts.append("the index holds fewer searchable documents than it should (an index with refresh_interval "
                     "-1 shows no new documents to searches until it is refreshed)")
    return "; ".join(parts)


def _problem(name: str, check: dict) -> str:
    if "error" in check:
        return f"{name}: could not check: {check['error']}"
    if name == "count":
        return _count_problem(check)
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
