"""Decode steps of one sequence replayed from a captured CUDA graph.

A decode step of the model is a few hundred small kernels; launched one by one from Python, the
launches, not the GPU, set the pace. When every expert is resident on the device (the expert
provider's ``all_resident``), a step reads nothing back to the host, so it can be captured once
and replayed: the token id and the position go in through two device scalars (the torch backend's
``device_positions``: RoPE on the device, keys and values written at that position of KV caches
reserved to ``capacity``), the conv/recurrent states are updated in place, and the logits land in
the graph's own output buffer.
"""

from __future__ import annotations

from typing import Any

import torch

from fmoe.errors import FmoeError
from fmoe.runtime.model import Qwen35MoeNetwork
from fmoe.runtime.state import SequenceState


class CudaGraphDecoder:
    """One decode step of ``network`` on ``state``, captured; ``step(token)`` replays it."""

    def __init__(self, network: Qwen35MoeNetwork, state: SequenceState, capacity: int) -> None:
        be: Any = network.backend
        device = getattr(be, "torch_device", None)
        if device is None or device.type != "cuda" or not hasattr(be, "device_positions"):
            raise FmoeError("CUDA graphs: need the torch backend on a CUDA device")
        whole = getattr(network.experts, "all_resident", None)
        layers = network.config.num_hidden_layers
        if whole is None or any(whole(i) is None for i in range(layers)):
            raise FmoeError("CUDA graphs: need every expert resident on the device (a larger --gpu-cache-gb)")
        if not state.position < capacity:
            raise FmoeError(f"CUDA graphs: the sequence is at position {state.position}, capacity is {capacity}")
        self.network, self.state, self.capacity = network, state, capacity
        for layer in state.layers:
            if hasattr(layer, "reserve"):  # KV caches: full length now, nothing reallocates in a replay
                layer.reserve(capacity)
        self._ids = torch.zeros(1, dtype=torch.int64, device=device)
        self._pos = torch.zeros((), dtype=torch.int64, device=device)
        self._pos.fill_(state.position)

        # Warm up on a copy of the state (compiles the Triton kernels, settles the allocator), on a
        # side stream as capture requires; then capture, which records kernels without running them.
        scratch = state.copy()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), be.device_positions(self._pos):
            for _ in range(2):
                network.forward(self._ids, scratch, last_only=True)
        torch.cuda.current_stream(device).wait_stream(side)
        del scratch
        self._graph = torch.cuda.CUDAGraph()
        start = state.position
        with torch.cuda.graph(self._graph), be.device_positions(self._pos):
            self._logits = network.forward(self._ids, state, last_only=True)
        state.position = start

    def step(self, token: int) -> torch.Tensor:
        """Run ``token`` at the sequence's position: its logits ``[1, vocab]`` on the device (the graph's
        buffer, overwritten by the next step)."""
        st = self.state
        if st.position >= self.capacity:
            raise FmoeError(f"CUDA graphs: the sequence reached its capacity of {self.capacity} positions")
        self._ids.fill_(token)
        self._pos.fill_(st.position)
        self._graph.replay()
        st.position += 1
        for layer in st.layers:
            if hasattr(layer, "reserve"):
                layer.length = st.position  # the keys and values written so far are valid
        return self._logits
