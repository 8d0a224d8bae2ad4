"""The ledger: every record read is indexed, current, unchanged (incremental), queued, dead or quarantined.

One counter type for a push (this run and the whole batch), a checkpoint,
the shards of a batch, a drain, the reports and `status`.
"""

import dataclasses

from pushagent.errors import LedgerError

OUTCOMES = ("indexed", "current", "unchanged", "queued", "dead", "quarantined")


@dataclasses.dataclass
class Ledger:
    """What entered a run (`read`) and where each of those went; check() proves that none went missing.

    `read` counts what the run took in: a push's input records, a drain's
    items taken from the retry queue. `queued` means waiting in the retry
    queue afterwards: put there by a push, or failed again (or released
    unsent) by a drain. A drain quarantines nothing and has no `unchanged`.
    """

    read: int = 0
    indexed: int = 0
    current: int = 0
    unchanged: int = 0      # --incremental: the cluster already held it as the agent wrote it; not sent
    queued: int = 0
    dead: int = 0
    quarantined: int = 0

    @classmethod
    def from_dict(cls, counters: dict) -> "Ledger":
        """The ledger of a checkpoint or record; a counter it lacks (written before that outcome existed, like
        `unchanged`) is 0, one this version does not know is left out. TypeError when `counters` is no mapping."""
        if not isinstance(counters, dict):
            raise TypeError(f"counters must be a mapping, not {type(counters).__name__}")
        return cls(**{field.name: int(counters.get(field.name, 0)) for field in dataclasses.fields(cls)})

    @classmethod
    def total(cls, ledgers) -> "Ledger":
        """The sum of `ledgers`, e.g. over the shards of a batch."""
        total = cls()
        for ledger in ledgers:
            total.add(ledger)
        return total

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
