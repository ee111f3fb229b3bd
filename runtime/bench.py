"""`fmoe bench model`: prefill and decode throughput of a loaded model on random token ids.

Stop tokens are ignored (every run decodes exactly ``tokens`` tokens, greedy unless sampling is
asked for) so runs compare. A short warm-up run first takes compilation and cold-file costs out of
the measurement. The loop is the engine's own (``generate_step``, as `fmoe run`'s); every eager
forward pass is profiled per layer and phase.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from fmoe.errors import FmoeError
from fmoe.runtime.engine.engine import Engine
from fmoe.runtime.engine.generate import generate_step
from fmoe.runtime.engine.results import PhaseTiming
from fmoe.runtime.experts.stats import TIERS
from fmoe.runtime.routing_trace import RoutingSource, replaying
from fmoe.runtime.text.sampling import Sampler, SamplingParams


@dataclass
class BenchResult:
    prefill: PhaseTiming
    decode: PhaseTiming
    prompt_tokens: int
    tokens: int
    bits: int
    k: int
    backend: str
    device: str
    kernels: str | None
    threads: int | None
    cache_bytes: int
    model: dict[str, Any]
    dense_bytes_per_token: int  # what a decode step reads of the resident weights
    memory_read_gb_per_s: float | None  # this machine's (CPU) or device's (CUDA), measured in the same run
    routing: str = "model"  # the router's own choice, or what replaced it (uniform, zipf:S, trace:FILE)
    link_gb_per_s: float | None = None  # page-locked host -> device copies, same run (CUDA with a host tier)
    link_bytes_per_token: float = 0.0  # expert bytes a decode step copied host -> device
    resident_expert_bytes: int | None = None  # every expert on the device: bytes a decode step reads of them
    cuda_graph: bool = False  # decode replayed from captured CUDA graphs
    host_compute_bytes_per_token: float = 0.0  # expert bytes a decode step computed on the host (not copied)
    host_read_gb_per_s: float | None = None  # the host's memory read rate with its kernels' threads, same run
    host_shared_gb_per_s: float | None = None  # host memory's rate to the link and those threads at once, same run
    host_compute_share: float | None = None  # --host-compute with direct reads: the host's share, as set or measured
    host_reads: str = "copy"  # experts beyond the device copied into its cache, or read in place ("direct")
    host_bits: int | None = None  # the width of the experts homed in host memory where not `bits` (--host-bits)
    int8_dot: bool = False  # activations rounded to int8 for integer dot products (--int8-dot)
    sampling: dict[str, float] | None = None  # temperature, top_k, top_p of a sampled decode (None: greedy)

    @property
    def expert_bytes_per_token(self) -> float:
        """Expert bytes a decode step used, whichever tier served them (all on the device: K experts
        a layer, which the store does not count, as routing never leaves the device)."""
        if self.resident_expert_bytes is not None:
            return float(self.resident_expert_bytes)
        e = self.decode.experts
        return float(e.bytes.sum()) / max(self.decode.tokens, 1)

    @property
    def decode_gb_per_s(self) -> float:
        """Bytes per decoded token (dense + experts) times tokens per second."""
        return (self.dense_bytes_per_token + self.expert_bytes_per_token) * self.decode.tokens_per_second / 1e9

    @property
    def decode_ceiling_tok_s(self) -> float | None:
        """Tokens/s if a decode step ran at the measured bandwidths: everything read from memory at
        the memory's rate, plus the experts copied over the host link at the link's, or, for those
        the host computed meanwhile, read from host memory at its rate if that takes longer; and
        both from host memory at its rate if that takes longer still (the link's reads come from the
        same memory the host's kernels read)."""
        return self._ceiling(self.host_read_gb_per_s)

    @property
    def decode_ceiling_shared_tok_s(self) -> float | None:
        """:attr:`decode_ceiling_tok_s` with host memory at the rate it gave the link and the host's
        threads together (``host_shared_gb_per_s``), as decode reads it with the host's share."""
        return self._ceiling(self.host_shared_gb_per_s) if self.host_shared_gb_per_s else None

    def _ceiling(self, host_rate: float | None) -> float | None:
        if not self.memory_read_gb_per_s:
            return None
        seconds = (self.dense_bytes_per_token + self.expert_bytes_per_token) / (self.memory_read_gb_per_s * 1e9)
        link = host = 0.0
        if self.link_bytes_per_token and self.link_gb_per_s:
            link = self.link_bytes_per_token / (self.link_gb_per_s * 1e9)
        if self.host_compute_bytes_per_token and host_rate:
            host = (self.host_compute_bytes_per_token + self.link_bytes_per_token) / (host_rate * 1e9)
        return 1.0 / (seconds + max(link, host))

    def to_dict(self) -> dict[str, Any]:
        d = {name: getattr(self, name) for name in self.__dataclass_fields__}
        d["prefill"], d["decode"] = self.prefill.to_dict(), self.decode.to_dict()
        d.update(
            expert_bytes_per_token=self.expert_bytes_per_token,
            decode_gb_per_s=self.decode_gb_per_s,
            decode_ceiling_tok_s=self.decode_ceiling_tok_s,
            decode_ceiling_shared_tok_s=self.decode_ceiling_shared_tok_s,
        )
        return d


def _run(
    engine: Engine, prompt: list[int], tokens: int, cuda_graph: bool, sampling: SamplingParams
) -> tuple[PhaseTiming, PhaseTiming]:
    """The prompt, then ``tokens`` decode steps, through the engine's own loop (`fmoe run`'s: each
    token picked, greedily or drawn with ``sampling``, where the logits are, checked finite there, its
    id sent to the host; greedy graphed steps queued a step ahead). Decode's time is the loop's wall
    time between two reads of a token, on the host's clock: the loop waits for the device at each, and
    with steps queued ahead a CUDA event recorded then would land after the step already queued. With
    CUDA graphs the first decode step captures the sequence's graphs (once a sequence, in `fmoe run`
    too) and is left out: its token is neither timed nor counted."""
    layers = engine.config.num_hidden_layers
    prefill, decode = PhaseTiming(layers), PhaseTiming(layers)
    untimed = 1 if cuda_graph else 0  # decode steps before the timing starts
    session = engine.new_session()
    sampler = None if sampling.greedy else Sampler(sampling)
    last = untimed + tokens  # the prefill's token is the 0th
    loop = generate_step(engine.runner, session, prompt, sampler, profile=True, limit=last + 1)
    t0 = 0.0
    for n, gen in enumerate(loop):
        if n == 0:
            prefill.add(gen.step)
        elif n > untimed:
            decode.add(gen.step)
        if n == untimed:
            t0 = time.perf_counter()
        if n == last:
            break
    decode.seconds = time.perf_counter() - t0
    return prefill, decode


def _ceilings(engine: Engine) -> tuple[float | None, float | None]:
    """(memory read GB/s, host -> device GB/s) of what runs the model, measured now."""
    backend = engine.runner.backend
    if getattr(backend, "kernels", None) == "numba":  # the CPU's ceiling, with the kernels' threads
        from fmoe.runtime.kernels.membw import read_bandwidth

        backend.use_threads()
        return read_bandwidth(), None
    device = getattr(backend, "torch_device", None)
    if device is not None and device.type == "cuda":
        from fmoe.runtime.kernels.gpu_bandwidth import hbm_read_bandwidth, host_to_device_bandwidth

        link = None if getattr(engine.runner.store, "fully_resident", True) else host_to_device_bandwidth(device)
        return hbm_read_bandwidth(device), link
    return None, None


def bench_model(
    engine: Engine,
    *,
    prompt_tokens: int = 64,
    tokens: int = 32,
    seed: int = 0,
    routing: RoutingSource | None = None,
    warm_tokens: int = 2,
    sampling: SamplingParams | None = None,
) -> BenchResult:
    """Measure prefill (``prompt_tokens`` random ids as one batch) and decode (``tokens`` steps), on the
    router's own choice of experts or on ``routing``'s (cache behaviour under realistic routing).
    With an engine that replays CUDA graphs (``cuda_graph``), decode replays them (one for the step
    when every expert is on the device; else one per layer, the experts stage between them), and so
    does the prompt's first chunk (every expert resident; runtime/engine/prefill_graph.py).
    A warm-up run first (the prompt and ``warm_tokens`` decode steps; with such an engine, the prompt
    once more before it, so that the graph is captured there) compiles every shape and fills the expert
    tiers: more steps bring caches and expert homes near their steady state. Decode is greedy, or
    drawn with ``sampling`` (its seed for each run)."""
    if prompt_tokens < 1 or tokens < 1:
        raise FmoeError("--prompt-tokens and --tokens: must be >= 1")
    if warm_tokens < 1:
        raise FmoeError(f"--warm-tokens {warm_tokens}: must be >= 1")
    cuda_graph = engine.runner.cuda_graph
    needed = prompt_tokens + max(tokens, warm_tokens) + cuda_graph  # (the untimed capturing step)
    if needed > engine.max_context:
        raise FmoeError(
            f"--prompt-tokens + --tokens (or --warm-tokens): {needed} positions exceed the context limit of "
            f"{engine.max_context}"
        )
    sampling = sampling or SamplingParams()
    rng = np.random.default_rng(seed)
    vocab = min(engine.config.vocab_size, engine.tokenizer.vocab_size)
    prompt = [int(t) for t in rng.integers(0, vocab, prompt_tokens)]

    store = engine.runner.store
    with replaying(engine, routing):
        if cuda_graph and routing is None:  # a first chunk seen twice is captured: not in the timing
            engine.runner.forward(prompt, engine.runner.new_state(), last_only=True)  # (replaced routing: no graph)
        # every shape of the timed run compiled (Triton JITs per shape)
        _run(engine, prompt, warm_tokens, cuda_graph, sampling)
        prefill, decode = _run(engine, prompt, tokens, cuda_graph, sampling)
    cfg = engine.config
    backend = engine.runner.backend
    memory, link = _ceilings(engine)
    resident = None
    if getattr(store, "fully_resident", False):
        resident = engine.k * cfg.num_hidden_layers * store.layout.file_size
    link_bytes = host_bytes = 0.0
    host_rate = shared_rate = None
    host_share = getattr(store, "host_share", None)
    if hasattr(store, "all_resident"):  # a device tier: experts over the link (copied or read), or computed on the host
        steps = max(decode.tokens, 1)
        on_device = decode.experts.bytes[:, TIERS.index("device")].sum()
        host_size = getattr(store, "host_layout", store.layout).file_size  # (--host-bits: the host rows' width)
        host_bytes = float(decode.experts.host_computed.sum()) * host_size / steps
        link_bytes = float(decode.experts.bytes.sum() - on_device) / steps - host_bytes
        if host_bytes:
            from fmoe.runtime.kernels.membw import read_bandwidth

            host_rate = read_bandwidth()
            device = getattr(engine.runner.backend, "torch_device", None)
            if host_share is not None and device is not None and device.type == "cuda":
                from fmoe.runtime.kernels.gpu_bandwidth import shared_host_read_bandwidth

                shared_rate = shared_host_read_bandwidth(device)
    return BenchResult(
        prefill=prefill,
        decode=decode,
        prompt_tokens=prompt_tokens,
        tokens=tokens,
        bits=engine.bits,
        k=engine.k,
        backend=engine.backend,
        device=engine.device,
        kernels=getattr(backend, "kernels_in_use", None) or getattr(backend, "kernels", None),
        threads=getattr(backend, "threads", None),
        cache_bytes=engine.runner.store.cache_bytes,
        model={
            "layers": cfg.num_hidden_layers,
            "hidden": cfg.hidden_size,
            "experts": cfg.num_experts,
            "fingerprint": cfg.fingerprint(),
        },
        dense_bytes_per_token=engine.runner.network.weights.bytes_per_token(),
        memory_read_gb_per_s=memory,
        routing=routing.name if routing else "model",
        link_gb_per_s=link,
        link_bytes_per_token=link_bytes,
        resident_expert_bytes=resident,
        cuda_graph=cuda_graph,
        host_compute_bytes_per_token=host_bytes,
        host_read_gb_per_s=host_rate,
        host_shared_gb_per_s=shared_rate,
        host_reads=getattr(store, "host_reads", "copy"),
        host_bits=getattr(store, "host_bits", None),
        host_compute_share=host_share,
        int8_dot=bool(getattr(backend, "int8", False)),
        sampling=None if sampling.greedy else sampling.filters(),
    )
