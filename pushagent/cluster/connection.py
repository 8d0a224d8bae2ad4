"""The cluster a run talks to: it makes the run's bulk transport and read clients.

Push, drain and verify take a `cluster` (any object with `transport(stats)`
and `client()`) and default to HttpCluster; the tests' in-memory cluster
(tests/fakecluster.py) is the other one.
"""

from pushagent.cluster.auth import authorization_header
from pushagent.cluster.client import ClusterClient
from pushagent.cluster.transport import HttpTransport, TransferStats


class HttpCluster:
    """The cluster at `config.url`. Builds nothing until asked, so a dry run never reads a key."""

    def __init__(self, config):
        self.config = config

    def transport(self, stats: TransferStats) -> HttpTransport:
        """A run's bulk transport, `post(payload, docs, gzip, raw_bytes) -> BulkResponse`, counting what it
        sends into `stats`."""
        return HttpTransport(self.config, authorization_header(self.config), stats)

    def client(self) -> ClusterClient:
        """A new read client (a thread's own: sessions are not shared between threads); close it after use."""
        return ClusterClient(self.config)
