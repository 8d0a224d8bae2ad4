"""pushagent: outbound-only push of JSONL batches into Elasticsearch/OpenSearch."""

__version__ = "0.1.0"
