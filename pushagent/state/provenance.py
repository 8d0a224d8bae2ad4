"""What a batch's inputs hold, remembered per state directory: a re-staged copy keeps its batch's time.

Without `version_field` or `batch_time`, a batch's version is the newest
modification time of its inputs. A copy made without `cp -p`, or uploaded
again to S3, would look newer than the batch that replaced it and overwrite
it. So the first push of some content records its batch id and version under
a digest of that content (`<state_dir>/contents/<digest>.json`), and a later
push of the same content takes them over.
"""

import hashlib
import json
import logging
from pathlib import Path

from pushagent.state.checkpoint import write_atomically

log = logging.getLogger(__name__)
READ_BYTES = 1024 * 1024


def content_digest(files) -> str:
    """sha256 over the inputs' content, in order: of each local file's bytes, of each S3 object's ETag."""
    digest = hashlib.sha256()
    for input_file in files:
        if input_file.etag:
            digest.update(f"etag:{input_file.etag}\n".encode())
            continue
        part = hashlib.sha256()
        with open(input_file.path, "rb") as handle:   # the file as stored: gzip bytes stay compressed
            while block := handle.read(READ_BYTES):
                part.update(block)
        digest.update(f"sha256:{part.hexdigest()}\n".encode())
    return digest.hexdigest()


class ContentRegistry:
    """`<state_dir>/contents/<digest>.json`: {batch_id, batch_version} of the first push of that content."""

    def __init__(self, state_dir):
        self.directory = Path(state_dir) / "contents"

    def recall(self, digest: str) -> dict | None:
        try:
            return json.loads((self.directory / f"{digest}.json").read_text())
        except (OSError, ValueError):
            return None

    def remember(self, digest: str, batch_id: str, batch_version: int) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        entry = {"batch_id": batch_id, "batch_version": batch_version}
        write_atomically(self.directory / f"{digest}.json", json.dumps(entry).encode())

