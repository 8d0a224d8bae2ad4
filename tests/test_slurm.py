"""The slurm/ templates on a real single-node Slurm, pushing into the real OpenSearch.

Preemption is tested twice: USR1 sent by `scancel --signal=USR1 --batch`
(exact timing) and USR1 sent by Slurm itself through `--signal=B:USR1@N`
near a one-minute `--time` (accurate to about 30 s). Each run writes its
JSON report to a file of its own, so the resumed run's `this_run.read`
shows that no committed line was read again.
"""

import json
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
from faultproxy import Fault, FaultProxy
from slurm_cluster import SlurmCluster, SlurmUnavailable
from support import ROOT, agent_env, count, generate

FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE"}
LOG_LINE = re.compile(r"^(\S+Z) pushagent-job: (.*)$", re.M)


FAKE_PUSHAGENT = """#!/bin/bash
# Stands in for pushagent: runs until a stop signal, then exits 75 like an interrupted push.
trap 'echo "fake: got USR1"; exit 75' USR1
trap 'echo "fake: got TERM"; exit 75' TERM
echo started
while :; do sleep 0.05; done
"""
JOB = """source slurm/pushagent-job.sh
pushagent_run push
status=$?
(( status != EXIT_INTERRUPTED )) || pushagent_requeue
exit "$status"
"""


def fake_commands(directory: Path, **scripts) -> dict:
    """Write executable stand-ins (name=text) into `directory`; an environment that finds them first."""
    for name, text in scripts.items():
        (directory / name).write_text(text)
        (directory / name).chmod(0o755)
    return {**agent_env(), "PATH": f"{directory}:/usr/bin:/bin"}


@pytest.mark.parametrize("name,requeued", [("USR1", True), ("TERM", False)])
def test_the_job_library_forwards_the_signal_and_requeues_only_after_usr1(tmp_path, name, requeued):
    """Without Slurm: a fake pushagent and a fake scontrol show what the batch script does."""
    env = fake_commands(tmp_path, pushagent=FAKE_PUSHAGENT, scontrol=f'#!/bin/sh\necho "$@" > {tmp_path}/calls\n')
    env.update({"SLURM_JOB_ID": "7", "PUSHAGENT_CMD": "pushagent"})
    job = subprocess.Popen(["bash", "-c", JOB], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    assert job.stdout.readline() == "started\n"
    job.send_signal(getattr(signal, f"SIG{name}"))
    out, err = job.communicate(timeout=30)
    assert f"SIG{name} received: forwarding it to pushagent" in err and f"fake: got {name}" in out
    calls = tmp_path / "calls"
    if requeued:
        assert job.returncode == 0 and calls.read_text() == "requeue 7\n", err
    else:
        assert job.returncode == 75 and not calls.exists() and "not requeueing" in err, err


def test_submit_sh_passes_the_site_options_and_chains_the_verify_job(tmp_path):
    """Without Slurm: a fake sbatch records the options submit.sh gives and answers job ids 1, 2, 3."""
    calls = tmp_path / "calls"
    env = fake_commands(tmp_path, sbatch=f'#!/bin/sh\necho "$@" >> {calls}\necho "$(wc -l < {calls});test"\n')
    env.update({"PUSHAGENT_ACCOUNT": "proj0042", "PUSHAGENT_MAIL_TYPE": "FAIL"})
    submit, site = str(ROOT / "slurm" / "submit.sh"), "--parsable --account=proj0042 --mail-type=FAIL"
    array = subprocess.run([submit, "-n", "3", "-b", "b1", "in.jsonl", "--index", "words"], env=env,
                           capture_output=True, text=True)
    single = subprocess.run([submit, "-n", "1", "in.jsonl"], env=env, capture_output=True, text=True)
    assert array.stdout.split() == ["batch_id=b1", "array_job=1", "verify_job=2"], array.stderr
    assert single.stdout.split() == ["push_job=3"], single.stderr
    assert calls.read_text().splitlines() == [
        f"{site} --array=0-2 {ROOT}/slurm/push-array.sbatch in.jsonl --index words --batch-id b1",
        f"{site} --dependency=afterok:1 --kill-on-invalid-dep=yes {ROOT}/slurm/verify.sbatch b1",
        f"{site} {ROOT}/slurm/push.sbatch in.jsonl"]


def test_submit_sh_refuses_more_shards_than_gzip_files_before_submitting(tmp_path):
    calls = tmp_path / "calls"
    env = fake_commands(tmp_path, sbatch=f'#!/bin/sh\necho "$@" >> {calls}\necho 1\n')
    submit = str(ROOT / "slurm" / "submit.sh")
    refused = subprocess.run([submit, "-n", "2", "one.jsonl.gz", "--index", "words"], env=env, capture_output=True,
                             text=True)
    assert refused.returncode == 2 and not calls.exists()
    assert refused.stderr == ("submit.sh: cannot push 1 input file(s) as 2 shards: one.jsonl.gz is gzip, which "
                              "cannot be split between shards; give -n 1 or fewer, or plain .jsonl inputs\n")
    accepted = subprocess.run([submit, "-n", "2", "a.jsonl.gz", "b.jsonl.gz"], env=env, capture_output=True, text=True)
    assert accepted.returncode == 0 and "array_job=1" in accepted.stdout, accepted.stderr


def test_a_jobs_report_lands_beside_its_log_wherever_output_puts_it(tmp_path):
    fake = '#!/bin/bash\necho \'{"batch_id": "b7", "status": "verified"}\'\n'
    env = fake_commands(tmp_path, pushagent=fake)
    env.update({"SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "words", "PUSHAGENT_CMD": "pushagent"})
    logs, work = tmp_path / "logs", tmp_path / "work"
    logs.mkdir(), work.mkdir()
    script = f"source {ROOT}/slurm/pushagent-job.sh; pushagent_push in.jsonl > {logs}/words-7.out"
    subprocess.run(["bash", "-c", script], cwd=work, env=env, check=True, capture_output=True)
    assert json.loads((logs / "words-7-run0.json").read_text())["batch_id"] == "b7"
    assert not list(work.iterdir())


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except SlurmUnavailable as error:
        cluster.stop()
        print(f"\nSlurm tests skipped: {error}", file=sys.stderr)
        pytest.skip(f"cannot run a Slurm cluster here: {error}")
    yield cluster
    cluster.stop()


class Jobs:
    """Submit the templates as the tests' user would, with this checkout's pushagent, and watch the jobs."""

    def __init__(self, slurm: SlurmCluster, directory: Path, url: str, index: str, state_dir: Path):
        self.slurm = slurm
        self.directory = directory
        # An embedding version, so that verification counts the batch's documents.
        self.env = {**agent_env(), "SLURM_CONF": str(slurm.conf), "PUSHAGENT_HOME": str(ROOT),
                    "PUSHAGENT_EMBEDDING_VERSION": "test-v1",
                    "PUSHAGENT_CMD": f"{sys.executable} -m pushagent", "PYTHONPATH": str(ROOT),
                    "PUSHAGENT_URL": url, "PUSHAGENT_INDEX": index, "PUSHAGENT_ID_FIELD": "ipa_id",
                    "PUSHAGENT_STATE_DIR": str(state_dir)}

    def run(self, *args, timeout=300) -> subprocess.CompletedProcess:
        return subprocess.run(args, cwd=self.directory, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def submit(self, template: str, *args, options=()) -> int:
        done = self.run("sbatch", "--parsable", *options, str(ROOT / "slurm" / template), *map(str, args))
        assert done.returncode == 0, done.stderr
        return int(done.stdout.strip().split(";")[0])

    def show(self, job_id) -> list:
        """scontrol's fields of the job, one dict per job (several for an array)."""
        shown = self.slurm.command("scontrol", "show", "job", "-o", str(job_id))
        return [dict(field.split("=", 1) for field in line.split() if "=" in field)
                for line in shown.stdout.splitlines() if line.strip()]

    def wait(self, job_id, timeout=150) -> list:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = self.show(job_id)
            if jobs and all(job["JobState"] in FINAL_STATES for job in jobs):
                return jobs
            time.sleep(0.5)
        self.run("scancel", str(job_id))
        pytest.fail(f"job {job_id} did not finish within {timeout} s: {self.show(job_id)}\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {path.name}\n{path.read_text()}" for path in sorted(self.directory.glob("*.out")))

    def reports(self, prefix: str) -> dict:
        """restart count -> the JSON report that run of the job wrote."""
        return {int(path.stem.rsplit("-run", 1)[1]): json.loads(path.read_text())
                for path in self.directory.glob(f"{prefix}-run*.json")}


@pytest.fixture
def jobs(slurm, cluster_url, index, state_dir, tmp_path):
    return Jobs(slurm, tmp_path, cluster_url, index, state_dir)


def sync_state_record(state_dir: Path, batch_id: str) -> dict:
    return json.loads((state_dir / "sync-state" / f"{batch_id}.json").read_text())


def found(record, key: str) -> list:
    """Every value stored under `key` anywhere in a nested record: the test does not fix its layout."""
    if isinstance(record, dict):
        return [v for k, v in record.items() if k == key] + [x for v in record.values() for x in found(v, key)]
    if isinstance(record, list):
        return [x for v in record for x in found(v, key)]
    return []


def check_verified_record(state_dir: Path, batch_id: str, docs: int, job_ids, restarts: int = 0) -> dict:
    """The batch's sync-state record says verified (the count checked), holds `docs` documents, names one
    of `job_ids` (job or array job) and at least `restarts` restarts."""
    record = sync_state_record(state_dir, batch_id)
    assert record["status"] == "verified" and "skipped" not in record["verification"]["count"], record
    assert record["doc_count"] == docs, record
    assert {int(i) for i in job_ids} & set(found(record, "job_id") + found(record, "array_job_id")), record
    assert max(found(record, "restart_count"), default=0) >= restarts, record
    return record


def test_push_job_pushes_a_batch_and_ends_verified(jobs, cluster_url, index, state_dir, tmp_path):
    data = generate(tmp_path / "words.jsonl", 3_000)
    done = jobs.run("sbatch", "--wait", str(ROOT / "slurm" / "push.sbatch"), str(data))
    job_id = int(re.search(r"Submitted batch job (\d+)", done.stdout).group(1))
    assert done.returncode == 0, jobs.logs()
    report = jobs.reports(f"pushagent-{job_id}")[0]
    assert (report["read"], report["indexed"], report["status"]) == (3_000, 3_000, "verified")
    assert report["slurm"]["job_id"] == job_id and report["slurm"]["restart_count"] == 0
    assert report["slurm"]["node"] == jobs.show(job_id)[0]["NodeList"]
    assert count(cluster_url, index) == 3_000
    check_verified_record(state_dir, report["batch_id"], 3_000, [job_id])


class Timeline:
    """Wall-clock times of the proxy's requests, to measure what a preemption costs."""

    def __init__(self, delay: float):
        self.delay = delay
        self.times = []

    def plan(self, request):
        self.times.append(time.time())
        return Fault.delay(self.delay) if request.ids and self.delay else None

    def first_after(self, moment: float) -> float:
        return min(t for t in self.times if t > moment)


def log_times(log: str, text: str) -> list:
    """Epoch seconds of the job log lines containing `text`."""
    return [datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
            for stamp, message in LOG_LINE.findall(log) if text in message]


def speed_up_when_interrupted(state_dir: Path, timeline: Timeline) -> threading.Thread:
    """Drop the proxy's delay once the first run has saved an interrupted checkpoint, so the rerun is quick."""
    def watch():
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            for path in (state_dir / "runs").glob("*.json"):
                if json.loads(path.read_text() or "{}").get("status") == "interrupted":
                    timeline.delay = 0
                    return
            time.sleep(0.1)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def check_resumed_exactly(jobs, job_id, records, cluster_url, index, proxy) -> tuple:
    """Checkpoint, exit 75, requeue, resume without re-reading a committed line; (job log, last report)."""
    (job,) = jobs.wait(job_id)
    log = jobs.logs()
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert int(job["Restarts"]) >= 1
    runs = jobs.reports(f"pushagent-{job_id}")
    first, last = runs[0], runs[max(runs)]
    assert first["status"] == "interrupted" and 0 < first["read"] == first["position"]["line"] < records, first
    assert "push exited 75" in log and "requeueing job" in log
    assert last["status"] == "verified" and last["read"] == records
    assert last["this_run"]["read"] == records - runs[max(runs) - 1]["read"], "a committed line was read again"
    assert last["slurm"]["restart_count"] == max(runs) >= 1
    assert count(cluster_url, index) == records
    assert proxy.resent() == 0 and len(proxy.id_counts()) == records
    return log, last


def preemption_timings(log: str, timeline: Timeline) -> dict:
    signalled = log_times(log, "SIGUSR1 received")[0]
    exited = log_times(log, "push exited 75")[0]
    restarted = log_times(log, "restart=1")[0]
    resumed = timeline.first_after(restarted)
    return {"signal_to_exit_75": exited - signalled, "exit_to_rerun_start": restarted - exited,
            "rerun_start_to_first_request": resumed - restarted, "signal_to_resumed_request": resumed - signalled}


def wait_for_requests(proxy, number: int, seconds: float = 60) -> None:
    """Until the proxy has seen `number` bulk requests: a slowed push is then mid-way."""
    deadline = time.monotonic() + seconds
    while len(proxy.bulk_requests()) < number:
        assert time.monotonic() < deadline, f"fewer than {number} bulk requests within {seconds} s"
        time.sleep(0.05)


def print_timings(what: str, timings: dict) -> None:
    print(f"\n{what}: " + ", ".join(f"{key} {value:.1f} s" for key, value in timings.items()))


def preempted_push(jobs, cluster_url, index, state_dir, data, records, delay, label, interrupt=None, extra=(),
                   options=()):
    """Submit push.sbatch through a slowed proxy, `interrupt(job_id, proxy)` it, check the resumed run.

    Prints what the preemption cost; returns the last run's report.
    """
    timeline = Timeline(delay)
    with FaultProxy(cluster_url, plan=timeline.plan) as proxy:
        jobs.env["PUSHAGENT_URL"] = proxy.url
        speed_up_when_interrupted(state_dir, timeline)
        job_id = jobs.submit("push.sbatch", data, *extra, options=options)
        if interrupt:
            interrupt(job_id, proxy)
        log, report = check_resumed_exactly(jobs, job_id, records, cluster_url, index, proxy)
    print_timings(label, preemption_timings(log, timeline))
    return job_id, report


def test_usr1_mid_push_checkpoints_requeues_and_resumes_exactly(jobs, cluster_url, index, state_dir, tmp_path):
    def usr1(job_id, proxy):
        wait_for_requests(proxy, 4)
        sent = jobs.run("scancel", "--signal=USR1", "--batch", str(job_id))
        assert sent.returncode == 0, sent.stderr

    data = generate(tmp_path / "words.jsonl", 6_000)
    job_id, report = preempted_push(jobs, cluster_url, index, state_dir, data, 6_000, delay=0.5,
                                    label="scancel --signal=USR1 --batch", interrupt=usr1,
                                    extra=["--chunk-docs", "300"])
    check_verified_record(state_dir, report["batch_id"], report["read"], [job_id], restarts=1)


def test_time_limit_signal_requeues_and_resumes_exactly(jobs, cluster_url, index, state_dir, tmp_path):
    # 45 slow requests would take about 70 s, more than --time=1 allows: Slurm's USR1 comes mid-push.
    data = generate(tmp_path / "words.jsonl", 9_000)
    job_id, report = preempted_push(jobs, cluster_url, index, state_dir, data, 9_000, delay=3,
                                    label="--signal=B:USR1@30 with --time=1", extra=["--chunk-docs", "200"],
                                    options=["--time=1", "--signal=B:USR1@30"])
    check_verified_record(state_dir, report["batch_id"], report["read"], [job_id], restarts=1)


def test_scancel_checkpoints_and_ends_the_job_and_submitting_again_resumes(jobs, cluster_url, index, state_dir,
                                                                           tmp_path):
    records = 4_000
    data = generate(tmp_path / "words.jsonl", records)
    timeline = Timeline(delay=0.5)
    with FaultProxy(cluster_url, plan=timeline.plan) as proxy:
        jobs.env["PUSHAGENT_URL"] = proxy.url
        job_id = jobs.submit("push.sbatch", data, "--chunk-docs", "250")
        wait_for_requests(proxy, 3)
        assert jobs.run("scancel", str(job_id)).returncode == 0
        (job,) = jobs.wait(job_id)
        first = jobs.reports(f"pushagent-{job_id}")[0]
        assert (job["JobState"], job["Restarts"]) == ("CANCELLED", "0"), jobs.logs()
        assert first["status"] == "interrupted" and 0 < first["read"] < records
        assert "push exited 75" in jobs.logs() and "not requeueing" in jobs.logs()
        timeline.delay = 0
        again = jobs.submit("push.sbatch", data, "--chunk-docs", "250")
        (job,) = jobs.wait(again)
        second = jobs.reports(f"pushagent-{again}")[0]
        assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), jobs.logs()
        assert second["this_run"]["read"] == records - first["read"] and second["read"] == records
        assert proxy.resent() == 0
    assert count(cluster_url, index) == records


def test_array_of_three_shards_then_the_verify_job(jobs, cluster_url, index, state_dir, tmp_path):
    records = 6_000
    data = generate(tmp_path / "words.jsonl", records)
    with FaultProxy(cluster_url) as proxy:
        jobs.env.update({"PUSHAGENT_URL": proxy.url, "PUSHAGENT_MAIL_TYPE": "FAIL"})
        submitted = jobs.run(str(ROOT / "slurm" / "submit.sh"), "-n", "3", "-b", "words-array", str(data),
                             "--chunk-docs", "500")
        assert submitted.returncode == 0, submitted.stderr
        ids = dict(line.split("=", 1) for line in submitted.stdout.split())
        assert ids["batch_id"] == "words-array"
        verify = jobs.wait(ids["verify_job"])
        tasks = jobs.wait(ids["array_job"])
        id_counts = proxy.id_counts()
    log = jobs.logs()
    assert [(t["JobState"], t["ExitCode"], t["MailType"]) for t in tasks] == [("COMPLETED", "0:0", "FAIL")] * 3, log
    assert (verify[0]["JobState"], verify[0]["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert set(id_counts.values()) == {1} and len(id_counts) == records
    reports = [jobs.reports(f"pushagent-shard-{ids['array_job']}_{task}")[0] for task in range(3)]
    assert [(r["shard"], r["batch_id"], r["slurm"]["array_task_id"]) for r in reports] == [
        (f"{task}/3", "words-array", task) for task in range(3)]
    assert sum(r["read"] for r in reports) == records and all(r["read"] > 0 for r in reports)
    assert sorted(p.name for p in (state_dir / "runs").glob("*.json")) == [       # one input list for all three
        "words-array.manifest.json", *(f"words-array.shard-{task}-of-3.json" for task in range(3))]
    assert count(cluster_url, index) == records
    record = check_verified_record(state_dir, "words-array", records, [ids["array_job"], ids["verify_job"]])
    assert len(list((state_dir / "sync-state").glob("words-array*.json"))) == 1
    check_shards_in_record(record, int(ids["array_job"]), int(ids["verify_job"]), records)


def check_shards_in_record(record: dict, array_job: int, verify_job: int, records: int) -> None:
    """The batch's record is the verify job's, with the totals and each shard's run and array task."""
    assert record["slurm"]["job_id"] == verify_job and "shard" not in record, record
    assert record["counters"]["read"] == records and record["verification"]["count"]["actual"] == records
    assert [(s["shard"], s["status"], s["slurm"]["array_job_id"], s["slurm"]["array_task_id"])
            for s in record["shards"]] == [(f"{task}/3", "pushed", array_job, task) for task in range(3)]


def test_records_a_shard_leaves_queued_are_drained_by_the_verify_job(jobs, cluster_url, index, state_dir, tmp_path):
    records = 3_000
    data = generate(tmp_path / "words.jsonl", records)
    rejected = []

    def plan(request):
        # The batch's first bulk request: every other item refused with 429, and no in-run retry, so into
        # the queue, for the verify job's drain (--all: sent at once).
        if request.ids and not rejected:
            rejected.append(request.number)
            return Fault.item_status(429, every=2)
        return None

    with FaultProxy(cluster_url, plan=plan) as proxy:
        jobs.env.update({"PUSHAGENT_URL": proxy.url, "PUSHAGENT_MAX_RETRIES": "0"})
        submitted = jobs.run(str(ROOT / "slurm" / "submit.sh"), "-n", "3", "-b", "words-queued", str(data),
                             "--chunk-docs", "400")
        assert submitted.returncode == 0, submitted.stderr
        ids = dict(line.split("=", 1) for line in submitted.stdout.split())
        (verify,) = jobs.wait(ids["verify_job"])
        tasks = jobs.wait(ids["array_job"])
        id_counts = proxy.id_counts()
    log = jobs.logs()
    reports = [jobs.reports(f"pushagent-shard-{ids['array_job']}_{task}")[0] for task in range(3)]
    queued = sum(r["queued"] for r in reports)
    assert queued == 200 and "records left in the retry queue" in log, log
    assert [(t["JobState"], t["ExitCode"]) for t in tasks] == [("COMPLETED", "0:0")] * 3, log
    assert (verify["JobState"], verify["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert "drain exited 0" in log
    assert len(id_counts) == records and set(id_counts.values()) == {1, 2}
    assert sorted(id_counts.values()).count(2) == queued
    assert count(cluster_url, index) == records
    record = check_verified_record(state_dir, "words-queued", records, [ids["array_job"], ids["verify_job"]])
    check_shards_in_record(record, int(ids["array_job"]), int(ids["verify_job"]), records)
