"""Whether a request body goes gzip'd: `compress: true` or `false`, or `auto`, which measures.

gzip makes an embeddings body about 2.4x smaller and costs CPU on both
sides: it pays when the link is what limits the push and loses when the
cluster's CPU is. `auto` sends PROBES requests alternately gzip'd and plain,
side by side, then keeps gzip if the fastest plain request took more than
GZIP_GAIN times as long per document as the fastest gzip'd one (the time
counts the compression too), else plain. The time is each request's own
share of its life with the others out (ConcurrencyLimit._share): the first
requests of a push go out as the limit rises, and a probe sent later waits
behind more (the last plain one, timed as it came, made gzip look faster on
loopback, where it is slower). The fastest, not the median, as TCP Vegas
takes the lowest round trip: what gets in a probe's way only adds time (a
node still cold at the first pair made both encodings look alike over a
WAN, and plain was kept). The margin stands for what a request's own time
does not show: the CPU that gzip takes on both sides from every other
request, which on a CPU-bound cluster costs more than it saves. What limits
a push can change (other traffic on the link, other load on the cluster),
so every REPROBE requests it measures again the same way.
"""

import threading
import typing

from pushagent.cluster.concurrency import REMNANT

PROBES = 4          # requests of one measurement, alternately gzip'd and plain
REPROBE = 50        # requests from one measurement to the next
GZIP_GAIN = 1.25    # how much slower plain requests must be for gzip to be kept


class Encoding(typing.NamedTuple):
    gzip: bool
    probe: bool     # sent to measure, not because it is the setting in use


class Compression:
    """Picks the encoding of each request; with `auto`, from the answers to the probes."""

    def __init__(self, setting):
        self.auto = setting == "auto"
        self.gzip = setting is not False   # auto starts gzip'd: most pushes cross a network
        self._sent = 0
        self._largest = 0
        self._probes = {True: [], False: []}
        self._lock = threading.Lock()

    def pick(self) -> Encoding:
        """The encoding of the next request."""
        if not self.auto:
            return Encoding(self.gzip, False)
        with self._lock:
            turn = self._sent % REPROBE
            self._sent += 1
        return Encoding(turn % 2 == 0, True) if turn < PROBES else Encoding(self.gzip, False)

    def probe_due(self) -> bool:
        """The next request is a probe (of either encoding)."""
        with self._lock:
            return self.auto and self._sent % REPROBE < PROBES

    def answered(self, encoding: Encoding, seconds: float, docs: int) -> None:
        """A clean answer to a request of `docs` documents after its own `seconds` (compression included)."""
        if not encoding.probe:
            return
        with self._lock:
            self._largest = max(self._largest, docs)
            if docs * REMNANT < self._largest:
                return
            probes = self._probes
            probes[encoding.gzip].append(seconds / docs)
            if min(len(probes[True]), len(probes[False])) >= PROBES // 2:
                self.gzip = min(probes[False]) > GZIP_GAIN * min(probes[True])
                probes[True], probes[False] = [], []
