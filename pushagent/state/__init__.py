"""What survives a crash, on this side of the link: checkpoint, ledger, document tables, sync-state
records and audit log, the S3 mirror, and the retry queue. Nothing here sends a request."""
