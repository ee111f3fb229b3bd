"""The prefix cache: cuts at message ends decided from the prompt alone, an LRU within a byte
budget, and reuse that never changes an answer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import fmoe
from fmoe.runtime.diagnostics import build_packed
from fmoe.runtime.engine.engine import Engine
from fmoe.runtime.engine.prefix_cache import PrefixCache, message_cuts
from fmoe.runtime.engine.session import Session
from fmoe.runtime.state import SequenceState

END = [7, 8]


def test_message_cuts_are_decided_left_to_right() -> None:
    ids = [1] * 20 + END + [2] * 3 + END + [3] * 30 + END + [4] * 5
    assert message_cuts(ids, END, min_segment=16) == [22, 59]  # the short second message joins the third
    assert message_cuts(ids, END, min_segment=0) == [22, 27, 59]
    longer = ids + [5] * 40 + END + [6]
    assert message_cuts(longer, END, min_segment=16)[:2] == [22, 59]  # a continuation is cut alike
    assert message_cuts([1, 2, *END], END, min_segment=0) == []  # never at the very end
    assert message_cuts(ids, [], min_segment=0) == []


class _State:
    def __init__(self, nbytes: int) -> None:
        self.nbytes, self.position = nbytes, 0

    def copy(self) -> _State:
        return _State(self.nbytes)


def _session(ids: list[int], nbytes: int) -> Session:
    return Session(_State(nbytes), list(ids))  # type: ignore[arg-type]


def test_lru_within_the_byte_budget() -> None:
    cache = PrefixCache(budget_bytes=1000)
    a, b, c = [1, 2, 3], [1, 2, 3, 4, 5], [9, 9]
    assert cache.store(_session(a, 300)) and cache.store(_session(b, 300))
    assert cache.lookup([1, 2, 3, 4, 5, 6], [3, 5])[0] == 5  # the longest saved prefix
    assert cache.lookup([1, 2, 3, 7], [3])[0] == 3
    assert cache.lookup([1, 2, 4], [2]) == (0, None)
    cache.lookup([*a, 0], [3])  # a is now the most recently used
    assert cache.store(_session(c, 400))  # over budget: b (least recently used) goes
    assert cache.contains(a) and cache.contains(c) and not cache.contains(b)
    assert cache.nbytes <= 1000 and cache.stats.evicted == 1
    assert not cache.store(_session([5], 2000))  # larger than the whole budget: not kept
    pending = _session([4, 4], 10)
    pending.pending = [3]
    assert not cache.store(pending)  # only fully fed states
    got = cache.lookup([*c, 1], [2])[1]
    assert (
        got is not None
        and got.token_ids == c
        and got.state is not cache._entries[next(reversed(cache._entries))].session.state
    )


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    packed: Path = build_packed(tmp_path_factory.mktemp("prefix"), seed=5)[1]
    with fmoe.load(packed) as e:
        yield e


def test_reuse_gives_bitwise_the_answer_without_cache(engine: Engine) -> None:
    """A request cut at its messages answers the same (bitwise logits, same tokens) whether its first
    segments come from the cache or are computed again."""
    msgs = [{"role": "system", "content": "You are a helpful assistant who is brief and exact."},
            {"role": "user", "content": "What is the capital of France? Answer in one word."}]  # fmt: skip
    ids = engine.tokenizer.encode(engine.chat_template.render(msgs, enable_thinking=False))
    end = [engine.tokenizer.token_id("<|im_end|>"), *engine.tokenizer.encode("\n")]
    cuts = message_cuts(ids, end)
    assert len(cuts) == 2
    cache = PrefixCache(1 << 30)

    def run(cached: int, session: Session | None) -> list[int]:
        s = session or engine.new_session()
        rel = [c - cached for c in cuts if c > cached]
        r = engine.generate(ids[cached:], max_tokens=8, session=s, cuts=rel, on_cut=cache.store, stop_ids=())
        return r.token_ids

    fresh = run(0, None)
    assert len(cache) == 2
    cached, session = cache.lookup(ids, cuts)
    assert cached == cuts[-1] and session is not None
    assert run(cached, session) == fresh
    n, first = cache.lookup([*ids[: cuts[0]], 5, 6], cuts[:1])
    assert n == cuts[0] and first is not None
    s = engine.new_session()
    engine.generate(ids[: cuts[0]], max_tokens=0, session=s)
    a = engine.runner.forward([5, 6], first.state).logits
    b = engine.runner.forward([5, 6], s.state).logits
    np.testing.assert_array_equal(a, b)  # the saved state is the state, bitwise
    assert isinstance(first.state, SequenceState)
