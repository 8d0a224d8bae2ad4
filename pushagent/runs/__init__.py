"""The commands' runs, each joining the stages: push (with incremental, repeats, sharded batches),
drain, verify (checks, full scan, extra documents) and what a push records (record.py)."""
