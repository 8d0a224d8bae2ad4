"""push --incremental knows the input lines an earlier batch built byte for byte (their digest is in its table
of documents): it makes their documents without parsing them, and builds one only when it must be sent."""

import dataclasses
import threading
import types

import orjson
import pytest
from support import generate

from pushagent.documents.builder import Builder, BuildSettings, line_digest
from pushagent.documents.chunker import Position
from pushagent.runs.incremental import ChangeProbe
from pushagent.state.doctable import DocTable, table_path
from pushagent.state.records import SyncStateStore

pytestmark = pytest.mark.fast
OLD = BuildSettings(id_field="ipa_id", default_index="words", index_field=None, allowed_indices=frozenset({"words"}),
                    batch_version=1_767_225_600_000, batch_time_iso="2026-01-01T00:00:00.000Z",
                    embedding_version="v1", batch_id="old")
NEW = dataclasses.replace(OLD, batch_version=1_767_312_000_000, batch_time_iso="2026-01-02T00:00:00.000Z",
                          batch_id="new")


def earlier_batch(state_dir, lines, settings=OLD) -> None:
    """What a push of `lines` under `settings` leaves: its table of documents and its sync-state record."""
    builder = Builder(settings)
    table = DocTable(table_path(state_dir, settings.batch_id))
    table.add([builder.build(raw, "old.jsonl", number) for number, raw in enumerate(lines, 1)])
    table.close()
    build = dataclasses.asdict(settings)
    build["allowed_indices"] = sorted(settings.allowed_indices)
    SyncStateStore(state_dir).save({"batch_id": settings.batch_id, "embedding_version": settings.embedding_version,
                                    "batch_time": settings.batch_time_iso, "build": build})


def recognised(state_dir, lines, settings=NEW) -> list:
    config = types.SimpleNamespace(state_path=state_dir)
    probe = ChangeProbe(config, None, settings, None, threading.Event(), None)
    try:
        given = [(raw, "new.jsonl", number, Position(0, 0, number)) for number, raw in enumerate(lines, 1)]
        return [item for item, *_ in probe.recognise(iter(given), Builder(settings))]
    finally:
        probe.close()


@pytest.fixture
def lines(tmp_path) -> list:
    return generate(tmp_path / "old.jsonl", 50).read_bytes().splitlines(keepends=True)


def test_lines_built_before_are_known_and_complete_to_what_build_makes(tmp_path, lines):
    earlier_batch(tmp_path, lines)
    changed = orjson.loads(lines[7])
    changed["word"] = "changed"
    regenerated = [*lines[:7], orjson.dumps(changed) + b"\n", *lines[8:]]
    items = recognised(tmp_path, regenerated)
    assert [isinstance(item, bytes) for item in items] == [number == 7 for number in range(50)]
    builder = Builder(NEW)
    for number, item in enumerate(items):
        if number == 7:
            continue
        built = builder.build(regenerated[number], "new.jsonl", number + 1)
        assert (item.doc_id, item.checksum, item.digest, item.version, item.raw, item.source) == \
            (built.doc_id, built.checksum, line_digest(regenerated[number]), NEW.batch_version, regenerated[number],
             None)
        assert item.action == b""      # built only if it must be sent: most known lines never are
        complete = builder.complete(item)
        assert (complete.action, complete.source, complete.digest) == (built.action, built.source, built.digest)


def test_a_later_line_of_a_repeated_id_stays_one_when_built(tmp_path, lines):
    earlier_batch(tmp_path, lines)
    known = recognised(tmp_path, lines[:1])[0]
    known.win_equal_version()
    assert b'"external_gte"' in Builder(NEW).complete(known).action


def test_no_line_is_known_from_a_batch_built_under_other_settings(tmp_path, lines):
    earlier_batch(tmp_path, lines, dataclasses.replace(OLD, checksum_field="other_checksum"))
    assert all(isinstance(item, bytes) for item in recognised(tmp_path, lines))


def test_a_line_that_names_another_id_first_is_not_mistaken_for_it(tmp_path, lines):
    """The id is guessed from the bytes; only the digest of the very line makes it known."""
    earlier_batch(tmp_path, lines)
    record = orjson.loads(lines[3])
    decoy = b'{"note":{"ipa_id":"w00000009"},' + orjson.dumps(record)[1:] + b"\n"
    assert recognised(tmp_path, [decoy]) == [decoy]
