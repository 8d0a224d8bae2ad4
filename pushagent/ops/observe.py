"""The observers of a push run (progress, chunk log, metrics), chosen from the config and the terminal.

An observer has any of the methods started, chunk_resolved, committed and
finished (see PushRun.notify) and a close(), called however the run ends.
"""

import contextlib
import logging
import sys

from pushagent.ops import logs
from pushagent.ops.progress import progress_for


def observers_for(config, stream=None) -> list:
    """Progress unless -q, the per-chunk log, and metrics when an output is configured."""
    stream = stream or sys.stderr
    settings = logs.current
    observers = []
    if settings.level <= logging.INFO:
        observers.append(progress_for(stream, config.progress_seconds))
    observers.append(logs.ChunkLog(logging.INFO if settings.fmt == "json" else logging.DEBUG))
    if config.metrics_file or config.pushgateway_url:
        # prometheus_client loads only when asked for: a run without metrics keeps its ~8 MiB.
        from pushagent.ops.metrics import MetricsExporter

        observers.append(MetricsExporter(config))
    return observers


@contextlib.contextmanager
def observing(config, stream=None):
    """Yield the observers of one run; close them (stop timers, end the bar) however it ends."""
    observers = observers_for(config, stream)
    try:
        yield observers
    finally:
        for observer in observers:
            close = getattr(observer, "close", None)
            if close is not None:
                close()
