"""Merge planning: overlays, conflicts and their resolution."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cowd import _merge
from cowd._logfile import Batch, Record
from cowd.protocol import Conflict


def overlay(session, *writes):
    o = _merge.Overlay(session)
    for seq, offset, data in writes:
        o.write(offset, data, seq)
    return o


def apply(base: bytes, segments) -> bytes:
    out = bytearray(base)
    for seg in segments:
        out[seg.start : seg.end] = seg.data
    return bytes(out)


def test_a_session_overwriting_itself_is_not_a_conflict():
    a = overlay("a", (1, 0, b"aaaa"), (3, 2, b"AA"))

    assert _merge.find_conflicts([a]) == []
    assert apply(b"........", _merge.plan([a], "fail")) == b"aaAA...."


def test_different_bytes_at_one_offset_conflict_and_are_named():
    a = overlay("a", (1, 10, b"xyz"))
    b = overlay("b", (2, 11, b"Q"))

    with pytest.raises(Conflict) as caught:
        _merge.plan([a, b], "fail")

    assert caught.value.data["conflicts"] == [
        {"start": 11, "end": 12, "sessions": ["a", "b"]}
    ]
    assert "11-12" in str(caught.value)


def test_equal_bytes_from_two_sessions_do_not_conflict():
    a = overlay("a", (1, 0, b"same"))
    b = overlay("b", (2, 0, b"same"))

    assert _merge.find_conflicts([a, b]) == []


@pytest.mark.parametrize(("policy", "winner"), [("last", b"B"), ("first", b"A")])
def test_policies_resolve_by_commit_order(policy, winner):
    a = overlay("a", (1, 0, b"A"))
    b = overlay("b", (2, 0, b"B"))

    assert apply(b"-", _merge.plan([a, b], policy)) == winner


def test_replay_applies_batches_in_commit_order_not_file_order():
    batches = [
        Batch(5, 0, 0, [Record(0, b"late")]),
        Batch(2, 0, 0, [Record(0, b"EARLY")]),
    ]

    assert apply(b"......", _merge.replay("s", batches).segments()) == b"lateY."


writes = st.lists(
    st.tuples(st.integers(0, 40), st.binary(min_size=1, max_size=8)), max_size=6
)


@given(st.lists(writes, min_size=1, max_size=4))
def test_merge_matches_a_byte_by_byte_model(sessions):
    base = bytes(48)
    seq = 0
    overlays, model = [], {}
    for index, session_writes in enumerate(sessions):
        o = _merge.Overlay(str(index))
        for offset, data in session_writes:
            seq += 1
            o.write(offset, data, seq)
            for i, byte in enumerate(data):
                model.setdefault(offset + i, {})[str(index)] = (seq, byte)
        overlays.append(o)

    conflicting = {
        pos for pos, by in model.items() if len({b for _, b in by.values()}) > 1
    }
    found = _merge.find_conflicts(overlays)
    assert {p for c in found for p in range(c.start, c.end)} == conflicting

    expected = bytearray(base)
    for pos, by in model.items():
        expected[pos] = max(by.values())[1]
    assert apply(base, _merge.plan(overlays, "last")) == bytes(expected)
