"""An in-memory search cluster: the `cluster` that push, drain and verify take (see cluster/connection.py).

It answers exactly the requests pushagent sends (`_bulk`, `_mget`, `_count`,
`_search`, point in time, scroll, `GET /`, `_field_caps`), as OpenSearch or
Elasticsearch would, with external versioning and its 409s; anything else
raises UnexpectedRequest, so a new request shows up in the fast suite.
Faults are scripted: whole requests (503, 429 with Retry-After, 413 above
`max_request_bytes`, a connection refused), items (by id), a read-only block.

Simplifications, on purpose: every write is searchable at once (no refresh
interval), a text field matches only its whole value, slices split by position.
"""

import dataclasses
import gzip
import itertools
import threading
import time

import orjson

from pushagent.cluster.client import ClusterRequestError, ReadClient
from pushagent.cluster.transport import BulkResponse, TransportFailure

GZIP_MAGIC = b"\x1f\x8b"
READ_ONLY = ("cluster_block_exception", "index [{index}] blocked by: [TOO_MANY_REQUESTS/12/disk usage exceeded "
             "flood-stage watermark, index has read-only-allow-delete block];")


class UnexpectedRequest(AssertionError):
    """pushagent sent a request the fake does not know: teach the fake, or ask why the agent sends it."""


@dataclasses.dataclass
class Stored:
    source: dict | None         # None: a delete's tombstone, which still holds its version (gc_deletes)
    version: int


@dataclasses.dataclass
class ItemFault:
    status: int
    error_type: str
    times: int


class FakeCluster:
    """Indices of versioned documents behind a bulk transport and read clients; thread-safe."""

    def __init__(self, distribution: str = "opensearch", version: str = "2.19.1", shards: int = 1):
        self.distribution, self.version, self.shards = distribution, version, shards
        self.indices = {}                 # index -> {id: Stored}
        self.mappings = {}                # index -> {field: "keyword"}; other strings are text + .keyword
        self.auto_create = True
        self.max_request_bytes = None     # a larger bulk body (uncompressed) answers 413
        self.bulk_sizes = []              # documents in each bulk request received
        self.reads = []                   # (method, path) of each read request
        self.after_bulk = None            # called with the number of the bulk request just answered
        self._request_faults, self._read_faults, self._item_faults = [], [], {}
        self._blocked_requests = 0
        self._snapshots, self._ids = {}, itertools.count(1)
        self._lock = threading.RLock()

    # --- the seam -----------------------------------------------------------------------------------------
    def transport(self, stats):
        return FakeTransport(self, stats)

    def client(self):
        return FakeClient(self)

    # --- scripting faults and writes made by hand ---------------------------------------------------------
    def fail_requests(self, status: int | None, times: int = 1, retry_after: float | None = None) -> None:
        """The next `times` bulk requests answer `status` as a whole (None: the connection is refused)."""
        self._request_faults += [(status, retry_after)] * times

    def fail_ids(self, ids, status: int = 429, error_type: str = "es_rejected_execution_exception",
                 times: int = 1) -> None:
        """The next `times` writes of each of `ids` are refused with an item error."""
        for doc_id in ids:
            self._item_faults[doc_id] = ItemFault(status, error_type, times)

    def block_writes(self, requests: int) -> None:
        """A read-only block (flood-stage disk) for the next `requests` bulk requests: every item is a 429."""
        self._blocked_requests = requests

    def fail_reads(self, path_part: str, status: int = 503, times: int = 1) -> None:
        """The next `times` read requests whose path contains `path_part` fail as the read client would
        report them after its own retries."""
        self._read_faults += [(path_part, status)] * times

    def write_by_hand(self, index: str, doc_id: str, source: dict) -> int:
        """An edit made outside pushagent (internal versioning: one above what is held); returns the version."""
        with self._lock:
            docs = self.indices.setdefault(index, {})
            version = docs[doc_id].version + 1 if doc_id in docs else 1
            docs[doc_id] = Stored(source, version)
            return version

    def delete_by_hand(self, index: str, doc_id: str) -> None:
        with self._lock:
            stored = self.indices[index][doc_id]
            self.indices[index][doc_id] = Stored(None, stored.version + 1)

    def live(self, index: str) -> dict:
        """{id: Stored} of the documents `index` holds now (tombstones left out)."""
        with self._lock:
            return {doc_id: doc for doc_id, doc in self.indices.get(index, {}).items() if doc.source is not None}

    # --- _bulk --------------------------------------------------------------------------------------------
    def bulk(self, payload: bytes) -> BulkResponse:
        with self._lock:
            response = self._bulk(payload)
            number = len(self.bulk_sizes)
        if self.after_bulk is not None:
            self.after_bulk(number)
        return response

    def _bulk(self, payload: bytes) -> BulkResponse:
        body = gzip.decompress(payload) if payload[:2] == GZIP_MAGIC else bytes(payload)
        actions = list(_actions(body))
        self.bulk_sizes.append(len(actions))
        if self._request_faults:
            status, retry_after = self._request_faults.pop(0)
            if status is None:
                raise TransportFailure("ConnectionError: connection refused (scripted)")
            return BulkResponse(status, None, retry_after, _error_text(status, "scripted", "scripted failure"))
        if self.max_request_bytes is not None and len(body) > self.max_request_bytes:
            return BulkResponse(413, None, None, "")
        blocked, self._blocked_requests = self._blocked_requests > 0, max(0, self._blocked_requests - 1)
        return BulkResponse(200, [self._item(op, meta, source, blocked) for op, meta, source in actions])

    def _item(self, op: str, meta: dict, source: dict | None, blocked: bool) -> dict:
        index, doc_id = meta["_index"], meta["_id"]
        if blocked:
            return _refused(op, 429, READ_ONLY[0], READ_ONLY[1].format(index=index))
        fault = self._item_faults.get(doc_id)
        if fault is not None and fault.times > 0:
            fault.times -= 1
            return _refused(op, fault.status, fault.error_type, f"[{doc_id}]: scripted {fault.error_type}")
        if index not in self.indices and not self.auto_create:
            return _refused(op, 404, "index_not_found_exception", f"no such index [{index}]")
        docs = self.indices.setdefault(index, {})
        held = docs.get(doc_id)
        version = _new_version(meta, held)
        if isinstance(version, str):
            return _refused(op, 409, "version_conflict_engine_exception", f"[{doc_id}]: {version}")
        if op == "delete":
            docs[doc_id] = Stored(None, version)
            return {op: {"status": 200 if held is not None and held.source is not None else 404}}
        docs[doc_id] = Stored(source, version)
        return {op: {"status": 201 if held is None or held.source is None else 200}}

    # --- reads --------------------------------------------------------------------------------------------
    def read(self, method: str, path: str, body, params) -> dict:
        with self._lock:
            self.reads.append((method, path))
            fault = next((f for f in self._read_faults if f[0] in path), None)
            if fault is not None:
                self._read_faults.remove(fault)
                raise ClusterRequestError(f"{method} {path}: HTTP {fault[1]} (scripted)", status=fault[1])
            parts = path.strip("/").split("/")
            index = parts.pop(0) if not parts[0].startswith("_") and parts[0] else None
            route = (method, ("{index}/" if index else "") + "/".join(parts))
            if route not in ROUTES:
                raise UnexpectedRequest(f"{method} {path} {body} {params}: not a request pushagent sends")
            return getattr(self, ROUTES[route])(index, body or {}, params or {})

    def _root(self, index, body, params) -> dict:
        version = {"number": self.version}
        if self.distribution == "opensearch":
            version["distribution"] = "opensearch"
        return {"cluster_name": "fake", "version": version}

    def _index_docs(self, index: str) -> dict:
        if index not in self.indices:
            raise ClusterRequestError(f"HTTP 404 index_not_found_exception: no such index [{index}]", status=404)
        return self.live(index)

    def _mget(self, index: str | None, body: dict, params: dict) -> dict:
        """Realtime, like the real one: it sees every write at once. `_source_includes` or a doc's `_source`."""
        if index is not None:
            self._index_docs(index)
            asked = [{"_index": index, "_id": doc_id} for doc_id in _only(body, {"ids"})["ids"]]
        else:
            asked = _only(body, {"docs"})["docs"]
        includes = params.get("_source_includes")
        default = includes.split(",") if includes else True
        return {"docs": [self._get(ask["_index"], ask["_id"], ask.get("_source", default)) for ask in asked]}

    def _get(self, index: str, doc_id: str, source_filter) -> dict:
        answer = {"_index": index, "_id": doc_id}
        if index not in self.indices:
            return {**answer, "error": {"type": "index_not_found_exception", "reason": f"no such index [{index}]"}}
        stored = self.live(index).get(doc_id)
        if stored is None:
            return {**answer, "found": False}
        answer.update(found=True, _version=stored.version)
        if source_filter is not False:
            answer["_source"] = _filtered(stored.source, source_filter)
        return answer

    def _count(self, index: str, body: dict, params: dict) -> dict:
        return {"count": len(self._matching(index, _only(body, {"query"})["query"]))}

    def _matching(self, index: str, query: dict) -> list:
        """(id, Stored) of the documents of `index` that `query` matches, in id order."""
        docs = self._index_docs(index)
        return [(doc_id, docs[doc_id]) for doc_id in sorted(docs) if self._matches(index, query, docs[doc_id].source)]

    def _matches(self, index: str, query: dict, source: dict) -> bool:
        (kind, spec), = query.items()
        if kind == "match_all":
            return True
        if kind == "bool":
            _only(spec, {"filter", "must", "must_not"})
            every = [*_listed(spec.get("filter")), *_listed(spec.get("must"))]
            return (all(self._matches(index, part, source) for part in every)
                    and not any(self._matches(index, part, source) for part in _listed(spec.get("must_not"))))
        if kind == "exists":
            return source.get(_only(spec, {"field"})["field"]) is not None
        (field, value), = spec.items()
        if kind in ("term", "terms"):
            values = value if kind == "terms" else [value["value"] if isinstance(value, dict) else value]
            return source.get(self._exact(index, field)) in values
        if kind == "match_phrase":
            return source.get(field) == value
        if kind == "range":
            return _in_range(source.get(field), value)
        raise UnexpectedRequest(f"query {kind!r}: {query}")

    def _exact(self, index: str, field: str) -> str:
        """The source field behind a term query's field, which must be a keyword: a term query on a text
        field matches one word of it, not the value (the bug checks.exact_match exists to avoid)."""
        if field.endswith(".keyword"):
            return field.removesuffix(".keyword")
        if self.mappings.get(index, {}).get(field) != "keyword":
            raise UnexpectedRequest(f"term query on the text field {field!r} of {index}: it matches words")
        return field

    def _field_caps(self, index: str, body: dict, params: dict) -> dict:
        """Types as a dynamic mapping gives them (a string: text with a .keyword sub-field), or `mappings`."""
        docs, explicit, caps = self._index_docs(index), self.mappings.get(index, {}), {}
        for field in params["fields"].split(","):
            name = field.removesuffix(".keyword")
            if field in explicit:
                caps[field] = {explicit[field]: {"type": explicit[field]}}
            elif name not in explicit and any(isinstance(doc.source.get(name), str) for doc in docs.values()):
                kind = "keyword" if field.endswith(".keyword") else "text"
                caps[field] = {kind: {"type": kind}}
        return {"indices": [index], "fields": caps}

    def _search(self, index: str, body: dict, params: dict) -> dict:
        """The timestamp check's list of ids, or the first page of a scroll."""
        if "scroll" not in params:
            _only(body, {"query", "size", "_source"})
            hits = [_hit(index, doc_id, doc, body["_source"]) for doc_id, doc in self._matching(index, body["query"])]
            return {"hits": {"total": {"value": len(hits)}, "hits": hits[:body["size"]]}}
        _only(body, {"size", "sort", "_source", "track_total_hits"})
        if body["sort"] != ["_doc"]:
            raise UnexpectedRequest(f"a scroll sorted by {body['sort']}")
        hits = [_hit(index, doc_id, doc, body["_source"]) for doc_id, doc in self._matching(index, {"match_all": {}})]
        scroll_id = f"scroll-{next(self._ids)}"
        self._snapshots[scroll_id] = (hits[body["size"]:], body["size"])
        return {"_scroll_id": scroll_id, "hits": {"total": {"value": len(hits)}, "hits": hits[:body["size"]]}}

    def _scroll(self, index, body: dict, params) -> dict:
        scroll_id = _only(body, {"scroll", "scroll_id"})["scroll_id"]
        left, size = self._snapshots[scroll_id]
        self._snapshots[scroll_id] = (left[size:], size)
        return {"_scroll_id": scroll_id, "hits": {"hits": left[:size]}}

    def _open_pit(self, index: str, body: dict, params: dict) -> dict:
        """OpenSearch's point in time (from 2.4 on)."""
        if self.distribution != "opensearch" or _version_tuple(self.version) < (2, 4):
            raise ClusterRequestError("HTTP 400 no handler found for uri [/_search/point_in_time]", status=400)
        return {"pit_id": self._snapshot(index)}

    def _open_es_pit(self, index: str, body: dict, params: dict) -> dict:
        if self.distribution == "opensearch":
            raise ClusterRequestError("HTTP 400 no handler found for uri [/_pit]", status=400)
        return {"id": self._snapshot(index)}

    def _snapshot(self, index: str) -> str:
        snapshot_id = f"pit-{next(self._ids)}"
        self._snapshots[snapshot_id] = (index, self._index_docs(index))
        return snapshot_id

    def _close(self, index, body: dict, params) -> dict:
        """DELETE of a point in time (either API) or a scroll."""
        for snapshot_id in _listed(body.get("pit_id") or body.get("id") or body.get("scroll_id")):
            self._snapshots.pop(snapshot_id, None)
        return {"succeeded": True}

    def _pit_search(self, index, body: dict, params) -> dict:
        """The total of a point in time, or a page sorted by _doc (OpenSearch, sliced per shard) or _shard_doc."""
        _only(body, {"size", "pit", "track_total_hits", "sort", "_source", "slice", "search_after"})
        index, docs = self._snapshots[body["pit"]["id"]]
        shards = {"total": self.shards}
        if body["size"] == 0:
            return {"_shards": shards, "hits": {"total": {"value": len(docs)}, "hits": []}}
        expected = [{"_doc": "asc"}] if self.distribution == "opensearch" else [{"_shard_doc": "asc"}]
        if body["sort"] != expected:
            raise UnexpectedRequest(f"a point in time sorted by {body['sort']} on {self.distribution}")
        rows = list(enumerate(sorted(docs)))
        if "slice" in body:
            rows = [(n, doc_id) for n, doc_id in rows if n % body["slice"]["max"] == body["slice"]["id"]]
        after = body.get("search_after", [-1])[0]
        page = [(n, doc_id) for n, doc_id in rows if n > after][:body["size"]]
        hits = [{**_hit(index, doc_id, docs[doc_id], body["_source"]), "sort": [n]} for n, doc_id in page]
        return {"pit_id": body["pit"]["id"], "_shards": shards, "hits": {"hits": hits}}


# (method, path with the index as {index}) -> the FakeCluster method that answers it
ROUTES = {("GET", ""): "_root", ("POST", "_mget"): "_mget", ("POST", "{index}/_mget"): "_mget",
          ("POST", "{index}/_count"): "_count", ("GET", "{index}/_field_caps"): "_field_caps",
          ("POST", "{index}/_search"): "_search", ("POST", "_search/scroll"): "_scroll",
          ("DELETE", "_search/scroll"): "_close", ("POST", "{index}/_search/point_in_time"): "_open_pit",
          ("DELETE", "_search/point_in_time"): "_close", ("POST", "{index}/_pit"): "_open_es_pit",
          ("DELETE", "_pit"): "_close", ("POST", "_search"): "_pit_search"}


class FakeTransport:
    """The bulk transport of one run: takes what the sender encoded, gzip'd or plain, as HttpTransport does."""

    def __init__(self, cluster: FakeCluster, stats):
        self.cluster, self.stats = cluster, stats

    def post(self, payload, docs: int, gzip: bool, raw_bytes: int) -> BulkResponse:
        started = time.monotonic()
        response = self.cluster.bulk(bytes(payload))
        self.stats.record_request(response.status, raw_bytes, len(payload), time.monotonic() - started, docs)
        return response


class FakeClient(ReadClient):
    """A read client of the fake: `info` and `field_types` come from ReadClient, over `request`."""

    base = "memory://fake"

    def __init__(self, cluster: FakeCluster):
        self.cluster = cluster

    def request(self, method: str, path: str, body=None, params=None) -> dict:
        # Through JSON both ways, as over the wire: nothing the agent holds is shared with the fake.
        answer = self.cluster.read(method, path, orjson.loads(orjson.dumps(body)), params)
        return orjson.loads(orjson.dumps(answer))


def _actions(body: bytes):
    """(op, meta, source or None) of each action of an NDJSON bulk body."""
    lines = iter(body.split(b"\n"))
    for line in lines:
        if not line:
            continue
        (op, meta), = orjson.loads(line).items()
        if op not in ("index", "delete"):
            raise UnexpectedRequest(f"bulk action {op!r}")
        _only(meta, {"_index", "_id", "version", "version_type"})
        yield op, meta, orjson.loads(next(lines)) if op == "index" else None


def _new_version(meta: dict, held: Stored | None):
    """The version a write leaves, or the conflict's reason (external: above what is held; external_gte: not
    below); a tombstone counts, as within the real gc_deletes period."""
    if "version" not in meta:
        raise UnexpectedRequest(f"a write without an external version: {meta}")
    version, kind = meta["version"], meta.get("version_type", "internal")
    if kind not in ("external", "external_gte"):
        raise UnexpectedRequest(f"version_type {kind!r}")
    if held is None or version > held.version or (kind == "external_gte" and version == held.version):
        return version
    relation = "higher or equal to" if kind == "external" else "higher than"
    return f"version conflict, current version [{held.version}] is {relation} the one provided [{version}]"


def _refused(op: str, status: int, error_type: str, reason: str) -> dict:
    return {op: {"status": status, "error": {"type": error_type, "reason": reason}}}


def _error_text(status: int, error_type: str, reason: str) -> str:
    return orjson.dumps({"error": {"type": error_type, "reason": reason}, "status": status}).decode()


def _only(body: dict, allowed: set) -> dict:
    """`body`, after checking it asks for nothing the fake does not implement."""
    unknown = set(body) - allowed
    if unknown:
        raise UnexpectedRequest(f"request body with {sorted(unknown)}: {body}")
    return body


def _listed(value) -> list:
    return [] if value is None else value if isinstance(value, list) else [value]


def _filtered(source: dict, source_filter) -> dict:
    return dict(source) if source_filter is True else {k: v for k, v in source.items() if k in source_filter}


def _hit(index: str, doc_id: str, stored: Stored, source_filter) -> dict:
    hit = {"_index": index, "_id": doc_id}
    if source_filter is not False:
        hit["_source"] = _filtered(stored.source, source_filter)
    return hit


def _version_tuple(version: str) -> tuple:
    return tuple(int(part) for part in version.split(".")[:2])


def _in_range(value, bounds: dict) -> bool:
    tests = {"lt": lambda a, b: a < b, "lte": lambda a, b: a <= b, "gt": lambda a, b: a > b,
             "gte": lambda a, b: a >= b}
    unknown = set(bounds) - set(tests)
    if unknown:
        raise UnexpectedRequest(f"range with {sorted(unknown)}")
    return value is not None and all(tests[name](value, bound) for name, bound in bounds.items())
