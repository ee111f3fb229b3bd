"""scripts/mixed_bits_quality.py: which experts it puts at 2 bits, and its provider over two stores."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support import load_script

from fmoe.runtime.experts.stats import ExpertStats

SCRIPT = Path(__file__).parents[1] / "scripts" / "mixed_bits_quality.py"


def test_low_masks_pick_the_least_a_random_and_the_most_routed_share(rng: np.random.Generator) -> None:
    popularity = rng.permutation(np.arange(3 * 20)).reshape(3, 20)  # distinct counts: one right answer
    masks = load_script("mixed_bits_quality").low_masks(0.35, popularity, seed=1)
    for mask in masks.values():
        assert mask.shape == popularity.shape and (mask.sum(axis=1) == 7).all()
    for layer in range(3):
        ranked = np.sort(popularity[layer])
        assert np.array_equal(np.sort(popularity[layer][masks["least routed"][layer]]), ranked[:7])
        assert np.array_equal(np.sort(popularity[layer][masks["most routed"][layer]]), ranked[-7:])
    assert not np.array_equal(masks["random"], masks["least routed"])


class _Store:
    """A stand-in expert store: yields one part (its name and the experts asked for), counts them."""

    def __init__(self, name: str, layers: int) -> None:
        self.name, self.closed, self.stats = name, 0, ExpertStats.zeros(layers)

    def resident(self, layer: int, experts: np.ndarray):
        self.stats.requested[layer] += len(experts)
        try:
            yield (self.name, sorted(experts.tolist()))
        finally:
            self.closed += 1


def test_mixed_experts_serve_each_expert_from_its_store_and_close_both() -> None:
    mixed_cls = load_script("mixed_bits_quality").MixedExperts
    high, low = _Store("high", 2), _Store("low", 2)
    mask = np.zeros((2, 8), dtype=bool)
    mask[1, [2, 5]] = True
    provider = mixed_cls(high, low, mask)
    ticket = provider.resident(1, np.array([5, 0, 2, 7]))
    assert list(ticket) == [("high", [0, 7]), ("low", [2, 5])]
    ticket.close()
    assert high.closed == low.closed == 1
    assert provider.stats.requested.tolist() == [0, 4]
    assert list(provider.resident(0, np.array([2, 5]))) == [("high", [2, 5]), ("low", [])]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--share", "1"], "must lie strictly between 0 and 1"),
        (["--tokens", "100"], "--tokens of at least --ctx"),
        (["--ctx", "2"], "--ctx of at least 4"),
        (["--threads", "0"], "argument --threads: must be at least 1"),
    ],
)
def test_bad_options_get_a_one_line_error(args: list[str], message: str) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("share", [0.2, 0.5])
def test_the_routed_share_counts_choices_not_experts(share: float) -> None:
    module = load_script("mixed_bits_quality")
    popularity = np.array([[100, 1, 1, 1, 1, 1, 1, 1, 1, 92]])
    masks = module.low_masks(share, popularity)
    assert (
        module.routed_share(masks["most routed"], popularity)
        > share
        > module.routed_share(masks["least routed"], popularity)
    )
