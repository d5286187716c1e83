"""A run's workspace on its own: staged parts, unique contacts (first seen wins), their states and notes,
chunking in input order, and cleanup."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import pytest

from cleanlist.run.workspace import KEY, META_COLUMNS, REJECT, REJECT_CODE, ROW, RunWorkspace, StagedContact
from cleanlist.vocab import ContactState


def payload(key: str, company: str = "acme.example") -> dict[str, str]:
    first, last = key.split("-", 1) if "-" in key else (key, "Lee")
    return {"first_name": first, "last_name": last, "company_domain": company}


def stage(
    workspace: RunWorkspace, keys: Sequence[str | None], *, first_row: int = 0, company: str = "acme.example"
) -> pd.DataFrame:
    """Stage one part the way stage_source does: input columns, then the meta columns; one contact per
    valid row (duplicates included: the workspace keeps the first)."""
    frame = pd.DataFrame(
        {
            "Name": [key or "?" for key in keys],
            "Company": [company] * len(keys),
            ROW: list(range(first_row, first_row + len(keys))),
            KEY: list(keys),
            REJECT: [None if key else "missing fields" for key in keys],
            REJECT_CODE: [None if key else "missing_fields" for key in keys],
        }
    )
    contacts = [StagedContact(key, payload(key, company)) for key in keys if key is not None]
    workspace.add_part(frame, contacts)
    return frame


def keys_of(count: int, prefix: str = "k") -> list[str]:
    return [f"{prefix}{i:04d}" for i in range(count)]


def all_keys(workspace: RunWorkspace, state: ContactState, block: int = 5000) -> list[str]:
    return [key for keys in workspace.keys_in_state(state, block=block) for key in keys]


# -- staging ---------------------------------------------------------------------------------------------


def test_parts_come_back_in_order_with_every_row_and_columns_exclude_meta(workspace: RunWorkspace) -> None:
    first = stage(workspace, ["a", None, "b"])
    second = stage(workspace, ["c", "a"], first_row=3)

    parts = list(workspace.parts())
    assert len(parts) == 2
    pd.testing.assert_frame_equal(parts[0], first)
    pd.testing.assert_frame_equal(parts[1], second)
    assert workspace.columns == ["Name", "Company"]
    assert not set(META_COLUMNS) & set(workspace.columns)
    # Parts are files on disk, in the workspace's own directory.
    assert len(list(workspace.root.glob("part-*.parquet"))) == 2


def test_duplicate_keys_keep_the_first_contact_seen_across_and_within_parts(workspace: RunWorkspace) -> None:
    stage(workspace, ["a", "b", "a"], company="first.example")
    stage(workspace, ["b", "c"], first_row=3, company="second.example")

    assert workspace.count() == 3
    assert workspace.counts() == {ContactState.NEW: 3}
    workspace.plan_chunks(10)
    chunk = workspace.chunk(0)
    # Input order of first sight, with the payload of the first sighting.
    assert [c.key for c in chunk] == ["a", "b", "c"]
    assert {c.key: c.payload["company_domain"] for c in chunk} == {
        "a": "first.example",
        "b": "first.example",
        "c": "second.example",
    }


def test_a_part_without_contacts_stages_its_rows_only(workspace: RunWorkspace) -> None:
    stage(workspace, [None, None])
    assert workspace.count() == 0
    assert workspace.counts() == {}
    assert sum(len(part) for part in workspace.parts()) == 2
    assert workspace.plan_chunks(5) == []


# -- states ----------------------------------------------------------------------------------------------


def test_counts_per_state_follow_every_change(workspace: RunWorkspace) -> None:
    keys = keys_of(10)
    stage(workspace, keys)
    workspace.set_state(keys[:2], ContactState.FRESH)
    workspace.set_state(keys[2:5], ContactState.IN_FLIGHT)
    workspace.set_state(keys[5:6], ContactState.HELD)

    assert workspace.counts() == {
        ContactState.NEW: 4,
        ContactState.FRESH: 2,
        ContactState.IN_FLIGHT: 3,
        ContactState.HELD: 1,
    }
    assert workspace.count(ContactState.NEW) == 4
    assert workspace.count(ContactState.QUARANTINED) == 0
    assert workspace.count() == 10

    workspace.set_state(keys[:2], ContactState.NEW)
    assert workspace.count(ContactState.NEW) == 6
    assert ContactState.FRESH not in workspace.counts()


def test_keys_in_state_are_in_input_order_block_by_block(workspace: RunWorkspace) -> None:
    keys = keys_of(8)
    # Staged out of alphabetical order: input order is the order of first sight, not of the keys.
    staged = list(reversed(keys))
    stage(workspace, staged[:5])
    stage(workspace, staged[5:], first_row=5)
    workspace.set_state([staged[1], staged[6]], ContactState.FRESH)

    blocks = list(workspace.keys_in_state(ContactState.NEW, block=3))
    expected = [key for key in staged if key not in (staged[1], staged[6])]
    assert blocks == [expected[:3], expected[3:6]]
    assert list(workspace.keys_in_state(ContactState.FRESH, block=3)) == [[staged[1], staged[6]]]
    assert list(workspace.keys_in_state(ContactState.ERROR)) == []


def test_keys_in_state_yield_each_key_once_while_the_caller_moves_them(workspace: RunWorkspace) -> None:
    keys = keys_of(7)
    stage(workspace, keys)
    seen: list[str] = []
    # What plan_run does: move each block to another state while iterating.
    for block in workspace.keys_in_state(ContactState.NEW, block=2):
        seen.extend(block)
        workspace.set_state(block[:1], ContactState.FRESH)
    assert seen == keys
    assert workspace.count(ContactState.FRESH) == 4


def test_states_round_trip_with_notes(workspace: RunWorkspace) -> None:
    keys = keys_of(4)
    stage(workspace, keys)
    workspace.set_state(keys[:1], ContactState.ERROR, "chunk failed: 400")
    workspace.set_notes(
        {keys[1]: "refused by the API: bad name", keys[2]: "refused by the API: bad url"},
        ContactState.QUARANTINED,
    )

    assert workspace.states([*keys, "unknown", keys[0]]) == {
        keys[0]: (ContactState.ERROR, "chunk failed: 400"),
        keys[1]: (ContactState.QUARANTINED, "refused by the API: bad name"),
        keys[2]: (ContactState.QUARANTINED, "refused by the API: bad url"),
        keys[3]: (ContactState.NEW, None),
    }
    # A later state without a note clears the old note.
    workspace.set_state(keys[:1], ContactState.NOT_SUBMITTED)
    assert workspace.states(keys[:1]) == {keys[0]: (ContactState.NOT_SUBMITTED, None)}


def test_states_of_many_keys_span_several_queries(workspace: RunWorkspace) -> None:
    keys = keys_of(1234)
    stage(workspace, keys)
    workspace.set_state(keys[1000:], ContactState.ACCEPTED)
    states = workspace.states(keys)
    assert len(states) == 1234
    assert sum(1 for state, _ in states.values() if state is ContactState.ACCEPTED) == 234


# -- chunks ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("contacts", "chunk_size"), [(10, 5), (11, 5), (45, 2), (3, 250), (250, 250)])
def test_plan_chunks_cut_new_contacts_in_input_order(
    workspace: RunWorkspace, contacts: int, chunk_size: int
) -> None:
    keys = keys_of(contacts)
    stage(workspace, keys)
    chunks = workspace.plan_chunks(chunk_size)

    assert chunks == list(range(-(-contacts // chunk_size)))
    sizes = [len(workspace.chunk_keys(n)) for n in chunks]
    assert all(size <= chunk_size for size in sizes)
    assert all(size == chunk_size for size in sizes[:-1])
    assert [key for n in chunks for key in workspace.chunk_keys(n)] == keys
    assert workspace.counts() == {ContactState.PLANNED: contacts}


def test_plan_chunks_leave_contacts_that_are_not_new_out(workspace: RunWorkspace) -> None:
    keys = keys_of(9)
    stage(workspace, keys)
    workspace.set_state(keys[0:3], ContactState.FRESH)
    workspace.set_state(keys[7:8], ContactState.IN_FLIGHT)

    chunks = workspace.plan_chunks(2)
    assert chunks == [0, 1, 2]
    assert [workspace.chunk_keys(n) for n in chunks] == [keys[3:5], keys[5:7], keys[8:9]]
    assert workspace.counts() == {ContactState.PLANNED: 5, ContactState.FRESH: 3, ContactState.IN_FLIGHT: 1}
    assert workspace.chunk_keys(3) == []


def test_chunk_returns_only_contacts_still_planned(workspace: RunWorkspace) -> None:
    keys = keys_of(5)
    stage(workspace, keys)
    workspace.plan_chunks(5)
    workspace.set_state(keys[1:2], ContactState.ACCEPTED)
    workspace.set_notes({keys[3]: "refused by the API: nope"}, ContactState.QUARANTINED)

    chunk = workspace.chunk(0)
    assert [c.key for c in chunk] == [keys[0], keys[2], keys[4]]
    assert chunk[0] == StagedContact(keys[0], payload(keys[0]))
    # chunk_keys still names every contact the chunk was planned with.
    assert workspace.chunk_keys(0) == keys
    assert workspace.chunk(1) == []


# -- cleanup ---------------------------------------------------------------------------------------------


def test_cleanup_removes_the_workspace_directory(tmp_path: Path) -> None:
    workspace = RunWorkspace(tmp_path)
    assert workspace.root.parent == tmp_path
    stage(workspace, ["a", "b"])
    assert (workspace.root / "contacts.db").exists()
    assert any(workspace.root.glob("part-*.parquet"))

    workspace.cleanup()
    assert not workspace.root.exists()
    assert list(tmp_path.iterdir()) == []
    workspace.cleanup()  # twice is harmless


def test_two_workspaces_do_not_share_anything(tmp_path: Path) -> None:
    one, two = RunWorkspace(tmp_path), RunWorkspace(tmp_path)
    try:
        assert one.root != two.root
        stage(one, ["a"])
        assert two.count() == 0
        assert list(two.parts()) == []
    finally:
        one.cleanup()
        two.cleanup()
