"""Everything that talks to the search cluster: the bulk transport and sender (transport.py, bulk.py),
item classes, rate limit, requests in flight and encoding (concurrency.py, compression.py), outage budget,
auth, TLS, and the read side (client.py, scan.py)."""
