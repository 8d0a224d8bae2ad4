"""A throwaway single-node Slurm (slurmctld + slurmd, munge) for the tests, run as root.

Nothing is installed here: `scripts/install.sh` installs slurm-wlm and munge.
The configuration follows ../shared notes on this machine kind: short
credential expiry and a 2 s scheduler so a requeued job runs again within
seconds, ports chosen free so a second cluster on the machine does not clash.
Daemons are stopped by the PIDs in their pid files, munged only if we started it.
"""

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from support import free_ports

MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_RUN = Path("/run/munge")
DAEMONS = {"munged": "/usr/sbin/munged", "slurmctld": "/usr/sbin/slurmctld", "slurmd": "/usr/sbin/slurmd"}

CONFIG = """\
ClusterName=pushagent-test
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=5
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
MailProg=/bin/true
KillWait=5
OverTimeLimit=0
MinJobAge=300
InactiveLimit=0
# Declared bigger than the machine, so three 2-CPU array tasks run side by side.
SlurmdParameters=config_overrides
NodeName={host} NodeAddr=127.0.0.1 CPUs=6 RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class SlurmUnavailable(Exception):
    """Slurm cannot run here; the message says why."""


class SlurmCluster:
    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.conf = self.directory / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._started_munged = None

    def start(self) -> "SlurmCluster":
        try:
            return self._start()
        except (OSError, subprocess.SubprocessError) as error:
            raise SlurmUnavailable(f"{type(error).__name__}: {error}") from None

    def _start(self) -> "SlurmCluster":
        missing = [name for name, path in DAEMONS.items() if not os.access(path, os.X_OK)]
        missing += [name for name in ("sbatch", "munge", "unmunge") if not shutil.which(name)]
        if missing:
            raise SlurmUnavailable(f"not installed: {', '.join(missing)} (scripts/install.sh installs slurm-wlm "
                                   "and munge)")
        if os.geteuid() != 0:
            raise SlurmUnavailable("starting slurmctld, slurmd and munged needs root")
        self._ensure_munged()
        for sub in ("state", "spool"):
            (self.directory / sub).mkdir(parents=True, exist_ok=True)
        host = socket.gethostname().split(".")[0]
        ctld_port, slurmd_port = free_ports(2)
        self.conf.write_text(CONFIG.format(host=host, dir=self.directory, ctld_port=ctld_port,
                                           slurmd_port=slurmd_port))
        self._run(DAEMONS["slurmctld"], "-f", str(self.conf), "-i")
        self._run(DAEMONS["slurmd"], "-f", str(self.conf))
        self._wait_for(lambda: self.command("sinfo", "-h", "-N", "-o", "%t").stdout.strip() == "idle", 30,
                       "the node did not become idle")
        return self

    def stop(self) -> None:
        for name in ("slurmd", "slurmctld"):
            stop_pid_file(self.directory / f"{name}.pid")
        if self._started_munged:
            stop_pid_file(self._started_munged)

    def command(self, *args, check=False, timeout=60) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster."""
        return subprocess.run(args, capture_output=True, text=True, env=self.env, check=check, timeout=timeout)

    def log_tail(self, lines=40) -> str:
        return "\n".join(path.name + ":\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
                         for path in sorted(self.directory.glob("*.log")))

    def _ensure_munged(self) -> None:
        if _munge_works():
            return
        MUNGE_RUN.mkdir(mode=0o755, exist_ok=True)
        shutil.chown(MUNGE_RUN, "munge", "munge")
        if not MUNGE_KEY.exists() or MUNGE_KEY.stat().st_size == 0:
            self._run("mungekey", "--create", f"--keyfile={MUNGE_KEY}")
            shutil.chown(MUNGE_KEY, "munge", "munge")
            MUNGE_KEY.chmod(0o400)
        self._run("runuser", "-u", "munge", "--", DAEMONS["munged"])
        self._started_munged = MUNGE_RUN / "munged.pid"
        self._wait_for(_munge_works, 10, "munged did not answer")

    def _run(self, *args) -> None:
        done = subprocess.run(args, capture_output=True, text=True, env=self.env, timeout=60)
        if done.returncode != 0:
            raise SlurmUnavailable(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}\n"
                                   f"{self.log_tail()}")

    def _wait_for(self, ready, seconds: float, what: str) -> None:
        deadline = time.monotonic() + seconds
        while not ready():
            if time.monotonic() > deadline:
                raise SlurmUnavailable(f"{what} within {seconds} s\n{self.log_tail()}")
            time.sleep(0.2)


def _munge_works() -> bool:
    try:
        encoded = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        decoded = subprocess.run(["unmunge"], input=encoded.stdout, capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return encoded.returncode == 0 and decoded.returncode == 0


def stop_pid_file(path: Path, seconds: float = 15) -> None:
    """TERM the process named in `path`, then KILL it if it is still there after `seconds`."""
    try:
        pid = int(path.read_text().split()[0])
        os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError, IndexError):
        return
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except OSError:
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
