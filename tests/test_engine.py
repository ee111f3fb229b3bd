"""Tokenizer, chat template, sampling, and the engine's generate/stream on a tiny packed model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from support import CountingSource

import fmoe
from fmoe.errors import FmoeError
from fmoe.runtime.chat import ChatTemplate, stop_token_ids
from fmoe.runtime.diagnostics import build_packed, relative_error
from fmoe.runtime.engine import Model
from fmoe.runtime.sampling import Sampler, SamplingParams, StopStrings, filtered_distribution
from fmoe.runtime.tokenizer import Tokenizer

MULTIBYTE = "naïve café — 世界 🙂, Ωmega ∑ ok"


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_packed(tmp_path_factory.mktemp("engine"), seed=1)[1]


@pytest.fixture(scope="module")
def model(packed: Path) -> Model:
    return fmoe.load(packed)


# ---- tokenizer ----------------------------------------------------------------------------------
def test_tokenizer_round_trip_and_incremental_decode(packed: Path) -> None:
    tok = Tokenizer(packed)
    ids = tok.encode(MULTIBYTE)
    assert tok.decode(ids) == MULTIBYTE
    # byte-level BPE splits some of these characters over several tokens
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    decoder = tok.stream_decoder()
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    assert "".join(pieces) == MULTIBYTE
    assert all("\ufffd" not in p for p in pieces)  # never a half character on screen
    assert tok.token_id("<|im_end|>") is not None and tok.token_id("<no such token>") is None
    special = tok.encode("<|im_start|>user")
    assert special[0] == tok.token_id("<|im_start|>")


def test_stream_decoder_flushes_an_incomplete_character(packed: Path) -> None:
    tok = Tokenizer(packed)
    ids = tok.encode("🙂")
    assert len(ids) > 1
    decoder = tok.stream_decoder()
    assert [decoder.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert decoder.flush() == "\ufffd"  # the truncated character, shown at the end


# ---- chat template ------------------------------------------------------------------------------
def test_chat_render_with_and_without_thinking(packed: Path) -> None:
    tmpl = ChatTemplate.from_dir(packed)
    assert tmpl is not None
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi ü"}]
    on = tmpl.render(msgs)
    off = tmpl.render(msgs, enable_thinking=False)
    assert on.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi ü<|im_end|>\n")
    assert on.endswith("<|im_start|>assistant\n<think>\n")
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not tmpl.render(msgs, add_generation_prompt=False).endswith("assistant\n")


def test_chat_template_is_sandboxed_and_errors_are_one_line(tmp_path: Path) -> None:
    evil = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(FmoeError, match=r"rendering failed \(.*unsafe"):
        evil.render([{"role": "user", "content": "x"}])
    with pytest.raises(FmoeError, match="chat template: no system"):
        ChatTemplate("{{ raise_exception('no system') }}").render([])
    with pytest.raises(FmoeError, match="not a valid jinja2 template"):
        ChatTemplate("{% if %}")


def test_stop_tokens(packed: Path, model: Model) -> None:
    tok = Tokenizer(packed)
    stops = stop_token_ids(model.config, tok, packed)
    gen = json.loads((packed / "generation_config.json").read_text())["eos_token_id"]
    assert set(model.config.eos_token_ids) <= stops
    assert set(gen if isinstance(gen, list) else [gen]) <= stops
    assert tok.token_id("<|im_end|>") in stops
    assert model.stop_ids == stops


# ---- sampling -----------------------------------------------------------------------------------
def test_greedy_and_top_k_1_are_argmax(rng: np.random.Generator) -> None:
    for _ in range(20):
        logits = rng.standard_normal(500).astype(np.float32) * 3
        assert Sampler(SamplingParams())(logits) == int(np.argmax(logits))
        assert Sampler(SamplingParams(temperature=1.5, top_k=1, seed=1))(logits) == int(np.argmax(logits))


def test_filtered_distribution_matches_numpy(rng: np.random.Generator) -> None:
    logits = rng.standard_normal(300) * 2
    t, k, p = 0.7, 40, 0.8
    z = logits / t
    keep_k = np.argsort(-z)[:k]
    probs = np.exp(z[keep_k] - z[keep_k].max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    n = int(np.searchsorted(np.cumsum(probs[order]), p) + 1)  # smallest nucleus reaching p
    nucleus = keep_k[order[:n]]
    want = np.zeros(300)
    want[nucleus] = np.exp(z[nucleus] - z[nucleus].max())
    want /= want.sum()
    got = filtered_distribution(logits, t, k, p)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    assert np.count_nonzero(got) == n
    # plain temperature: the full softmax
    full = np.exp(z - z.max())
    np.testing.assert_allclose(filtered_distribution(logits, t), full / full.sum(), rtol=1e-12)


def test_seeded_sampling_is_reproducible_and_follows_the_distribution() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    draw = lambda seed: [Sampler(SamplingParams(temperature=1.0, seed=seed))(logits) for _ in range(1)]  # noqa: E731
    s1 = Sampler(SamplingParams(temperature=1.0, seed=7))
    s2 = Sampler(SamplingParams(temperature=1.0, seed=7))
    a = [s1(logits) for _ in range(4000)]
    assert a == [s2(logits) for _ in range(4000)]
    freq = np.bincount(a, minlength=4) / len(a)
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    nucleus = Sampler(SamplingParams(temperature=1.0, top_p=0.6, seed=3))
    assert set(nucleus(logits) for _ in range(500)) == {0, 1}
    assert draw(1) == draw(1)


def test_sampling_params_are_checked() -> None:
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -2}):
        with pytest.raises(FmoeError):
            SamplingParams(**bad)


def test_stop_strings_hold_back_prefixes() -> None:
    s = StopStrings(["</end>", "STOP"])
    assert s.find("abc</end>x") == 3 and s.find("no") == -1
    assert s.safe_length("hello </e") == len("hello ")
    assert s.safe_length("hello ST") == len("hello ")
    assert s.safe_length("hello") == 5


# ---- engine -------------------------------------------------------------------------------------
def test_greedy_generation_equals_prefill_argmax(model: Model) -> None:
    prompt = model.encode_prompt("Hello there", chat=False)
    model.stop_ids, saved = set(), model.stop_ids
    try:
        result = model.generate(prompt, max_tokens=5)
    finally:
        model.stop_ids = saved
    seq = list(prompt)
    for token in result.token_ids:  # decode with state == a fresh prefill of the longer sequence
        assert int(np.argmax(model.logits(seq)[-1])) == token
        seq.append(token)
    assert result.prompt_tokens == len(prompt) and result.finish_reason == "length"
    assert len(result.token_ids) == 5


def test_generate_stops_at_max_tokens_stop_token_and_stop_string(model: Model) -> None:
    saved = model.stop_ids
    model.stop_ids = set()
    try:
        full = model.generate("Tell me a story", max_tokens=8, thinking=False)
        assert len(full.token_ids) == 8 and full.finish_reason == "length"
        assert full.text == model.tokenizer.decode(full.token_ids)
        # a stop token: the first occurrence of the 5th generated token ends generation before it
        stop_tok = full.token_ids[4]
        cut = full.token_ids.index(stop_tok)
        model.stop_ids = {stop_tok}
        r = model.generate("Tell me a story", max_tokens=8, thinking=False)
        assert r.token_ids == full.token_ids[:cut] and r.finish_reason == "stop"
        model.stop_ids = set()
        # a stop string taken from the middle of the full text
        text = full.text
        needle = text[len(text) // 2 : len(text) // 2 + 3]
        pieces = list(model.stream("Tell me a story", 8, stop=[needle], thinking=False))
        r = model.last_result
        assert r.text == text[: text.find(needle)] == "".join(pieces)
        assert r.finish_reason == "stop"
        assert needle not in "".join(pieces)
    finally:
        model.stop_ids = saved


def test_stream_pieces_and_timing(model: Model) -> None:
    pieces = list(model.stream("Hi", 8, chat=False))
    r = model.last_result
    assert "".join(pieces) == r.text
    t = r.timing
    assert t["prefill"]["tokens"] == r.prompt_tokens
    assert t["decode"]["tokens"] == len(r.token_ids) - 1 or r.finish_reason == "stop"
    assert t["prefill"]["tokens_per_second"] > 0
    phases = t["decode"]["profile"]["phases"] if t["decode"]["tokens"] else t["prefill"]["profile"]["phases"]
    assert set(phases) == {"dense", "mixer", "routing", "expert_io", "expert_compute"}
    reads = t["prefill"]["experts"]["reads"] + t["decode"]["experts"]["reads"]
    assert reads > 0
    model.stop_ids, saved = set(), model.stop_ids
    try:
        pieces = list(model.stream("Hi", 8, chat=False))
    finally:
        model.stop_ids = saved
    r = model.last_result
    assert "".join(pieces) == r.text == model.tokenizer.decode(r.token_ids)
    assert r.finish_reason == "length" and len(r.token_ids) == 8
    t = r.timing
    assert t["generated_tokens"] == 8 and t["prompt_tokens"] == r.prompt_tokens
    assert t["decode"]["tokens"] == 7  # the 8th token is sampled, never fed back
    assert t["decode"]["experts"]["reads"] + t["decode"]["experts"]["hits"] >= 7 * model.config.num_hidden_layers


def test_seeded_generation_is_reproducible(model: Model) -> None:
    opts = dict(max_tokens=6, temperature=1.0, top_p=0.95, chat=False)
    a = model.generate("Once", seed=5, **opts).token_ids
    assert model.generate("Once", seed=5, **opts).token_ids == a
    assert model.generate("Once", seed=6, **opts).token_ids != a


def test_logits_shape_and_context_limit(model: Model) -> None:
    logits = model.logits([1, 2, 3, 4])
    assert logits.shape == (4, model.config.vocab_size) and logits.dtype == np.float32
    np.testing.assert_array_equal(model.logits([1, 2, 3, 4]), logits)  # fresh state each call
    saved = model.max_context
    model.max_context = 5
    try:
        with pytest.raises(FmoeError, match="6 tokens exceed the context limit of 5"):
            model.logits([1] * 6)
        with pytest.raises(FmoeError, match="context limit"):
            model.generate(list(range(1, 7)), max_tokens=2)
        r = model.generate([1, 2, 3], max_tokens=50)  # decode stops when the context is full
        assert r.prompt_tokens + len(r.token_ids) <= 6
        model.stop_ids, saved_stops = set(), model.stop_ids
        try:
            r = model.generate([1, 2, 3], max_tokens=50)
        finally:
            model.stop_ids = saved_stops
        assert r.prompt_tokens + len(r.token_ids) == 6 and r.finish_reason == "length"
    finally:
        model.max_context = saved
    with pytest.raises(FmoeError, match="empty"):
        model.logits([])


# ---- loader errors ------------------------------------------------------------------------------
def test_loader_errors(packed: Path, tmp_path: Path) -> None:
    with pytest.raises(FmoeError, match="no such directory"):
        fmoe.load(tmp_path / "nope")
    with pytest.raises(FmoeError, match=r"not a packed fmoe directory.*fmoe extract"):
        fmoe.load(tmp_path)
    with pytest.raises(FmoeError, match=r"--k 0: must be between 1 and 15"):
        fmoe.load(packed, k=0)
    with pytest.raises(FmoeError, match=r"--k 16: must be between 1 and 15"):
        fmoe.load(packed, k=16)
    with pytest.raises(FmoeError, match=r"no 2-bit experts.*fmoe repack"):
        fmoe.load(packed, bits=2)
    with pytest.raises(FmoeError, match="--bits 3"):
        fmoe.load(packed, bits=3)
    with pytest.raises(FmoeError, match="unknown backend"):
        fmoe.load(packed, backend="tpu")
    broken = Path(shutil.copytree(packed, tmp_path / "broken"))
    (broken / "model_weights.json").unlink()
    with pytest.raises(FmoeError, match=r"incomplete, no model_weights\.json.*fmoe extract"):
        fmoe.load(broken)


def test_reduced_k_runs(packed: Path, model: Model) -> None:
    m = fmoe.load(packed, k=1)
    r = m.generate([5, 6, 7], max_tokens=3)
    assert m.k == 1 and r.timing["k"] == 1
    assert r.timing["prefill"]["experts"]["hits"] + r.timing["prefill"]["experts"]["misses"] <= 3 * 8
    m.network.experts = counting = CountingSource(m.network.experts)
    one = m.logits([5, 6, 7])
    assert [layer for layer, _ in counting.calls] == list(range(m.config.num_hidden_layers))
    assert all(1 <= len(ids) <= 3 for _, ids in counting.calls)  # one expert per token and layer
    assert model.k == m.config.num_experts_per_tok > 1
    assert relative_error(one, model.logits([5, 6, 7])).max() > 1e-3  # fewer experts, other logits
    m.close()


def test_last_only_logits_equal_the_last_row_and_small_fetch_chunks_change_nothing(model: Model) -> None:
    ids = model.tokenizer.encode("a longer prompt so that the prefill routes to many experts")
    full = model.logits(ids)
    last = model.network.forward(ids, model.network.new_state(), last_only=True)
    assert last.shape == (1, full.shape[1])
    np.testing.assert_allclose(last[0], full[-1], rtol=1e-5, atol=1e-5)  # T=1 kernel path vs batched
    saved = model.network.fetch_chunk
    try:
        model.network.fetch_chunk = 1  # one expert per fetch: same result, bounded buffers
        np.testing.assert_allclose(model.logits(ids), full, rtol=1e-5, atol=1e-5)
    finally:
        model.network.fetch_chunk = saved
