"""Prometheus metrics of a push: a node_exporter textfile and, optionally, a Pushgateway.

A push is a short job, not a server: each export builds a fresh registry
from what the run has counted so far (RunFacts), writes it atomically
(prometheus_client.write_to_textfile: temp file, rename) and PUTs it to the
Pushgateway, outbound only. Exports happen every `push_interval` during the
run and once at its end; a failed export is logged and never fails the run.
"""

import bisect
import dataclasses
import logging
import os
import socket
import threading
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, push_to_gateway, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from pushagent.ops.status import extra_documents, last_success, queue_depth
from pushagent.state.ledger import OUTCOMES, Ledger

log = logging.getLogger("pushagent.metrics")
JOB = "pushagent"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# Upper bounds of the `chunk_size` label of the latency histogram, in documents per request.
CHUNK_SIZE_BOUNDS = (100, 500, 1000, 2000, 5000, 10000)
PUSH_TIMEOUT = 10


@dataclasses.dataclass
class RunFacts:
    """Everything one export shows: this run's counts plus state read from state_dir."""

    batch_id: str
    status: str
    ledger: Ledger
    statuses: dict
    retries: int
    bytes_raw: int
    bytes_sent: int
    latencies: list               # (seconds, documents) per request
    queue: dict                   # due, later, dead
    duration_s: float
    last_success: float | None    # epoch seconds
    rate_per_minute: float | None = None   # the sender's rate now, lowered by backpressure
    concurrency: int | None = None         # requests the sender allows in flight now
    compress: bool | None = None           # whether its requests go gzip'd now
    requests_out: int | None = None        # requests out now (memory or reading may keep them under the limit)
    extra: list = dataclasses.field(default_factory=list)  # (batch_id, extra documents, over max_delete_fraction)


def chunk_size_label(docs: int) -> str:
    """'1-100', '101-500', ... '10001+': few values, so Grafana can draw one line each."""
    at = bisect.bisect_left(CHUNK_SIZE_BOUNDS, docs)
    if at == len(CHUNK_SIZE_BOUNDS):
        return f"{CHUNK_SIZE_BOUNDS[-1] + 1}+"
    return f"{CHUNK_SIZE_BOUNDS[at - 1] + 1 if at else 1}-{CHUNK_SIZE_BOUNDS[at]}"


class RunCollector:
    """A prometheus_client collector over one RunFacts snapshot."""

    def __init__(self, facts: RunFacts):
        self.facts = facts

    def collect(self):
        facts = self.facts
        yield _labelled(CounterMetricFamily, "pushagent_documents", "Documents of this run by outcome.",
                        "outcome", {name: getattr(facts.ledger, name) for name in OUTCOMES})
        yield CounterMetricFamily("pushagent_records_read", "Input records read by this run.", facts.ledger.read)
        yield _labelled(CounterMetricFamily, "pushagent_bulk_requests", "Bulk requests answered, by HTTP status.",
                        "status", facts.statuses)
        yield CounterMetricFamily("pushagent_retries", "In-run retries of failed requests or items.", facts.retries)
        yield _labelled(CounterMetricFamily, "pushagent_sent_bytes", "Request bytes: raw NDJSON, and on the wire.",
                        "encoding", {"raw": facts.bytes_raw, "wire": facts.bytes_sent})
        yield self._latency()
        yield _labelled(GaugeMetricFamily, "pushagent_queue_items", "Retry-queue items by state.", "state",
                        {k: v for k, v in facts.queue.items() if k in ("due", "later", "dead") and v is not None})
        yield GaugeMetricFamily("pushagent_run_duration_seconds", "Duration of this run so far.", facts.duration_s)
        info = GaugeMetricFamily("pushagent_run_info", "The batch of this run and its status.",
                                 labels=["batch_id", "status"])
        info.add_metric([facts.batch_id, facts.status], 1)
        yield info
        if facts.rate_per_minute is not None:
            yield GaugeMetricFamily("pushagent_request_rate_per_minute",
                                    "Bulk requests a minute the sender allows itself now (429s lower it).",
                                    facts.rate_per_minute)
        if facts.concurrency is not None:
            yield GaugeMetricFamily("pushagent_concurrency", "Bulk requests the sender allows in flight now "
                                    "(it raises them while answers keep their pace, cuts them on 429s or delay).",
                                    facts.concurrency)
            yield GaugeMetricFamily("pushagent_requests_in_flight", "Bulk requests out now, at most "
                                    "pushagent_concurrency (max_in_flight_bytes or reading may hold them under it).",
                                    facts.requests_out or 0)
            yield GaugeMetricFamily("pushagent_compress", "1 when the requests go gzip'd now (compress: auto "
                                    "measures which is faster), else 0.", int(bool(facts.compress)))
        if facts.extra:
            yield _labelled(GaugeMetricFamily, "pushagent_extra_documents", "Documents in the index that a "
                            "snapshot batch does not hold, at its last verify --full.", "batch_id",
                            {batch_id: extra for batch_id, extra, _ in facts.extra})
            yield _labelled(GaugeMetricFamily, "pushagent_extra_over_threshold", "1 when a snapshot's extra "
                            "documents exceed max_delete_fraction of it.", "batch_id",
                            {batch_id: int(over) for batch_id, _, over in facts.extra})
        if facts.last_success is not None:
            yield GaugeMetricFamily("pushagent_last_success_timestamp_seconds",
                                    "End of the last push that finished (pushed or verified).", facts.last_success)

    def _latency(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily("pushagent_request_duration_seconds",
                                       "Bulk request latency by chunk size (documents).", labels=["chunk_size"])
        groups = {}
        for seconds, docs in self.facts.latencies:
            groups.setdefault(chunk_size_label(docs), []).append(seconds)
        for label, values in sorted(groups.items()):
            buckets = [(str(bound), sum(1 for v in values if v <= bound)) for bound in LATENCY_BUCKETS]
            family.add_metric([label], buckets + [("+Inf", len(values))], sum(values))
        return family


def _labelled(kind, name: str, documentation: str, label: str, values: dict):
    family = kind(name, documentation, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([str(key)], value)
    return family


def registry_for(facts: RunFacts) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RunCollector(facts))
    return registry


def grouping_key(environ=None) -> dict:
    """One Pushgateway group per host (and Slurm array task), so runs replace, not pile up."""
    environ = os.environ if environ is None else environ
    key = {"instance": socket.gethostname()}
    if environ.get("SLURM_ARRAY_TASK_ID"):
        key["array_task"] = environ["SLURM_ARRAY_TASK_ID"]
    return key


class MetricsExporter:
    """A push observer exporting RunFacts every `push_interval` seconds and at the end of the run."""

    def __init__(self, config):
        self.config = config
        self.metrics_file = Path(config.metrics_file).expanduser() if config.metrics_file else None
        self._run = None
        self._this_run = Ledger()
        self._status = "pushing"
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._thread = None
        self._lock = threading.Lock()

    def started(self, run, state) -> None:
        self._run, self._started = run, time.monotonic()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="pushagent-metrics")
        self._thread.start()

    def committed(self, run, state, this_run) -> None:
        self._this_run = dataclasses.replace(this_run)

    def finished(self, run, result) -> None:
        self.close()
        self._this_run, self._status = result.this_run, result.status
        self.export(duration_s=result.duration_s)

    def _loop(self) -> None:
        while not self._stop.wait(self.config.push_interval):
            self.export()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=PUSH_TIMEOUT + 5)
            self._thread = None

    def facts(self, duration_s: float | None = None) -> RunFacts:
        stats = self._run.stats
        return RunFacts(self._run.batch_id, self._status, self._this_run, dict(stats.statuses), stats.retries,
                        stats.bytes_raw, stats.bytes_sent, list(zip(stats.latencies, stats.request_docs)),
                        self._queue(), time.monotonic() - self._started if duration_s is None else duration_s,
                        self._last_success(), stats.rate_per_minute, stats.concurrency, stats.compress,
                        stats.requests_out, extra_documents(self.config.state_path, self.config.max_delete_fraction))

    def _queue(self) -> dict:
        if self._run.options.dry_run:
            return {}
        try:
            return queue_depth(self.config)
        except Exception as error:  # the metrics must not fail the push
            log.warning("metrics: cannot read the retry queue: %s", error)
            return {}

    def _last_success(self) -> float | None:
        if self._status in ("pushed", "verified"):
            return time.time()
        found = last_success(self.config.state_path)
        return found[0] if found else None

    def export(self, duration_s: float | None = None) -> None:
        """Write the textfile and push to the Pushgateway; log, never raise, on failure."""
        with self._lock:  # the periodic thread and the final export must not interleave
            registry = registry_for(self.facts(duration_s))
            if self.metrics_file:
                self._attempt("write", self.metrics_file, lambda: write_to_textfile(str(self.metrics_file), registry))
            if self.config.pushgateway_url:
                self._attempt("push to", self.config.pushgateway_url, lambda: push_to_gateway(
                    self.config.pushgateway_url, JOB, registry, grouping_key(), timeout=PUSH_TIMEOUT))

    @staticmethod
    def _attempt(verb: str, target, action) -> None:
        try:
            action()
        except Exception as error:  # a metrics outage must never stop the data
            log.warning("metrics: cannot %s %s: %s", verb, target, error)
