"""A batch's identity and build settings: its version (generation time), its default id, its stamps.

Shared by push and by verify from inputs, so both derive the same batch
from the same files and configuration.
"""

import hashlib
import re
from pathlib import Path

from pushagent.documents.builder import BuildSettings, iso_utc_from_ms, ms_from_iso
from pushagent.errors import ConfigError


def batch_generation_ms(config, files) -> int:
    """The batch's version: batch_time when given, else the newest input mtime, in ms."""
    if config.batch_time:
        try:
            return ms_from_iso(config.batch_time)
        except ValueError:
            raise ConfigError(f"batch_time must be ISO 8601, got {config.batch_time!r}") from None
    return max(f.mtime_ns for f in files) // 1_000_000


def default_batch_id(files, settings: dict) -> str:
    digest = hashlib.sha256(repr(([f.fingerprint() for f in files], sorted(settings.items()))).encode())
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(files[0].path).name.split(".")[0])[:40] or "batch"
    return f"{stem}-{digest.hexdigest()[:10]}"


def build_settings(config, batch_ms: int) -> BuildSettings:
    if config.index is None and config.index_field is None:
        raise ConfigError("no target index: set --index or index_field")
    if config.index is not None and config.index not in config.allowed:
        raise ConfigError(f"index {config.index!r} is not in allowed_indices {sorted(config.allowed)}")
    return BuildSettings(
        id_field=config.id_field, default_index=config.index, index_field=config.index_field,
        allowed_indices=frozenset(config.allowed), batch_version=batch_ms,
        batch_time_iso=iso_utc_from_ms(batch_ms), version_field=config.version_field,
        op_field=config.op_field, allow_delete=config.allow_delete,
        embedding_version=config.embedding_version, embedding_version_field=config.embedding_version_field,
        timestamp_field=config.timestamp_field, checksum_field=config.checksum_field,
        batch_field=config.batch_field, max_record_bytes=config.chunk_bytes)
