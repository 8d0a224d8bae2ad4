"""The ledger: every record read is indexed, current, unchanged (incremental), queued, dead or quarantined."""

import dataclasses

from pushagent.errors import LedgerError

OUTCOMES = ("indexed", "current", "unchanged", "queued", "dead", "quarantined")


@dataclasses.dataclass
class Ledger:
    read: int = 0
    indexed: int = 0
    current: int = 0
    unchanged: int = 0      # --incremental: the cluster already held it as the agent wrote it; not sent
    queued: int = 0
    dead: int = 0
    quarantined: int = 0

    def add(self, other: "Ledger") -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))

    @property
    def accounted(self) -> int:
        return sum(getattr(self, name) for name in OUTCOMES)

    @property
    def unfinished(self) -> int:
        """Records not (yet) in the cluster: queued, dead or quarantined."""
        return self.queued + self.dead + self.quarantined

    def check(self, label: str = "run") -> None:
        if self.read != self.accounted:
            raise LedgerError(f"{label} ledger does not add up: read {self.read} != indexed {self.indexed} + "
                              f"current {self.current} + unchanged {self.unchanged} + queued {self.queued} + "
                              f"dead {self.dead} + quarantined {self.quarantined}",
                              hint="this is a bug: keep the state dir and report it")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)
