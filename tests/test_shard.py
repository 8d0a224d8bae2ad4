"""`--shard K/N`: the split, the reader's ranges, Slurm facts; sharded runs of the CLI, dry and real."""

import random

import orjson
import pytest
from faultproxy import Fault, FaultProxy
from support import generate, interrupt_after, push_command, run_push

from pushagent.documents.chunker import Position
from pushagent.errors import ConfigError
from pushagent.inputs.reader import describe_file, next_line_start, read_lines
from pushagent.inputs.shard import FileRange, Shard, file_ranges, parse_shard, run_key
from pushagent.ops.progress import bytes_done, bytes_total
from pushagent.state.slurm_env import slurm_facts


def read_shard(files, shard):
    """(path, line number, data) of every line a shard reads, the way a push run reads them."""
    seen = []
    for number, (file_index, start, end) in enumerate(file_ranges(files, shard)):
        offset, line = next_line_start(files[file_index], start) if number == 0 else (0, 0)
        seen += [(files[file_index].path, entry.number, entry.data)
                 for entry in read_lines(files[file_index], offset, line, end)]
    return seen


def random_lines(rng, count):
    lines = [b"x" * rng.choice([0, 1, 5, 40, 300]) + b"%d" % n for n in range(count)]
    return [b"" if rng.random() < 0.05 else line for line in lines]


@pytest.mark.parametrize("seed", range(12))
def test_byte_ranges_give_every_line_to_exactly_one_shard_with_its_own_line_number(tmp_path, seed):
    rng = random.Random(seed)
    files = []
    for number in range(rng.choice([1, 2])):
        path = tmp_path / f"part{number}.jsonl"
        body = b"\n".join(random_lines(rng, rng.randint(0, 60)))
        path.write_bytes(body + (b"\n" if rng.random() < 0.7 else b""))
        files.append(describe_file(str(path)))
    whole = read_shard(files, None)
    for count in range(max(3, len(files) + 1), 7):
        parts = [read_shard(files, Shard(index, count)) for index in range(count)]
        assert sorted(line for part in parts for line in part) == sorted(whole)


def test_at_least_n_files_are_split_whole_and_balanced(tmp_path):
    sizes = [50, 10, 40, 30, 20, 60, 5]
    files = []
    for number, size in enumerate(sizes):
        path = tmp_path / f"f{number}.jsonl.gz"
        path.write_bytes(b"x" * size)
        files.append(describe_file(str(path)))
    parts = [file_ranges(files, Shard(index, 3)) for index in range(3)]
    owned = sorted(r.file_index for part in parts for r in part)
    assert owned == list(range(len(sizes)))
    assert all(r.start == 0 and r.end is None for part in parts for r in part)
    loads = [sum(sizes[r.file_index] for r in part) for part in parts]
    assert max(loads) - min(loads) <= max(sizes) and parts == [file_ranges(files, Shard(k, 3)) for k in range(3)]


def test_a_single_gzip_file_cannot_be_split_by_bytes(tmp_path):
    path = generate(tmp_path / "words.jsonl.gz", 10)
    with pytest.raises(ConfigError, match="gzip"):
        file_ranges([describe_file(str(path))], Shard(0, 2))
    assert file_ranges([describe_file(str(path))], Shard(0, 1)) == [FileRange(0, 0, None)]


def test_next_line_start_counts_the_lines_before(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"aa\nbbb\n\ncc\n")
    input_file = describe_file(str(path))
    assert [next_line_start(input_file, offset) for offset in (0, 1, 3, 4, 7, 8, 9, 11)] == [
        (0, 0), (3, 1), (3, 1), (7, 2), (7, 2), (8, 3), (11, 4), (11, 4)]


@pytest.mark.parametrize("text,error", [("1", "K/N"), ("a/b", "K/N"), ("3/3", "0 <= K < N"), ("-1/2", "0 <= K")])
def test_shard_syntax(text, error):
    with pytest.raises(ConfigError, match=error):
        parse_shard(text)


def test_shard_names_and_run_keys():
    assert parse_shard("2/5") == Shard(2, 5) and str(Shard(2, 5)) == "2/5"
    assert run_key("words-abc", None) == "words-abc"
    assert run_key("words-abc", Shard(2, 5)) == "words-abc.shard-2-of-5"


def test_slurm_facts_from_the_environment():
    assert slurm_facts({}) == {}
    facts = slurm_facts({"SLURM_JOB_ID": "12", "SLURM_ARRAY_JOB_ID": "10", "SLURM_ARRAY_TASK_ID": "2",
                         "SLURMD_NODENAME": "cn7", "SLURM_JOB_NAME": "pushagent"})
    assert facts == {"job_id": 12, "array_job_id": 10, "array_task_id": 2, "restart_count": 0, "node": "cn7",
                     "job_name": "pushagent"}
    assert slurm_facts({"SLURM_JOB_ID": "12", "SLURM_RESTART_COUNT": "3"})["restart_count"] == 3


@pytest.mark.parametrize("files", [1, 4])
def test_sharded_dry_runs_send_every_record_once_under_one_batch_id(tmp_path, state_dir, files):
    inputs = [generate(tmp_path / f"words{n}.jsonl", 1_000, start=1_000 * n, seed=n) for n in range(files)]
    ids, batch_ids = [], set()
    for index in range(3):
        out = tmp_path / f"dry{index}"
        code, report, stderr = run_push("http://127.0.0.1:9", "words", state_dir, *inputs,
                                        extra=["--dry-run", str(out), "--shard", f"{index}/3", "--chunk-docs", "300"],
                                        env={"SLURM_JOB_ID": str(40 + index), "SLURM_ARRAY_TASK_ID": str(index)})
        assert code == 0, stderr
        assert report["shard"] == f"{index}/3" and report["slurm"]["array_task_id"] == index
        batch_ids.add(report["batch_id"])
        bodies = [line for body in sorted(out.iterdir()) for line in body.read_bytes().splitlines()]
        ids += [orjson.loads(action)["index"]["_id"] for action in bodies[::2]]
    assert len(batch_ids) == 1
    assert sorted(ids) == [f"w{n:08d}" for n in range(1_000 * files)]


def test_progress_counts_only_the_shards_part(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"x" * 99 + b"\n")
    files = [describe_file(str(path))] * 2
    ranges = file_ranges(files, Shard(1, 4))     # bytes 50-99 of 200, then none of the second file
    assert bytes_total([100, 100], ranges) == 50
    assert [bytes_done([100, 100], Position(0, offset, 0), ranges) for offset in (0, 60, 100)] == [0, 10, 50]
    assert bytes_done([100, 100], Position(1, 0, 0), None) == bytes_total([100, 100]) - 100


def test_an_interrupted_shard_resumes_inside_its_own_range(cluster_url, index, state_dir, tmp_path):
    data = generate(tmp_path / "words.jsonl", 4_000)
    mine = [orjson.loads(line)["ipa_id"] for _, _, line in read_shard([describe_file(str(data))], Shard(1, 2))]
    extra = ["--shard", "1/2", "--chunk-docs", "200"]
    with FaultProxy(cluster_url, plan=lambda request: Fault.delay(0.2) if request.ids else None) as proxy:
        code, first, stderr = interrupt_after(proxy, push_command(proxy.url, index, state_dir, data, extra=extra))
        assert code == 75, stderr
        code, second, stderr = run_push(proxy.url, index, state_dir, data, extra=extra)
        sent = proxy.id_counts()
    assert code == 0, stderr
    assert 0 < first["read"] < len(mine) and second["this_run"]["read"] == len(mine) - first["read"]
    assert sorted(sent) == sorted(mine)
    # The stop lets what is out finish and holds back only chunks after it: the checkpoint passes every
    # answer, and nothing is sent twice.
    assert set(sent.values()) == {1}, {doc_id: n for doc_id, n in sent.items() if n > 1}
    assert (state_dir / "runs" / f"{first['batch_id']}.shard-1-of-2.json").exists()
