"""What a request returns: text chunks while it streams, then a result with its usage and timing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fmoe.runtime.engine.runner import Step
from fmoe.runtime.experts.stats import ExpertStats
from fmoe.runtime.timing import PhaseProfile


@dataclass
class PhaseTiming:
    """The prefill or the decode of one request: tokens, forward passes, wall seconds, where the time
    went (seconds per layer and phase; zeros when profiling was off) and what the expert store did."""

    num_layers: int
    tokens: int = 0
    passes: int = 0
    replayed: int = 0  # passes that replayed a CUDA graph (a prefill: its first chunk)
    seconds: float = 0.0
    profile: PhaseProfile = field(init=False)
    experts: ExpertStats = field(init=False)

    def __post_init__(self) -> None:
        self.profile = PhaseProfile(self.num_layers)
        self.experts = ExpertStats.zeros(self.num_layers)

    def add(self, step: Step) -> None:
        self.tokens += step.tokens
        self.passes += 1
        self.replayed += step.replayed
        self.seconds += step.seconds
        if step.profile is not None:
            self.profile.merge(step.profile)
        self.experts += step.experts

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "passes": self.passes,
            "replayed_passes": self.replayed,
            "seconds": self.seconds,
            "tokens_per_second": self.tokens_per_second,
            "profile": self.profile.to_dict(),
            "experts": self.experts.to_dict(),
        }


@dataclass
class GenerationTiming:
    """A request's timing, with what it ran on."""

    prompt_tokens: int  # the request's new tokens (fed in its prefill, with any pending ones)
    cached_tokens: int  # tokens the session already held (not computed again)
    generated_tokens: int
    k: int
    bits: int
    backend: str
    device: str
    cache_bytes: int
    prefill: PhaseTiming
    decode: PhaseTiming
    host_reads: str = "copy"  # experts beyond the device copied into its cache, or read in place ("direct")
    host_bits: int | None = None  # the width of the experts homed in host memory where not `bits` (--host-bits)
    host_compute_share: float | None = None  # --host-compute with direct reads: the host's share, set or measured

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "generated_tokens": self.generated_tokens,
            "k": self.k,
            "bits": self.bits,
            "backend": self.backend,
            "device": self.device,
            "cache_bytes": self.cache_bytes,
            "host_reads": self.host_reads,
            "host_bits": self.host_bits,
            "host_compute_share": self.host_compute_share,
            "prefill": self.prefill.to_dict(),
            "decode": self.decode.to_dict(),
        }


@dataclass
class GenerationResult:
    text: str  # the generated text (a stop token or stop string not included)
    token_ids: list[int]  # the generated ids (a stop token not included)
    prompt_tokens: int
    cached_tokens: int
    finish_reason: str  # "stop" (stop token or string) or "length" (max tokens or the context limit)
    timing: GenerationTiming


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model (the raw logits, before temperature,
    top-k or top-p) and the ``top`` most likely tokens with theirs, most likely first."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class GenerationChunk:
    """New text and the ids generated since the previous chunk; the last chunk of a request carries
    the finish reason and the result (its text may be empty). ``logprobs``: one per id, when asked."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    result: GenerationResult | None = None
    logprobs: list[TokenLogprob] | None = None
