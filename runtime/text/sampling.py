"""Choosing the next token: greedy, temperature, top-k, top-p (seeded), and stop strings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fmoe.errors import FmoeError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None

    def __post_init__(self) -> None:
        if not _number(self.temperature) or not 0 <= self.temperature <= 1e6:
            raise FmoeError(f"--temperature {self.temperature!r}: must be a number >= 0 (0 = greedy)")
        if not _integer(self.top_k) or self.top_k < 0:
            raise FmoeError(f"--top-k {self.top_k!r}: must be a whole number >= 0 (0 turns it off)")
        if not _number(self.top_p) or not 0 < self.top_p <= 1:
            raise FmoeError(f"--top-p {self.top_p!r}: must be a number in (0, 1]")
        if self.seed is not None and (not _integer(self.seed) or not 0 <= self.seed < 2**64):
            raise FmoeError(f"--seed {self.seed!r}: must be a whole number between 0 and 2**64 - 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def filters(self) -> dict[str, float]:
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}


def filtered_distribution(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """The float64 distribution that sampling draws from: softmax(logits / T), restricted to the
    top-k tokens, then to the smallest set of most likely tokens whose mass reaches top_p
    (the nucleus), renormalised."""
    ids, probs = candidates(logits, temperature, top_k, top_p)
    full = np.zeros(np.asarray(logits).size)
    full[ids] = probs
    return full


def candidates(
    logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """The tokens :func:`filtered_distribution` gives a non-zero probability, in increasing id order, and
    those probabilities (float64, summing to 1), without sorting or exponentiating the whole
    vocabulary where a filter leaves a few tokens: top-k takes its k with one partition (ties at the
    k-th value all stay), the nucleus is looked for among the most likely tokens first, whose mass
    decides whether they hold it. On a 248k vocabulary a sort of every token took tens of ms a token."""
    z = np.asarray(logits).reshape(-1)
    ids = np.flatnonzero(z >= np.partition(z, -top_k)[-top_k]) if 0 < top_k < z.size else None
    zt = (z if ids is None else z[ids]).astype(np.float64) / temperature
    p = np.exp(zt - zt.max())
    p /= p.sum()
    if ids is None:
        ids = np.arange(z.size)
    if top_p < 1.0:
        keep = _nucleus(p, top_p)
        ids, p = ids[keep], p[keep]
        p = p / p.sum()
    return ids, p


def _nucleus(p: np.ndarray, top_p: float) -> np.ndarray:
    """Indices (increasing) of the smallest set of most likely entries of ``p`` (a distribution) whose
    mass reaches ``top_p``: an entry stays while the mass of those before it, most likely first and
    ties in index order, is below top_p. Tried on the m most likely entries, m growing: with every
    entry at the m-th value included they are the first of the whole vector's order, summed in the
    same order, so once their mass reaches top_p the nucleus lies among them, exactly."""
    m = 64
    while True:
        threshold = np.partition(p, -m)[-m] if m < p.size else 0.0
        cand = np.flatnonzero(p >= threshold) if threshold > 0 else np.flatnonzero(p)
        order = cand[np.argsort(-p[cand], kind="stable")]
        mass = np.cumsum(p[order])
        if threshold == 0 or mass[-1] >= top_p:
            break
        m *= 16
    keep = np.zeros(p.size, dtype=bool)
    keep[order[(mass - p[order]) < top_p]] = True  # the first always stays
    return np.flatnonzero(keep)  # in id order without a sort


def _number(x: object) -> bool:
    """A finite real number (NaN and infinities are not)."""
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and bool(np.isfinite(x))


def _integer(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclass(frozen=True)
class Pick:
    """How a forward pass picks its token where the logits are (runtime/engine/runner.py), so that
    they need not come to the host: greedy, or a draw of ``u`` (uniform in [0, 1), from the sampler's
    seeded generator) from the distribution ``params`` filter."""

    params: SamplingParams = SamplingParams()
    u: float = 0.0

    @property
    def greedy(self) -> bool:
        return self.params.greedy


GREEDY = Pick()


def draw(logits: np.ndarray, temperature: float, top_k: int, top_p: float, u: float) -> int:
    """The token that ``u`` (uniform in [0, 1)) picks from :func:`filtered_distribution`: as
    Generator.choice(vocabulary, p=that distribution) draws (its zeros add nothing to the cumulative
    sums), one uniform number against the normalised cumulative sums in id order."""
    ids, probs = candidates(logits, temperature, top_k, top_p)
    cdf = np.cumsum(probs)
    return int(ids[np.searchsorted(cdf / cdf[-1], u, side="right")])


class Sampler:
    """Draws tokens with a seeded numpy Generator (same seed, same tokens), from host logits
    (``sampler(row)``) or where the logits are (``sampler.pick()`` for runner.forward): one uniform
    number a sampled token either way, so both give the same tokens."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        p = self.params
        if p.greedy:
            return int(np.argmax(logits))
        return draw(logits, p.temperature, p.top_k, p.top_p, self.rng.random())

    def pick(self) -> Pick:
        """The next token's pick, its uniform number drawn now."""
        p = self.params
        return GREEDY if p.greedy else Pick(p, self.rng.random())


class StopStrings:
    """Finds the earliest stop string in generated text, and how much text is safe to show while
    streaming (text that could still be the start of a stop string is held back)."""

    def __init__(self, stops: Sequence[str]) -> None:
        if isinstance(stops, str) or any(not isinstance(s, str) for s in stops):
            raise FmoeError("--stop: a list of strings")
        self.stops = [s for s in stops if s]

    def find(self, text: str) -> int:
        """Index where the earliest stop string starts, or -1."""
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return min(hits) if hits else -1

    def safe_length(self, text: str) -> int:
        """Length of the prefix of ``text`` that cannot become part of a stop string."""
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        return len(text) - keep
