"""Everything that talks to the search cluster: the bulk transport and sender (transport.py, bulk.py),
item classes, rate limit, outage budget, auth, TLS, and the read side (client.py, scan.py)."""
