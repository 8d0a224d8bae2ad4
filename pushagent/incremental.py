"""`push --incremental`: send only the documents the cluster does not already hold as the agent wrote them.

Before a chunk is sent, one `_mget` (counted against the rate limit) reads
three stamps of each of its documents: `sync_checksum`, `embedding_version`
and `last_updated`. A document is unchanged when the checksum and the
embedding version are ours and its version is still the one the agent gave
it: the batch time its `last_updated` names (or, with `version_field`, the
record's own version). An edit made behind the agent's back moves the
version on, so the document is sent again: the cluster is the truth, not a
table on this side.
"""

import logging
import threading
from datetime import datetime

from .cluster import ClusterClient, ClusterRequestError
from .sender import ChunkAborted

log = logging.getLogger(__name__)


class ChangeProbe:
    """Splits a chunk's documents into (to send, unchanged); thread-safe, one client per worker thread.

    The stamps come from a realtime `_mget` with source filtering. An `ids`
    search over doc values answers 3-4x faster (the cluster need not parse
    each stored source, embeddings and all), but sees refreshed documents
    only: an edit made a second ago, or any edit in an index whose refresh is
    off during a load, would look unchanged and be skipped.
    """

    def __init__(self, config, settings, rate_limiter, stop_event: threading.Event, stats):
        self.config, self.settings, self.stats = config, settings, stats
        self.rate_limiter, self.stop_event = rate_limiter, stop_event
        self._local = threading.local()
        self._clients = []
        self._lock = threading.Lock()
        self._warned = False

    def split(self, docs: list) -> tuple[list, list]:
        # Later lines of a repeated id are always sent: they must land after the earlier line.
        candidates = [doc for doc in docs if doc.op == "index" and doc.version_type == "external"]
        try:
            held = self._held(candidates) if candidates else set()
        except ClusterRequestError as error:
            self._warn(error)
            return docs, []
        return [doc for doc in docs if id(doc) not in held], [doc for doc in docs if id(doc) in held]

    def _held(self, docs: list) -> set:
        """id() of the documents of `docs` the cluster holds unchanged."""
        if not self.rate_limiter.acquire(self.stop_event):
            raise ChunkAborted()
        self.stats.record_probe()
        settings = self.settings
        stamps = (settings.checksum_field, settings.embedding_version_field, settings.timestamp_field)
        answers = self._client().request("POST", "/_mget", {"docs": [{"_index": doc.index, "_id": doc.doc_id}
                                                                     for doc in docs]},
                                         params={"_source_includes": ",".join(stamps)})["docs"]
        return {id(doc) for doc, answer in zip(docs, answers) if self._unchanged(doc, answer)}

    def _unchanged(self, doc, answer: dict) -> bool:
        if not answer.get("found"):
            return False
        source, settings = answer.get("_source") or {}, self.settings
        if (source.get(settings.checksum_field) != doc.checksum
                or source.get(settings.embedding_version_field) != settings.embedding_version):
            return False
        written = doc.version if settings.version_field else _ms(source.get(settings.timestamp_field))
        return written is not None and answer.get("_version") == written

    def _client(self) -> ClusterClient:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = ClusterClient(self.config)
            with self._lock:
                self._clients.append(client)
        return client

    def _warn(self, error) -> None:
        with self._lock:
            if not self._warned:
                log.warning("--incremental: could not ask the cluster what it holds (%s); sending whole chunks",
                            error)
            self._warned = True

    def close(self) -> None:
        for client in self._clients:
            client.close()


def _ms(iso) -> int | None:
    """Milliseconds of an ISO 8601 time stamp (as the builder writes them), None if it is not one."""
    try:
        return int(datetime.fromisoformat(str(iso).replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError:
        return None
