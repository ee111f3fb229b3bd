"""Tokenizer, chat template, sampling, and the engine (generate/stream, sessions, threads, the
loader's checks) on a tiny packed model."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import fmoe
from fmoe.errors import FmoeError
from fmoe.runtime.diagnostics import build_packed, relative_error
from fmoe.runtime.engine.engine import Engine
from fmoe.runtime.text.chat import ChatTemplate, stop_token_ids
from fmoe.runtime.text.sampling import Sampler, SamplingParams, StopStrings, candidates, filtered_distribution
from fmoe.runtime.text.tokenizer import Tokenizer

MULTIBYTE = "naïve café — 世界 🙂, Ωmega ∑ ok"


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_packed(tmp_path_factory.mktemp("engine"), seed=1)[1]


@pytest.fixture(scope="module")
def model(packed: Path) -> Engine:
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


def test_stop_tokens(packed: Path, model: Engine) -> None:
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


@pytest.mark.parametrize(("n", "t", "k", "p"), [(3000, 0.5, 0, 0.9), (3000, 3.0, 0, 0.97), (5000, 1.0, 0, 0.999),
                                               (3000, 0.8, 300, 0.9), (3000, 1.0, 0, 1.0)])  # fmt: skip
def test_the_candidates_are_a_full_sorts_nucleus(n: int, t: float, k: int, p: float, rng: np.random.Generator) -> None:
    """The nucleus looked for among the most likely tokens first (64, then 16 times more) is the one a
    sort of the whole vocabulary finds, ties in id order included (rounded logits make many), also
    where it needs thousands of tokens; and a draw is Generator.choice's over the full distribution
    with the same seed."""
    logits = np.round(rng.standard_normal(n) * 2, 1)  # ties
    z = logits / t
    if k:
        z = np.where(z >= np.sort(z)[-k], z, -np.inf)
    full = np.exp(z - z.max())
    full /= full.sum()
    order = np.argsort(-full, kind="stable")
    nucleus = order[(np.cumsum(full[order]) - full[order]) < p]
    want = np.zeros(n)
    want[nucleus] = full[nucleus] / full[nucleus].sum()
    ids, probs = candidates(logits, t, k, p)
    np.testing.assert_array_equal(ids, np.sort(nucleus))
    np.testing.assert_allclose(probs, want[ids], rtol=1e-12)
    seed = int(rng.integers(1 << 32))
    sampler, reference = Sampler(SamplingParams(t, k, p, seed)), np.random.default_rng(seed)
    dist = filtered_distribution(logits, t, k, p)
    assert [sampler(logits) for _ in range(50)] == [int(reference.choice(n, p=dist)) for _ in range(50)]


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
def test_greedy_generation_equals_prefill_argmax(model: Engine) -> None:
    prompt = model.encode_prompt("Hello there", chat=False)
    result = model.generate(prompt, max_tokens=5, stop_ids=())
    seq = list(prompt)
    for token in result.token_ids:  # decode with state == a fresh prefill of the longer sequence
        assert int(np.argmax(model.logits(seq)[-1])) == token
        seq.append(token)
    assert result.prompt_tokens == len(prompt) and result.finish_reason == "length"
    assert len(result.token_ids) == 5 and result.cached_tokens == 0


def test_non_finite_logits_are_a_one_line_error(model: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Logits holding NaN (weights with NaN/Inf) are never picked from: greedy (the backend's pick
    reports them), sampled, or read whole."""
    net = model.runner.network
    head = net.head
    monkeypatch.setattr(net, "head", lambda h, *args, **kw: head(h, *args, **kw) * np.float32("nan"))
    prompt = model.encode_prompt("Hello there", chat=False)
    for temperature in (0.0, 0.7):
        with pytest.raises(FmoeError, match=r"non-finite logits .* `fmoe verify --deep`"):
            model.generate(prompt, max_tokens=2, temperature=temperature)
    with pytest.raises(FmoeError, match="non-finite logits"):
        model.logits(prompt)


def test_generate_stops_at_max_tokens_stop_token_and_stop_string(model: Engine) -> None:
    full = model.generate("Tell me a story", max_tokens=8, thinking=False, stop_ids=())
    assert len(full.token_ids) == 8 and full.finish_reason == "length"
    assert full.text == model.tokenizer.decode(full.token_ids)
    # a stop token: the first occurrence of the 5th generated token ends generation before it
    stop_tok = full.token_ids[4]
    cut = full.token_ids.index(stop_tok)
    r = model.generate("Tell me a story", max_tokens=8, thinking=False, stop_ids={stop_tok})
    assert r.token_ids == full.token_ids[:cut] and r.finish_reason == "stop"
    # a stop string taken from the middle of the full text
    text = full.text
    needle = text[len(text) // 2 : len(text) // 2 + 3]
    chunks = list(model.stream("Tell me a story", 8, stop=[needle], thinking=False, stop_ids=()))
    r = chunks[-1].result
    assert r.text == text[: text.find(needle)] == "".join(c.text for c in chunks)
    assert r.finish_reason == "stop" == chunks[-1].finish_reason
    assert all(c.result is None and c.finish_reason is None for c in chunks[:-1])
    assert needle not in "".join(c.text for c in chunks)


def test_stream_chunks_and_timing(model: Engine) -> None:
    chunks = list(model.stream("Hi", 8, chat=False, stop_ids=()))
    r = chunks[-1].result
    assert "".join(c.text for c in chunks) == r.text == model.tokenizer.decode(r.token_ids)
    assert [t for c in chunks for t in c.token_ids] == r.token_ids  # every id in exactly one chunk
    assert r.finish_reason == "length" and len(r.token_ids) == 8
    t = r.timing
    assert t.generated_tokens == 8 and t.prompt_tokens == r.prompt_tokens == t.prefill.tokens
    assert t.prefill.passes == 1
    assert t.decode.tokens == t.decode.passes == 7  # the 8th token is sampled, never fed back
    layers = model.config.num_hidden_layers
    assert int(t.decode.experts.requested.sum()) >= 7 * layers  # at least one expert per layer and token
    assert t.decode.experts.tier("disk")["served"] == int(t.decode.experts.requested.sum())  # no cache here
    assert (t.decode.profile.seconds[:layers] > 0).all()  # every layer and phase timed
    assert t.decode.profile.total <= t.decode.seconds
    doc = json.loads(json.dumps(t.to_dict()))  # JSON-ready
    assert doc["decode"]["tokens"] == 7 and len(doc["prefill"]["profile"]["layers"]) == layers


def test_seeded_generation_is_reproducible(model: Engine) -> None:
    opts = dict(max_tokens=6, temperature=1.0, top_p=0.95, chat=False)
    a = model.generate("Once", seed=5, **opts).token_ids
    assert model.generate("Once", seed=5, **opts).token_ids == a
    assert model.generate("Once", seed=6, **opts).token_ids != a


def test_logits_shape_and_context_limit(packed: Path, model: Engine) -> None:
    logits = model.logits([1, 2, 3, 4])
    assert logits.shape == (4, model.config.vocab_size) and logits.dtype == np.float32
    np.testing.assert_array_equal(model.logits([1, 2, 3, 4]), logits)  # fresh state each call
    with pytest.raises(FmoeError, match="empty"):
        model.logits([])
    with fmoe.load(packed, max_context=5) as small:
        with pytest.raises(FmoeError, match="6 tokens exceed the context limit of 5"):
            small.logits([1] * 6)
        with pytest.raises(FmoeError, match="context limit"):
            small.generate(list(range(1, 7)), max_tokens=2)
        r = small.generate([1, 2, 3], max_tokens=50)  # decode stops when the context is full
        assert r.prompt_tokens + len(r.token_ids) <= 6
        r = small.generate([1, 2, 3], max_tokens=50, stop_ids=())
        assert r.prompt_tokens + len(r.token_ids) == 6 and r.finish_reason == "length"


def test_bad_token_ids_are_one_line_errors(model: Engine) -> None:
    for ids, what in (
        ([model.config.vocab_size], "outside the vocabulary"),
        ([-1], "outside the vocabulary"),
        ([1.5, 2.0], "integer token ids"),
        ([[1, 2]], "integer token ids"),
    ):
        with pytest.raises(FmoeError, match=what):
            model.logits(ids)
        with pytest.raises(FmoeError, match=what):
            model.generate(ids, max_tokens=1)


# ---- sessions and threads -----------------------------------------------------------------------
def test_session_over_three_turns_equals_one_prefill_of_the_conversation(model: Engine) -> None:
    """Each turn prefills only its new tokens; what the session generates equals greedy decoding of
    one fresh prefill of the whole conversation so far, and its final state equals that prefill."""
    session = model.new_session()
    turns = [model.encode_prompt(t, chat=False) for t in ("First question", " and a second", " third one")]
    for i, ids in enumerate(turns):
        before = len(session.conversation)
        r = model.generate(ids, max_tokens=4, session=session, stop_ids=())
        assert r.cached_tokens == before - (i > 0)  # everything but the pending token of the turn before
        assert r.prompt_tokens == len(ids) + (i > 0)  # that pending token, then the new ids
        assert session.position == r.cached_tokens + r.prompt_tokens + len(r.token_ids) - 1
        assert session.conversation[before:] == ids + r.token_ids
        assert len(session.pending) == 1  # the last sampled token waits for the next turn
        seq = session.conversation[: before + len(ids)]
        for token in r.token_ids:  # greedy from one prefill of everything so far
            assert int(np.argmax(model.logits(seq)[-1])) == token
            seq.append(token)
    assert session.results[-1] is r and len(session.results) == 3
    # the session's state holds exactly the conversation: its next logits equal a fresh prefill's
    nxt = model.runner.forward(session.pending, session.state).logits
    whole = model.logits(session.conversation)
    assert relative_error(nxt, whole[-1:]).max() < 1e-5
    with pytest.raises(FmoeError, match="token ids or chat=False"):
        model.generate("a chat message", session=session)


def test_session_copy_branches(model: Engine) -> None:
    session = model.new_session()
    model.generate([5, 6, 7, 8], max_tokens=3, session=session, stop_ids=())
    branch = session.copy()
    a = model.generate([9, 10], max_tokens=4, session=session, stop_ids=())
    b = model.generate([9, 10], max_tokens=4, session=branch, stop_ids=())
    assert a.token_ids == b.token_ids and session.conversation == branch.conversation
    c = model.generate([11], max_tokens=4, session=branch, stop_ids=())
    assert branch.conversation[-len(c.token_ids) - 1 :] == [11, *c.token_ids] != session.conversation[-5:]


def test_prefill_only_request(model: Engine) -> None:
    session = model.new_session()
    r = model.generate([3, 4, 5], max_tokens=0, session=session)
    assert r.token_ids == [] and r.finish_reason == "length" and session.position == 3 and not session.pending
    assert r.timing.prefill.tokens == 3 and r.timing.decode.tokens == 0


def test_threads_sharing_one_engine_get_the_serial_answers(packed: Path) -> None:
    """Four threads, one engine, interleaved requests of different kinds: every answer is exactly
    (bitwise) what the same request gets alone."""
    engine = fmoe.load(packed, cache_bytes=3 * 10**5)  # a small cache: hit patterns differ between runs
    prompts = [[5 + i, 17, 33 + 7 * i, 2, 90 + i] for i in range(4)]

    def work(i: int) -> tuple[np.ndarray, list[int], list[int]]:
        logits = engine.logits(prompts[i])
        gen = engine.generate(prompts[i], max_tokens=6, temperature=0.9, seed=i, stop_ids=()).token_ids
        session = engine.new_session()
        engine.generate(prompts[i][:3], max_tokens=2, session=session, stop_ids=())
        more = engine.generate(prompts[i][3:], max_tokens=3, session=session, stop_ids=()).token_ids
        return logits, gen, more

    serial = [work(i) for i in range(4)]
    for _ in range(3):
        with ThreadPoolExecutor(4) as pool:
            parallel = list(pool.map(work, range(4)))
        for (l1, g1, m1), (l2, g2, m2) in zip(serial, parallel, strict=True):
            np.testing.assert_array_equal(l1, l2)
            assert g1 == g2 and m1 == m2
    engine.close()


# ---- loader errors ------------------------------------------------------------------------------
def test_loader_errors(packed: Path, tmp_path: Path) -> None:
    with pytest.raises(FmoeError, match="no such directory"):
        fmoe.load(tmp_path / "nope")
    with pytest.raises(FmoeError, match=r"not a packed fmoe directory.*fmoe extract"):
        fmoe.load(tmp_path)
    with pytest.raises(FmoeError, match=r"--k 0: must be a whole number between 1 and 15"):
        fmoe.load(packed, k=0)
    with pytest.raises(FmoeError, match=r"--k 16: must be a whole number between 1 and 15"):
        fmoe.load(packed, k=16)
    with pytest.raises(FmoeError, match=r"no 2-bit experts.*fmoe repack"):
        fmoe.load(packed, bits=2)
    with pytest.raises(FmoeError, match="--bits 3"):
        fmoe.load(packed, bits=3)
    with pytest.raises(FmoeError, match="unknown backend"):
        fmoe.load(packed, backend="tpu")
    with pytest.raises(FmoeError, match="--device cuda: the cpu backend runs on the cpu only"):
        fmoe.load(packed, device="cuda")
    broken = Path(shutil.copytree(packed, tmp_path / "broken"))
    (broken / "model_weights.json").unlink()
    with pytest.raises(FmoeError, match=r"incomplete, no model_weights\.json.*fmoe extract"):
        fmoe.load(broken)


def test_reduced_k_runs(packed: Path, model: Engine) -> None:
    m = fmoe.load(packed, k=1)
    r = m.generate([5, 6, 7], max_tokens=3)
    assert m.k == 1 and r.timing.k == 1
    assert r.timing.prefill.experts.requested.max() <= 3  # one expert per token and layer
    one = m.logits([5, 6, 7])
    assert model.k == m.config.num_experts_per_tok > 1
    assert relative_error(one, model.logits([5, 6, 7])).max() > 1e-3  # fewer experts, other logits
    m.close()


def test_small_read_pool_and_cache_change_nothing(packed: Path, model: Engine) -> None:
    """A read pool of one expert (every expert its own part) or a cache give the same logits, bitwise."""
    ids = model.tokenizer.encode("a longer prompt so that the prefill routes to many experts")
    full = model.logits(ids)
    for options in (
        {"read_pool_bytes": 1},
        {"cache_bytes": 10**6},
        {"io": "mmap"},
    ):
        with fmoe.load(packed, **options) as other:
            np.testing.assert_array_equal(other.logits(ids), full)
            np.testing.assert_array_equal(other.logits(ids), full)  # the cached run too
    with pytest.raises(FmoeError, match="--cache-gb: no cache with --io mmap"):  # the page cache is the cache
        fmoe.load(packed, io="mmap", cache_bytes=10**6)
