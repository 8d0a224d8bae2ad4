"""Turn a raw input line into a bulk action: identity, target index, version, stamps.

The checksum is sha256 over the record's canonical JSON (sorted keys, no
whitespace) with the stamped fields left out, so a verifier can recompute it
from the stored `_source` by removing those same fields.
"""

import dataclasses
import hashlib
from datetime import datetime, timezone

import orjson

MAX_ID_BYTES = 512  # Elasticsearch and OpenSearch refuse longer _id values
_ABSENT = object()


@dataclasses.dataclass(slots=True)
class Doc:
    """One document ready to send; `action` and `source` are NDJSON lines."""

    index: str
    doc_id: str
    version: int
    op: str
    action: bytes
    source: bytes | None
    checksum: str
    file: str
    line: int
    version_type: str = "external"   # external_gte for a later line repeating an id of its batch
    digest: bytes | None = None      # line_digest of its input line, recorded for the next incremental push
    raw: bytes | None = None         # the input line of a document not built yet (Builder.known)
    recorded_version: int | None = None  # the version an earlier batch recorded for the document of this line

    @property
    def size(self) -> int:
        """Its request bytes; for a document not built yet, its action and input line, near enough."""
        return len(self.action) + (len(self.source) if self.source else 0) + (len(self.raw) if self.raw else 0)

    def win_equal_version(self) -> None:
        """Let this document replace one of the same version: a later line of its batch repeats its id."""
        self.version_type = "external_gte"
        self.action = action_line(self.op, self.index, self.doc_id, self.version, self.version_type)


@dataclasses.dataclass(slots=True)
class Rejected:
    """An input line that can never be sent: quarantined with its reason."""

    reason: str
    raw: bytes
    file: str
    line: int


@dataclasses.dataclass(frozen=True)
class BuildSettings:
    id_field: str
    default_index: str | None
    index_field: str | None
    allowed_indices: frozenset
    batch_version: int
    batch_time_iso: str
    version_field: str | None = None
    op_field: str | None = None
    allow_delete: bool = False
    embedding_version: str | None = None
    embedding_version_field: str = "embedding_version"
    timestamp_field: str = "last_updated"
    checksum_field: str = "sync_checksum"
    max_record_bytes: int = 50 * 1024**2
    batch_field: str = "sync_batch"
    batch_id: str | None = None

    @property
    def stamped_fields(self) -> tuple:
        return (self.embedding_version_field, self.timestamp_field, self.checksum_field, self.batch_field)


def canonical_json(record: dict) -> bytes:
    """Sorted keys, no whitespace: the same bytes for the same record everywhere."""
    return orjson.dumps(record, option=orjson.OPT_SORT_KEYS)


def canonical_checksum(record: dict, stamped_fields=()) -> str:
    """sha256 hex of the canonical JSON of `record` without `stamped_fields`."""
    if any(field in record for field in stamped_fields):
        record = {k: v for k, v in record.items() if k not in stamped_fields}
    return hashlib.sha256(canonical_json(record)).hexdigest()


def line_digest(raw: bytes) -> bytes:
    """Names an input line's bytes (128 bits of sha256): the same line builds the same document under the same
    settings, so a line an earlier batch built needs no parsing to be known (push --incremental)."""
    return hashlib.sha256(raw).digest()[:16]


def action_line(op: str, index: str, doc_id: str, version: int | None, version_type: str = "external") -> bytes:
    """The NDJSON action line of one document, externally versioned when a version is known."""
    meta = {"_index": index, "_id": doc_id}
    if version is not None:
        meta.update(version=version, version_type=version_type)
    return orjson.dumps({op: meta}) + b"\n"


def iso_utc_from_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def ms_from_iso(text: str) -> int:
    """Milliseconds since the epoch of an ISO 8601 time (UTC when it names no zone); ValueError if it is none."""
    moment = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp() * 1000)


class Builder:
    """Builds Docs (or Rejected lines) under one batch's settings."""

    def __init__(self, settings: BuildSettings):
        self.settings = settings
        self._stamp_prefix = self._make_stamp_prefix(settings)
        self._action_parts = {}
        self.replaced_stamps = dict.fromkeys(settings.stamped_fields, 0)  # records that carried a stamp field

    @staticmethod
    def _make_stamp_prefix(settings: BuildSettings) -> bytes:
        stamps = {settings.timestamp_field: settings.batch_time_iso}
        if settings.embedding_version is not None:
            stamps[settings.embedding_version_field] = settings.embedding_version
        if settings.batch_id is not None:
            stamps[settings.batch_field] = settings.batch_id
        return orjson.dumps(stamps)[1:-1] + b"," + orjson.dumps(settings.checksum_field) + b":"

    def build(self, raw: bytes, file: str, line: int) -> Doc | Rejected:
        if len(raw) > self.settings.max_record_bytes:
            # It could never fit in a request: refuse it before spending memory on parsing it.
            limit = self.settings.max_record_bytes
            return Rejected(f"record of {len(raw)} bytes is larger than chunk_bytes ({limit}): split it or raise "
                            "chunk_bytes", raw[:1024], file, line)
        try:
            record = orjson.loads(raw)
        except orjson.JSONDecodeError as error:
            return Rejected(f"malformed JSON: {error}", raw, file, line)
        if not isinstance(record, dict):
            return Rejected(f"not a JSON object but {type(record).__name__}", raw, file, line)
        try:
            return self._build_record(record, raw, file, line)
        except _RecordProblem as problem:
            return Rejected(str(problem), raw, file, line)

    def _build_record(self, record: dict, raw: bytes, file: str, line: int) -> Doc:
        settings = self.settings
        doc_id = self._document_id(record)
        index = self._target_index(record)
        version = self._version(record)
        op = self._operation(record)
        for field in settings.stamped_fields:
            if record.pop(field, _ABSENT) is not _ABSENT:
                self.replaced_stamps[field] += 1
        before_id, after_id = self._action_around_id(op, index, version)
        action = b"".join((before_id, orjson.dumps(doc_id), after_id))
        try:
            canonical = canonical_json(record)
        except orjson.JSONEncodeError as error:
            raise _RecordProblem(f"record cannot be serialized: {error}") from None
        checksum = hashlib.sha256(canonical).hexdigest()
        source = None
        if op == "index":
            joiner = b"," if len(canonical) > 2 else b""
            source = b"".join((memoryview(canonical)[:-1], joiner, self._stamp_prefix, b'"', checksum.encode(),
                               b'"}\n'))
        return Doc(index, doc_id, version, op, action, source, checksum, file, line, digest=line_digest(raw))

    def known(self, raw: bytes, file: str, line: int, digest: bytes, index: str, doc_id: str, checksum: str,
              recorded_version: int) -> Doc:
        """The document an earlier batch built from this very line (same settings) and wrote at
        `recorded_version`, not built again: its action line and source come only when `complete` builds it,
        for it must be sent after all (most never are)."""
        return Doc(index, doc_id, self.settings.batch_version, "index", b"", None, checksum, file, line,
                   digest=digest, raw=raw, recorded_version=recorded_version)

    def complete(self, doc: Doc) -> Doc:
        """A `known` document built from its line, as `build` makes it; a later line of a repeated id stays one."""
        built = self.build(doc.raw, doc.file, doc.line)
        if doc.version_type != "external":
            built.win_equal_version()
        return built

    def _action_around_id(self, op: str, index: str, version: int) -> tuple:
        """The action line's bytes before and after the _id value, made once per (op, index, version)."""
        key = (op, index, version)
        parts = self._action_parts.get(key)
        if parts is None:
            marker = "\x00id\x00"
            before, after = action_line(op, index, marker, version).split(orjson.dumps(marker))
            parts = self._action_parts[key] = (before, after)
        return parts

    def _document_id(self, record: dict) -> str:
        field = self.settings.id_field
        value = record.get(field)
        if value is None:
            raise _RecordProblem(f"missing id field {field!r}")
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise _RecordProblem(f"id field {field!r} is a {type(value).__name__}: expected a string or an integer")
        doc_id = str(value)
        if not doc_id or len(doc_id.encode()) > MAX_ID_BYTES:
            raise _RecordProblem(f"id field {field!r} must be 1 to {MAX_ID_BYTES} bytes long")
        return doc_id

    def _target_index(self, record: dict) -> str:
        settings = self.settings
        index = record.get(settings.index_field) if settings.index_field else None
        index = index or settings.default_index
        if not isinstance(index, str) or not index:
            raise _RecordProblem("no target index: set --index or give the record an index field")
        if index not in settings.allowed_indices:
            raise _RecordProblem(f"index {index!r} is not in allowed_indices")
        return index

    def _version(self, record: dict) -> int:
        field = self.settings.version_field
        if not field:
            return self.settings.batch_version
        value = record.get(field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise _RecordProblem(f"version field {field!r} must be a non-negative integer, got {value!r}")
        return value

    def _operation(self, record: dict) -> str:
        field = self.settings.op_field
        op = record.get(field, "index") if field else "index"
        if op == "delete" and not self.settings.allow_delete:
            raise _RecordProblem("delete refused: set allow_delete: true to let records delete documents")
        if op not in ("index", "delete"):
            raise _RecordProblem(f"unknown operation {op!r} in field {field!r}: expected index or delete")
        return op


class _RecordProblem(Exception):
    """Why one record cannot be sent; becomes a Rejected."""
