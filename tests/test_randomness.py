"""The identifier pool: kernel CSPRNG bytes read 4 KiB at a time, each handed out once."""

from __future__ import annotations

import os
import uuid

import pytest

from sipis import randomness
from sipis.sip.message import new_branch, new_call_id, new_tag


def test_identifiers_come_from_one_read_per_pool_and_never_repeat(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Hundreds of tags, branches and Call-IDs cost one getrandom() per 4 KiB (it was one
    each), and every byte is handed out once: no two identifiers share their bits."""
    reads: list[int] = []
    real = os.urandom

    def counting(n: int) -> bytes:
        reads.append(n)
        return real(n)

    monkeypatch.setattr(randomness.os, "urandom", counting)
    randomness._POOL.forget()
    made = [new_tag() for _ in range(100)] + [new_branch() for _ in range(100)] \
        + [new_call_id() for _ in range(100)]
    drawn = 100 * 8 + 100 * 12 + 100 * 16  # 3,600 bytes
    assert reads == [randomness.POOL_SIZE] and drawn <= randomness.POOL_SIZE
    assert len(set(made)) == 300
    assert all(len(t) == 16 for t in made[:100])
    assert all(b.startswith("z9hG4bK") for b in made[100:200])


def test_a_draw_past_the_pool_refills_it_and_big_draws_work() -> None:
    randomness._POOL.forget()
    first = randomness.token_bytes(randomness.POOL_SIZE - 3)
    across = randomness.token_bytes(8)  # more than is left: a fresh pool
    assert len(across) == 8 and across not in first
    assert len(randomness.token_bytes(3 * randomness.POOL_SIZE)) == 3 * randomness.POOL_SIZE
    assert len(randomness.token_hex(12)) == 24


def test_uuid4_is_a_version_4_uuid() -> None:
    made = {randomness.uuid4() for _ in range(200)}
    assert len(made) == 200
    for text in made:
        parsed = uuid.UUID(text)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122 and str(parsed) == text


def test_a_forked_child_does_not_hand_out_the_parents_bytes() -> None:
    """After fork the child's pool is empty: what it draws next differs from what the
    parent draws next from the pool they shared."""
    randomness._POOL.forget()
    randomness.token_bytes(8)  # the pool is full, 8 bytes used
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next 16 bytes, exit at once
        try:
            os.write(write_end, randomness.token_bytes(16))
        finally:
            os._exit(0)
    os.close(write_end)
    child = os.read(read_end, 16)
    os.close(read_end)
    os.waitpid(pid, 0)
    assert len(child) == 16 and child != randomness.token_bytes(16)
