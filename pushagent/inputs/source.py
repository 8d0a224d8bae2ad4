"""An input of a batch: where it is (a local file or an S3 object) and what identifies its content.

Every stage that names an input holds one; readers (reader.py, s3.py) open it.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class InputFile:
    path: str                           # absolute local path, or s3://bucket/key
    size: int
    mtime_ns: int                       # S3: Last-Modified, whole seconds
    head_sha256: str | None = None      # local files: sha256 of the first 64 KiB
    etag: str | None = None             # S3 objects: the ETag every GET is pinned to
    endpoint_url: str | None = dataclasses.field(default=None, compare=False)

    @property
    def is_gzip(self) -> bool:
        return self.path.endswith(".gz")

    @property
    def source(self) -> str:
        return "s3" if self.path.startswith("s3://") else "file"

    def fingerprint(self) -> dict:
        """What identifies this input's content in a checkpoint (not where it is served from)."""
        fields = ("path", "size", "mtime_ns", "head_sha256", "etag")
        return {name: getattr(self, name) for name in fields if getattr(self, name) is not None}
