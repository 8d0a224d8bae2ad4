"""Is the retry queue's storage durable? The facts `doctor` checks before a long job.

A queue `put` must survive a node crash once the checkpoint has moved past
its records. SQLite guarantees that with `synchronous=FULL` on a local disk,
but its locks and fsync are not reliable on network file systems (NFS,
Lustre, GPFS...), where HPC home and scratch directories usually live. A
Redis queue is only as durable as the server's persistence: without an
append-only file or snapshots, a restart empties it.
"""

import os
from pathlib import Path

OK, WARN = "ok", "warn"
# /proc/mounts types on which SQLite's file locking and fsync cannot be trusted.
NETWORK_FILESYSTEMS = ("nfs", "nfs4", "lustre", "gpfs", "cifs", "smb3", "smbfs", "beegfs", "panfs", "ceph",
                       "fuse.glusterfs", "fuse.sshfs", "afs")


def mount_of(path: Path, mounts_text: str) -> tuple[str, str]:
    """(mount point, file system type) of the mount holding `path`: the longest matching mount point."""
    target = os.path.realpath(path)
    best = ("/", "unknown")
    for line in mounts_text.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[0]):
            best = (point, fields[2])
    return best


def read_mounts(path: str = "/proc/mounts") -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def sqlite_durability(db_path: Path, mounts_text: str) -> tuple[str, str]:
    """(status, detail) for a SQLite queue file: a warning on a network file system."""
    existing = next((p for p in (db_path, *db_path.parents) if p.exists()), db_path)
    point, fstype = mount_of(existing, mounts_text)
    if fstype in NETWORK_FILESYSTEMS or fstype.startswith("nfs"):
        return WARN, (f"the SQLite queue {db_path} is on {fstype} (mounted at {point}): SQLite's locks and fsync "
                      "are not reliable there, so a crash or two hosts writing can lose or corrupt queued records; "
                      "put queue_url on a local disk or use queue_url: redis://... (checkpoints may stay there)")
    return OK, f"SQLite queue on {fstype} ({point}), synchronous=FULL: a put is on disk before the checkpoint"


def redis_durability(settings: dict) -> tuple[str, str]:
    """(status, detail) from the server's persistence settings (CONFIG GET, or INFO persistence)."""
    if settings.get("appendonly") == "yes" or settings.get("aof_enabled") in (1, "1"):
        return OK, "Redis writes an append-only file (appendonly yes)"
    save = settings.get("save")
    if save:
        return WARN, (f"Redis keeps only snapshots (save {save!r}, appendonly no): a crash loses the queue's writes "
                      "since the last one; set appendonly yes")
    return WARN, ("Redis has no persistence (appendonly no" + (", no save schedule" if save == "" else "") +
                  "): a restart empties the retry queue; set appendonly yes")
