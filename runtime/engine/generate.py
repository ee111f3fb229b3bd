"""The generation loop, in two layers (as in mlx-lm):

- :func:`generate_step` feeds a session, then alternately samples a token and feeds it, yielding each
  token with the logits it was drawn from and the forward pass that made them; it runs until the
  caller stops it or the context is full. Benchmarks and diagnostics use it directly.
- :func:`stream_generate` adds what a user sees: stop tokens, ``max_tokens``, detokenising whole
  characters, stop strings held back while they may still be forming, timing, and a final chunk with
  the finish reason and the result. The engine, the CLI and (later) the server use it.

A sampled token is *pending* in the session until it is fed; a request that stops (a stop token,
``max_tokens``) leaves its last token pending, so the next request on the session feeds it first
and the session always equals one prefill of its whole conversation. (Steps queued ahead on a GPU
may have fed a stop token already: the session then holds it as fed, the same conversation.)
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from fmoe.errors import FmoeError
from fmoe.runtime.engine.results import (
    GenerationChunk,
    GenerationResult,
    GenerationTiming,
    PhaseTiming,
    TokenLogprob,
)
from fmoe.runtime.engine.runner import Runner, Step
from fmoe.runtime.engine.session import Session
from fmoe.runtime.text.sampling import GREEDY, Pick, Sampler, SamplingParams, StopStrings
from fmoe.runtime.text.tokenizer import Tokenizer


@dataclass
class GeneratedToken:
    token: int
    logits: np.ndarray | None  # float32 [vocab]: the row the token was drawn from (None: picked where the logits are)
    step: Step  # the forward pass that computed it (the prefill for the first token)


def feed(
    runner: Runner,
    session: Session,
    ids: Sequence[int],
    *,
    profile: bool = False,
    all_logits: bool = False,
    pick: Pick | None = None,
) -> Step:
    """Run the session's pending tokens and ``ids`` through the model; the session then holds them.
    ``pick``: the step's ``token`` picked where the logits are, which stay there."""
    tokens = session.pending + [int(t) for t in ids]
    step = runner.forward(tokens, session.state, last_only=not all_logits, profile=profile, pick=pick)
    session.token_ids += tokens
    session.pending = []
    return step


def generate_step(
    runner: Runner,
    session: Session,
    ids: Sequence[int],
    sample: Sampler | Callable[[np.ndarray], int] | None,
    *,
    profile: bool = False,
    all_logits: bool = False,
    limit: int | None = None,
) -> Iterator[GeneratedToken]:
    """Prefill ``ids`` (after the pending tokens), then yield sampled tokens one by one, feeding each
    before drawing the next; stops when the context is full. ``sample``: None (greedy) or a
    :class:`Sampler` pick each token where the logits are, without them (a GPU sends 16 bytes back,
    not the vocabulary's logits; ``GeneratedToken.logits`` is None); any other callable draws from the
    host logits row. With ``all_logits`` the prefill step's ``logits`` hold every prompt position (the
    first token's row is the last). ``limit``: the most tokens the caller will take (None: no limit).

    Decode replayed as one CUDA graph, its tokens picked on the device, runs a step ahead
    (``Runner.launch``): each step is queued on the token the step before picks (greedy, or a
    sampler's draw, its number drawn when the step is queued: the same numbers in the same order),
    on the device, before that token is read, so the GPU never waits for the host between two steps.
    A token the caller stops at (a stop token) is then fed already (the session holds it as fed, not
    pending: the same conversation); none is fed past ``limit``."""
    sampler = sample if isinstance(sample, Sampler) else None
    on_host = sample is not None and sampler is None
    if all_logits and not on_host:
        raise ValueError("generate_step: all_logits needs a host sampler (a pick leaves the logits on the device)")

    def pick() -> Pick:
        return GREEDY if sampler is None else sampler.pick()

    def fed(token: int) -> None:  # a launched step fed it
        session.token_ids.append(token)
        session.pending = []

    ahead = not on_host and runner.cuda_graph  # steps picked on the device run ahead where they can
    step = feed(runner, session, ids, profile=profile, all_logits=all_logits, pick=None if on_host else pick())
    taken = 0
    launched = None  # a step queued on the token about to be yielded: its pick is the next token
    while True:
        if on_host:
            assert step.logits is not None and callable(sample)
            row, token = step.logits[-1], sample(step.logits[-1])
        else:
            row, token = None, step.token
            assert token is not None
        taken += 1
        if launched is not None:
            fed(token)  # queued on the device's copy of it before it was read
        else:
            session.pending = [token]
            if ahead and (limit is None or taken < limit):
                launched = runner.launch(session.state, token, pick)  # its step, queued before the caller sees it
                if launched is not None:
                    fed(token)
        yield GeneratedToken(token, row, step)
        if launched is None:
            if session.position >= runner.max_context:
                return  # no room to feed it: the caller finishes with "length"
            step = feed(runner, session, [], profile=profile, pick=None if on_host else pick())
            continue
        # the step after the queued one, queued on its pick before that is read (if a token after it may be taken)
        following = runner.launch(session.state, None, pick) if limit is None or taken + 1 < limit else None
        step = runner.collect(launched)
        launched = following


def stream_generate(
    runner: Runner,
    tokenizer: Tokenizer,
    session: Session,
    ids: Sequence[int],
    *,
    max_tokens: int,
    sampling: SamplingParams,
    stop: Sequence[str] = (),
    stop_ids: Collection[int] = (),
    profile: bool = True,
    cuts: Sequence[int] = (),
    on_cut: Callable[[Session], None] | None = None,
    logprobs: int | None = None,
) -> Iterator[GenerationChunk]:
    """Generate up to ``max_tokens`` tokens after ``ids`` on ``session``; yields text as it becomes
    final (whole characters, never the start of a stop string) and last a chunk with the result.

    ``cuts``: offsets into ``ids`` (increasing, inside it) where the prefill is split into several
    forward passes; after each, ``on_cut(session)`` may keep a copy of the state (the server's
    prefix cache). The prefill's cost and the answer depend on where it is cut, so callers cut at
    places that depend on the prompt alone. ``logprobs`` (a count, 0 or more): every chunk carries
    each of its tokens' log-probability with that many most likely alternatives."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise FmoeError(f"--tokens {max_tokens!r}: must be a whole number >= 0")
    checked = runner.check_tokens([*session.pending, *ids], session.position)  # bad ids fail before any work
    ids = checked[len(session.pending) :].tolist()
    if list(cuts) != sorted(set(cuts)) or any(not 0 < c < len(ids) for c in cuts):
        raise FmoeError(f"cuts {list(cuts)}: must be increasing offsets inside the prompt")
    cfg = runner.config
    store = runner.store
    timing = GenerationTiming(
        prompt_tokens=len(session.pending) + len(ids),
        cached_tokens=session.position,
        generated_tokens=0,
        k=runner.network.top_k,
        bits=store.bits,
        backend=runner.backend.name,
        device=runner.backend.device,
        cache_bytes=store.cache_bytes,
        host_reads=getattr(store, "host_reads", "copy"),
        host_bits=getattr(store, "host_bits", None),
        host_compute_share=getattr(store, "host_share", None),
        prefill=PhaseTiming(cfg.num_hidden_layers),
        decode=PhaseTiming(cfg.num_hidden_layers),
    )
    stops = StopStrings(stop)
    decoder = tokenizer.stream_decoder()
    out_ids: list[int] = []
    unsent: list[int] = []  # ids since the last chunk
    unsent_lp: list[TokenLogprob] | None = [] if logprobs is not None else None
    held = ""  # decoded text not shown yet (it may be the start of a stop string)
    shown: list[str] = []
    finish = "length"
    cut_by_string = False

    start = 0
    for c in cuts:  # the prefill's leading segments, each its own forward pass
        timing.prefill.add(feed(runner, session, ids[start:c], profile=profile))
        start = c
        if on_cut is not None:
            on_cut(session)
    ids = ids[start:]
    if max_tokens == 0:
        timing.prefill.add(feed(runner, session, ids, profile=profile))
    else:
        sampler = Sampler(sampling)  # picks where the logits are; with logprobs they come to the host
        sample = sampler if logprobs is None else sampler.__call__  # (a bound method: a host sampler)
        for n, gen in enumerate(generate_step(runner, session, ids, sample, profile=profile, limit=max_tokens)):
            (timing.prefill if n == 0 else timing.decode).add(gen.step)
            if gen.token in stop_ids:
                finish = "stop"
                break
            out_ids.append(gen.token)
            unsent.append(gen.token)
            if unsent_lp is not None:
                assert gen.logits is not None  # (a host sampler: the logits came to the host)
                unsent_lp.append(token_logprob(gen.logits, gen.token, logprobs or 0))
            held += decoder.push(gen.token)
            cut = stops.find(held)
            if cut >= 0:
                held, finish, cut_by_string = held[:cut], "stop", True
                break
            safe = stops.safe_length(held)
            if safe:
                shown.append(held[:safe])
                yield GenerationChunk(held[:safe], unsent, logprobs=unsent_lp)
                held, unsent = held[safe:], []
                unsent_lp = [] if unsent_lp is not None else None
            if len(out_ids) == max_tokens:
                break
    if not cut_by_string:
        held += decoder.flush()
        cut = stops.find(held)
        if cut >= 0:
            held, finish = held[:cut], "stop"
    shown.append(held)
    timing.generated_tokens = len(out_ids)
    result = GenerationResult("".join(shown), out_ids, timing.prompt_tokens, timing.cached_tokens, finish, timing)
    session.results.append(result)
    yield GenerationChunk(held, unsent, finish, result, logprobs=unsent_lp)


def token_logprob(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    """``token``'s log-probability in the softmax of ``logits`` and the ``top`` most likely tokens'."""
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    z = z - z.max()
    lp = z - np.log(np.exp(z).sum())
    best: list[tuple[int, float]] = []
    if top > 0:
        idx = np.argpartition(-lp, min(top, lp.size) - 1)[:top]
        idx = idx[np.argsort(-lp[idx], kind="stable")]
        best = [(int(i), float(lp[i])) for i in idx]
    return TokenLogprob(int(token), float(lp[token]), best)
