"""A fresh sequence's first prompt chunk replayed from one captured CUDA graph.

A long prefill on the GPU is a few hundred kernels a pass, and with the weights dequantised for
library GEMMs (``--int8-dot``) the host takes about as long to launch them one by one from Python
as the GPU takes to run them (docs/PERFORMANCE.md, eighteenth pass): the host sets the pace. With
every expert resident nothing in a pass is read back, so the pass can be captured once and replayed,
one launch for all of them.

The graph runs on a sequence state of its own: its linear layers' conv and recurrent states are
zeroed inside the graph (a fresh sequence starts from zeros), its KV caches hold exactly the chunk,
and after each replay that state is copied into the caller's (a few MB a layer). Shapes are fixed at
capture, so a graph serves one chunk length; the runner (runtime/engine/runner.py) decides when one
is worth capturing: a first chunk of a length it has seen before, which every prompt longer than
the prefill chunk has.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fmoe.errors import FmoeError
from fmoe.runtime.engine.cuda_graph import Capture, cuda_capture, side_stream
from fmoe.runtime.model import Qwen35MoeNetwork
from fmoe.runtime.state import LinearState, SequenceState


def prefill_graph_blocker(network: Qwen35MoeNetwork, cuda: bool = True) -> str | None:
    """Why ``network`` cannot have its first chunk captured (None: it can): the torch backend's fused
    kernels on a CUDA device (any device with ``cuda`` False: tests record otherwise), routing its own
    (not replaced on the host), every layer's experts resident (a pass that reads routing back to copy
    experts in cannot be captured)."""
    be: Any = network.backend
    if getattr(be, "name", None) != "torch" or not hasattr(be, "torch_device"):
        return "needs the torch backend"
    if cuda and be.torch_device.type != "cuda":
        return "needs a CUDA device"
    if getattr(be, "replaces_routing", False):  # runtime/routing_trace.py
        return "routing is replaced on the host"
    if getattr(be, "moe_waits_on_device", False):
        return "the plain-torch experts read routing back"
    whole = getattr(network.experts, "all_resident", None)
    if whole is None or any(whole(i) is None for i in range(network.config.num_hidden_layers)):
        return "not every expert is resident on the device"
    return None


class CudaGraphPrefill:
    """The first ``tokens`` prompt ids of a fresh sequence (position 0), captured once on a state of
    its own; ``run(ids, state)`` replays it and leaves ``state`` as an eager pass would.

    ``capture`` (tests): how the pass is recorded; by default a CUDA graph with a memory pool of its
    own (so it may be replayed whenever, beside the decode graphs)."""

    def __init__(self, network: Qwen35MoeNetwork, tokens: int, *, capture: Capture | None = None) -> None:
        why = prefill_graph_blocker(network, cuda=capture is None)
        if why is not None:
            raise FmoeError(f"CUDA graphs for a prefill: {why}")
        if tokens < 2:
            raise FmoeError(f"CUDA graphs for a prefill: {tokens} tokens; one token is a decode step")
        self.network, self.tokens = network, tokens
        device = network.backend.torch_device
        self._ids = torch.zeros(tokens, dtype=torch.int64, device=device)
        self._state = network.new_state()
        for layer in self._state.layers:
            if hasattr(layer, "reserve"):  # appends of the chunk land in place: nothing reallocates in a replay
                layer.reserve(tokens)
        with side_stream(device):  # warm-up: compiles the Triton kernels for these shapes, settles the allocator
            for _ in range(2):
                like = self._pass()
        self._replay, outputs = (capture or cuda_capture())(self._pass, like)
        self._logits = outputs[0]

    def _pass(self) -> tuple[torch.Tensor]:
        """The recorded pass: the private state made fresh (zeros, empty caches), then the model on the ids."""
        st = self._state
        for layer in st.layers:
            if isinstance(layer, LinearState):
                layer.conv.zero_()
                layer.recurrent.zero_()
            else:
                layer.length = 0
        st.position = 0
        return (self.network.forward(self._ids, st, last_only=True),)

    def run(self, ids: np.ndarray, state: SequenceState) -> torch.Tensor:
        """Prefill ``ids`` (host int64 ``[tokens]``) into the fresh ``state``: the last position's logits
        ``[1, vocab]`` on the device (the graph's buffer: overwritten by the next replay)."""
        if state.position != 0 or len(ids) != self.tokens:
            raise FmoeError(
                f"CUDA graphs for a prefill: captured for {self.tokens} tokens from position 0, "
                f"asked for {len(ids)} from {state.position}"
            )
        self._ids.copy_(torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)), non_blocking=True)
        self._replay()
        for mine, theirs in zip(self._state.layers, state.layers, strict=True):
            if isinstance(mine, LinearState):
                theirs.conv.copy_(mine.conv)
                theirs.recurrent.copy_(mine.recurrent)
            else:  # the backend's KV cache: the chunk's keys and values, [T, Hkv, D] as attention appends them
                theirs.append(mine.k[:, : self.tokens].transpose(0, 1), mine.v[:, : self.tokens].transpose(0, 1))
        state.position = self.tokens
        return self._logits
