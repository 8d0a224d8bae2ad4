"""Whether a request body goes gzip'd: `compress: true` or `false`, or `auto`, which measures.

gzip makes an embeddings body about 2.4x smaller and costs CPU on both
sides: it pays when the link is what limits the push and loses when the
cluster's CPU is. `auto` sends PROBES requests alternately gzip'd and plain,
side by side, then takes gzip if the fastest plain request took more than
GZIP_GAIN times as long per document as the fastest gzip'd one (the time
counts the compression too), else plain; later measurements take plain
only if it took less than PLAIN_GAIN times, and in between keep the
encoding in use. The time is each request's own
share of its life with the others out (ConcurrencyLimit._share): the first
requests of a push go out as the limit rises, and a probe sent later waits
behind more (the last plain one, timed as it came, made gzip look faster on
loopback, where it is slower). The fastest, not the median, as TCP Vegas
takes the lowest round trip: what gets in a probe's way only adds time (a
node still cold at the first pair made both encodings look alike over a
WAN, and plain was kept). The margin stands for what a request's own time
does not show: the CPU that gzip takes on both sides from every other
request, which on a CPU-bound cluster costs more than it saves. The first
measurement is taken as the first requests cross the link together, so a
plain probe there pays for its bytes as every plain request would. Later,
a plain probe no faster than a gzip'd one does not show that plain pays:
in the middle of a push over a WAN, with the node the bound and the link
gzip'd traffic leaves room in, plain probes took 1.11-1.17x as long, plain
was taken, its 2.4x the bytes filled the link, and the push slowed to the
link's plain rate until the next measurement took gzip back (1.83x). Even
so, a probe in that middle can show plain faster (0.79x once): so a switch
is measured again CONFIRM requests after it, not REPROBE, and undone as
soon as the link shows it was wrong. What limits a push can change (other
traffic on the link, other load on the cluster), so every REPROBE requests
it measures again the same way.
"""

import logging
import threading
import typing

from pushagent.cluster.concurrency import REMNANT

PROBES = 4          # requests of one measurement, alternately gzip'd and plain
REPROBE = 50        # requests from one measurement to the next
CONFIRM = 10        # requests from a switch to the measurement that keeps or undoes it
GZIP_GAIN = 1.25    # how much slower plain requests must be for gzip to be taken
PLAIN_GAIN = 1.0    # how much faster plain requests must be for plain to be taken

log = logging.getLogger(__name__)


class Encoding(typing.NamedTuple):
    gzip: bool
    probe: bool     # sent to measure, not because it is the setting in use


class Compression:
    """Picks the encoding of each request; with `auto`, from the answers to the probes."""

    def __init__(self, setting):
        self.auto = setting == "auto"
        self.gzip = setting is not False   # auto starts gzip'd: most pushes cross a network
        self._sent = 0
        self._window = 0                   # the number of the request that starts the next measurement
        self._measured = False             # a measurement has decided (the first decides alone)
        self._largest = 0
        self._probes = {True: [], False: []}
        self._lock = threading.Lock()

    def pick(self) -> Encoding:
        """The encoding of the next request."""
        if not self.auto:
            return Encoding(self.gzip, False)
        with self._lock:
            turn = self._sent - self._window
            self._sent += 1
            if turn == PROBES - 1:
                self._window += REPROBE
        return Encoding(turn % 2 == 0, True) if 0 <= turn < PROBES else Encoding(self.gzip, False)

    def probe_due(self) -> bool:
        """The next request is a probe (of either encoding)."""
        with self._lock:
            return self.auto and 0 <= self._sent - self._window < PROBES

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
                fastest_gzip = min(probes[True])
                self._decide(min(probes[False]) / fastest_gzip if fastest_gzip else float("inf"))
                probes[True], probes[False] = [], []

    def _decide(self, ratio: float) -> None:
        """gzip or plain from how much longer the plain probes took per document than the gzip'd ones; a change
        is logged at info, as it changes the push's rate."""
        in_between = PLAIN_GAIN <= ratio <= GZIP_GAIN and self._measured
        gzip = self.gzip if in_between else ratio > GZIP_GAIN
        self._measured = True
        switch = gzip != self.gzip
        (log.info if switch else log.debug)(
            "compress: auto: plain requests took %.2fx as long per document as gzip'd ones: %s %s",
            ratio, "switching to" if switch else "keeping", "gzip" if gzip else "plain")
        self.gzip = gzip
        if switch:
            self._window = min(self._window, self._sent + CONFIRM)
