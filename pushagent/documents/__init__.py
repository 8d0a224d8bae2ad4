"""From an input line to request bytes: the document with its stamps and checksum (builder.py), and
chunks of documents with their NDJSON bodies and positions (chunker.py). No I/O, no HTTP."""
