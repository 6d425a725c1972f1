"""Click ids made as text (ids.new_id_text) are ULIDs: the creation time in their first 10
characters, 80 random bits in the other 16, never shared with a forked process."""

from __future__ import annotations

import multiprocessing
import os
import time

from hypothesis import given
from hypothesis import strategies as st
from ulid import ULID

from tracker.ids import _CROCKFORD, decode_id, id_int, new_id_text, time_text


@given(st.integers(min_value=0, max_value=2**48 - 1))
def test_the_time_part_is_the_ulid_encoding_of_the_millisecond(ms: int) -> None:
    assert time_text(ms) == str(ULID.from_bytes(ms.to_bytes(6, "big") + bytes(10)))[:10]


def test_new_ids_are_ulids_of_now() -> None:
    before = time.time_ns() // 1_000_000
    text = new_id_text()
    after = time.time_ns() // 1_000_000
    assert len(text) == 26 and ULID.from_str(text).milliseconds in range(before, after + 1)
    assert id_int(text) == int.from_bytes(ULID.from_str(text).bytes, "big")
    assert decode_id(text)[0] == ULID.from_str(text).to_uuid()


def test_every_random_character_takes_every_value() -> None:
    # 80 random bits: 16 characters of 5 bits, each uniform. Over 4096 ids every position
    # shows all 32 digits (a missing one has a chance of about 32 * (31/32) ** 4096).
    ids = [new_id_text() for _ in range(4096)]
    assert len(set(ids)) == len(ids)
    for position in range(10, 26):
        assert {text[position] for text in ids} == set(_CROCKFORD), position


def _child_id(queue: "multiprocessing.Queue[str]") -> None:
    queue.put(new_id_text())


def test_a_forked_process_never_repeats_its_parents_ids() -> None:
    new_id_text()  # the parent holds random digits not handed out yet
    context = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[str] = context.Queue()
    child = context.Process(target=_child_id, args=(queue,))
    child.start()
    child_id = queue.get(timeout=30)
    child.join(timeout=30)
    assert child_id[10:] != new_id_text()[10:]
    assert os.getpid() != child.pid
