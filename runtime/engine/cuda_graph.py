"""Decode steps of one sequence replayed from captured CUDA graphs.

A decode step of the model is a few hundred small kernels; launched one by one from Python, the
launches, not the GPU, set the pace. Everything but a layer's routed-experts stage reads nothing
back to the host, so it can be captured once and replayed: the token id and the position go in
through two device scalars (the torch backend's ``device_positions``: RoPE on the device, keys and
values written at that position of KV caches reserved to ``capacity``), the conv/recurrent states
are updated in place, and the logits land in the last graph's own output buffer, with their greedy
pick (the argmax and a finiteness flag: all a greedy step reads back). A sampler's draw from them
is captured too, once for each sampler's settings, reading the step's uniform number from a third
device scalar, so that a sampled step is one more replay and the next step can be queued on it.

The step is cut into segments at the layers whose experts stage must run eagerly: those whose
experts are not all resident on the device (the provider's ``all_resident`` is None: the stage
reads the routing back and copies misses in), and every layer when ``split_every_layer`` or when the
backend's experts stage waits on the device anyway (``moe_waits_on_device``: plain-torch kernels).
With every expert resident the step is one graph; with a device cache over host memory it is one
graph per layer (its mixer, norms and router) with the experts stage (the routed and the shared
expert) between them. Routing replaced on the host (the benchmarks' uniform, Zipf or traced routing,
runtime/routing_trace.py) is one more input of the step: the next token's experts in every layer,
copied up with the token id, which the captured route reads (``routing_from``); it cuts nothing.

The experts stage of a cut is itself mostly graphed. With the router's own routing, the segment
before it ends with the routing (ids and weights in the graph's buffers), and only its read-back
and the device tier's bookkeeping (which experts to copy in, the copies queued, the layer's slot map
uploaded) run eagerly; the experts' kernels then replay from a graph captured over the tier's slot
map of that layer (``slot_map``: the same device tensor every step). With routing replaced on the
host, the routing runs eagerly too and is copied into fixed buffers the experts graph reads. Misses
the tier leaves to the host are added after it. Graphs share one memory pool and are
replayed in the order they were captured, as the pool requires.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import numpy as np
import torch

from fmoe.errors import FmoeError
from fmoe.runtime.experts.slots import ExpertPart
from fmoe.runtime.kernels import pdl
from fmoe.runtime.model import Qwen35MoeNetwork
from fmoe.runtime.state import SequenceState
from fmoe.runtime.text.sampling import GREEDY, Pick

Tensors = tuple[torch.Tensor, ...]
Replay = Callable[[], None]
ExpertsGraph = tuple[Replay, Tensors, ExpertPart]  # an experts stage's replay, (output, ids, weights), its part
# capture(fn, like) -> (replay, outputs): record ``fn`` (which returns tensors shaped as ``like``) so
# that ``replay()`` runs it again and leaves its results in ``outputs``, the same tensors every time.
Capture = Callable[[Callable[[], Tensors], Tensors], tuple[Replay, Tensors]]
KEPT_DRAWS = 4  # captured sampler draws a decode keeps (a server's requests may each bring their own)


@contextmanager
def side_stream(device: torch.device) -> Iterator[None]:
    """Run the block on a side stream of ``device`` that starts after the current stream's work, and
    make the current stream wait for it after: capture's warm-up must not run on the default stream.
    Elsewhere than on CUDA the block just runs."""
    side = torch.cuda.Stream(device) if device.type == "cuda" else None
    if side is not None:
        side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        yield
    if side is not None:
        torch.cuda.current_stream(device).wait_stream(side)


def cuda_capture() -> Capture:
    """Capture into CUDA graphs that share one memory pool (replayed in capture order)."""
    pool = torch.cuda.graph_pool_handle()

    def capture(fn: Callable[[], Tensors], like: Tensors) -> tuple[Replay, Tensors]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outputs = fn()
        return graph.replay, outputs

    return capture


class CudaGraphDecoder:
    """One decode step of ``network`` on ``state``, captured in segments; ``step(token)`` replays it.

    ``capture`` (tests): how a segment is recorded; by default CUDA graphs, which need the torch
    backend on a CUDA device."""

    def __init__(
        self,
        network: Qwen35MoeNetwork,
        state: SequenceState,
        capacity: int,
        *,
        split_every_layer: bool = False,
        capture: Capture | None = None,
    ) -> None:
        be: Any = network.backend
        device = getattr(be, "torch_device", None)
        if device is None or not hasattr(be, "device_positions") or (capture is None and device.type != "cuda"):
            raise FmoeError("CUDA graphs: need the torch backend on a CUDA device")
        if not state.position < capacity:
            raise FmoeError(f"CUDA graphs: the sequence is at position {state.position}, capacity is {capacity}")
        layers = network.config.num_hidden_layers
        whole = getattr(network.experts, "all_resident", None)
        # (routing replaced on the host, runtime/routing_trace.py, is captured only where it can be
        # handed over as an input of the step)
        routing_input = hasattr(be, "routing_from")
        split_every_layer = (
            split_every_layer
            or getattr(be, "moe_waits_on_device", False)
            or (getattr(be, "replaces_routing", False) and not routing_input)
        )
        self.cuts = [i for i in range(layers) if split_every_layer or whole is None or whole(i) is None]
        # routing inside the segments: they end at a cut with (x, h, ids, weights, shared_gate)
        self.routed = not split_every_layer
        self.network, self.capacity = network, capacity
        # weakly: a kept decode must not keep a finished sequence's buffers (its KV room) alive; it is
        # only replayed for a state that is (runtime/engine/runner.py matches it to the live state)
        self._state = weakref.ref(state)
        for layer in state.layers:
            if hasattr(layer, "reserve"):  # KV caches: full length now, nothing reallocates in a replay
                layer.reserve(capacity)
        # the step's inputs in one device tensor written by one copy a step: token id, position, a
        # sampler's uniform number (its float64 bits), which the captured draws read, and routing
        # replaced on the host (the next token's experts, [layers, k]), which the captured route reads
        k = network.top_k if routing_input else 0
        self._inputs = torch.zeros(3 + layers * k, dtype=torch.int64, device=device)
        self._host_inputs = torch.zeros(3 + layers * k, dtype=torch.int64, pin_memory=device.type == "cuda")
        self._ids, self._pos, self._u = self._inputs[:1], self._inputs[1], self._inputs[2:3].view(torch.float64)
        self._host_u = self._host_inputs[2:3].view(torch.float64)
        self._routing = self._inputs[3:].view(layers, k) if routing_input else None
        self._host_routing = self._host_inputs[3:].view(layers, k).numpy()
        # captured draws by sampler settings, the most recently used last (a few kept)
        self._draws: dict[tuple[float, int, float], tuple[Replay, Tensors]] = {}
        self._capture = capture
        self._inputs_read = torch.cuda.Event() if device.type == "cuda" else None  # the last copy done
        # launched steps' picks read into page-locked memory, two slots (a step may be queued before
        # the one before it is read), each with the event of its last read
        self._host_picks = [torch.zeros(2, dtype=torch.int64, pin_memory=device.type == "cuda") for _ in range(2)]
        self._picks_read = [torch.cuda.Event() if device.type == "cuda" else None for _ in range(2)]
        self._slot = 0
        self._last_pick: torch.Tensor | None = None  # what the last launched step picked, on the device
        self.collected_at = 0.0  # when a launched step's pick was last read (perf_counter; runner.py)
        self._pos.fill_(state.position)

        # Warm up on a copy of the state (compiles the Triton kernels, settles the allocator, gives
        # the segments' output shapes), on a side stream as capture requires; then capture, which
        # records kernels without running them, the experts stages left out.
        # One graph for the whole step (every expert resident): its kernels launch with programmatic
        # dependent launch (runtime/kernels/pdl.py), compiled so in the warm-up; cut steps launch plainly.
        whole_step = not self.cuts
        scratch = state.copy()
        with side_stream(device), be.device_positions(self._pos), pdl.launches(whole_step), self._routed_by_inputs():
            for _ in range(2):
                examples, moe = self._run_eagerly(scratch)
        del scratch
        capture = capture or cuda_capture()
        self._replays: list[Replay] = []
        self._outputs: list[Tensors] = []
        # each cut's experts stage: its result (read by the next segment), its graph and the routing
        # buffers that graph reads (None: the stage runs eagerly)
        self._moe_out: list[torch.Tensor] = []
        self._moe_graphs: list[ExpertsGraph | None] = []
        # (segments leave state.position alone)
        with be.device_positions(self._pos), pdl.launches(whole_step), self._routed_by_inputs():
            for s, like in enumerate(examples):
                replay, outputs = capture(self._segment_fn(s, state), like)
                self._replays.append(replay)
                self._outputs.append(outputs)
                if s < len(self.cuts):
                    graph = self._capture_experts(s, capture, moe[s])
                    self._moe_graphs.append(graph)
                    self._moe_out.append(torch.empty_like(moe[s]) if graph is None else graph[1][0])

    def step(self, token: int) -> torch.Tensor:
        """Run ``token`` at the sequence's position: its logits ``[1, vocab]`` on the device (the last
        graph's buffer, overwritten by the next step; ``pick`` holds their greedy pick)."""
        self._run(token)
        self._last_pick = None  # (a step of the last pick follows launched steps only)
        return self._outputs[-1][0]

    @property
    def can_follow(self) -> bool:
        """Whether a step of the last pick may be launched: the last step was launched, in one graph."""
        return not self.cuts and self._last_pick is not None

    def launch(self, token: int | None, pick: Pick = GREEDY) -> int:
        """Queue a step of ``token`` (None: the last launched step's pick, copied on the device, so
        this step may be queued before that pick is read), its ``pick`` (greedy: the one its graph
        makes; else the captured draw of the sampler's settings, replayed after it) and the read of
        the pick into page-locked memory; nothing waits for the device. Returns the slot
        :meth:`collect` reads. One graph for the whole step only (a cut step reads routing back in
        the middle)."""
        if token is None and not self.can_follow:
            raise FmoeError("CUDA graphs: a step of the last pick needs a step launched before, in one graph")
        self._run(token, 0.0 if pick.greedy else pick.u)
        if pick.greedy:
            picked = self.pick
        else:
            replay, (picked,) = self._draw(pick)
            replay()
        self._last_pick = picked
        slot = self._slot = 1 - self._slot  # two in flight: the step before may not be read yet
        read = self._picks_read[slot]
        if read is not None:
            read.synchronize()  # (read two steps ago: collected, or abandoned by its caller)
        self._host_picks[slot].copy_(picked, non_blocking=True)
        if read is not None:
            read.record()
        return slot

    def collect(self, slot: int) -> tuple[int, bool]:
        """The pick of the step :meth:`launch` queued into ``slot``: (token, every logit finite),
        once the device has written it."""
        read = self._picks_read[slot]
        if read is not None:
            read.synchronize()
        token, finite = self._host_picks[slot].tolist()
        return int(token), bool(finite)

    def _draw(self, pick: Pick) -> tuple[Replay, Tensors]:
        """The captured draw of ``pick``'s sampler settings from the last graph's logits and the
        step's uniform number (captured at first use; a few settings kept): the backend's
        ``sample_pick`` in torch ops over the whole vocabulary. Replayed, the draw's twenty-odd
        small kernels cost one launch, and the next step can be queued on its result."""
        from fmoe.runtime.backends.torch_backend import sample_pick_tensors

        p = pick.params
        key = (p.temperature, p.top_k, p.top_p)
        graph = self._draws.pop(key, None)
        if graph is None:
            logits = self._outputs[-1][0]

            def draw() -> Tensors:
                return (sample_pick_tensors(logits, p.temperature, p.top_k, p.top_p, self._u),)

            with side_stream(logits.device):  # (warm-up: whatever the ops set up on first use)
                like = draw()
            # its own memory pool: replayed after the step's graphs, in no fixed order among draws
            graph = (self._capture or cuda_capture())(draw, like)
            if len(self._draws) >= KEPT_DRAWS:
                del self._draws[next(iter(self._draws))]
        self._draws[key] = graph
        return graph

    def _run(self, token: int | None, u: float = 0.0) -> None:
        st = self._state()
        if st is None:
            raise FmoeError("CUDA graphs: the sequence this decode was captured for is gone")
        if st.position >= self.capacity:
            raise FmoeError(f"CUDA graphs: the sequence reached its capacity of {self.capacity} positions")
        if self._inputs_read is not None:
            self._inputs_read.synchronize()  # the previous step's copy has read the page-locked inputs
        self._host_inputs[0], self._host_inputs[1] = token or 0, st.position
        self._host_u[0] = u
        if self._routing is not None:
            self._host_routing[:] = self.network.backend.next_token_routing(self.network.top_k)
        self._inputs.copy_(self._host_inputs, non_blocking=True)  # one copy, queued: nothing waits here
        if token is None:  # the last launched step's pick (before this step's graph overwrites its own)
            self._ids.copy_(self._last_pick[:1])  # type: ignore[index]
        if self._inputs_read is not None:
            self._inputs_read.record()
        with self._routed_by_inputs():  # (what a capture that reruns the segments, as the tests', needs)
            for s, layer in enumerate(self.cuts):
                self._replays[s]()
                if self._moe_graphs[s] is None:
                    self._moe_out[s].copy_(self._experts_eagerly(s))
                else:
                    self._experts_stage(s, layer)
            self._replays[-1]()
        st.position += 1
        for layer_state in st.layers:
            if hasattr(layer_state, "reserve"):
                layer_state.length = st.position  # the keys and values written so far are valid

    def _routed_by_inputs(self) -> AbstractContextManager[None]:
        """Where routing is replaced on the host: the route of one-token passes reads the step's
        routing input (runtime/routing_trace.py); else nothing."""
        if self._routing is None:
            return nullcontext()
        return self.network.backend.routing_from(self._routing)

    @property
    def pick(self) -> torch.Tensor:
        """The last step's greedy pick (the backend's ``greedy_pick`` of its logits), on the device."""
        return self._outputs[-1][1]

    # ---- experts stages ---------------------------------------------------------------------------
    def _layer_part(self, layer: int) -> ExpertPart | None:
        """The part a captured experts stage of ``layer`` computes over: every expert when all are
        resident, else the device tier's slot map of the layer (None: no such tier)."""
        provider = self.network.experts
        whole = getattr(provider, "all_resident", None)
        part = whole(layer) if whole is not None else None
        if part is None and hasattr(provider, "slot_map"):
            none = np.zeros(0, dtype=np.int64)
            part = ExpertPart(provider.table, none, none, provider.slot_map(layer))
        return part

    def _capture_experts(self, s: int, capture: Capture, like: torch.Tensor) -> ExpertsGraph | None:
        """Capture cut ``s``'s experts kernels over its layer's part, reading the routing from fixed
        buffers: the replay, (its output, ids, weights) and that part; None where they cannot be
        (kernels that read back, no device tier)."""
        net, be = self.network, self.network.backend
        part = self._layer_part(self.cuts[s])
        if part is None or getattr(be, "moe_waits_on_device", False) or not hasattr(be, "moe_on_device"):
            return None
        h, shared = self._outputs[s][1], net.shared_expert(self.cuts[s], self._outputs[s][-1])
        if self.routed:  # the segment's own routing buffers
            routing = self._outputs[s][2], self._outputs[s][3]
        else:  # buffers the eager routing is copied into (not shaped by a route call: a replay counts them)
            pairs = (h.shape[0], net.top_k)
            routing = (
                torch.zeros(pairs, dtype=torch.int64, device=h.device),
                torch.zeros(pairs, dtype=torch.float32, device=h.device),
            )
        replay, outputs = capture(lambda: (be.moe_on_device(h, *routing, part, shared),), (like,))
        return replay, (outputs[0], *routing), part

    def _experts_stage(self, s: int, layer: int) -> None:
        """Cut ``s``'s experts stage into its output buffer: the model's own stage (routing's
        read-back, the tier's bookkeeping and copies; with routing replaced on the host, that routing
        first, copied into the graph's buffers) with the captured kernels as its compute, then any
        misses the tier left to the host."""
        net, be = self.network, self.network.backend
        replay, (out, ids, weights), captured = self._moe_graphs[s]  # type: ignore[misc]
        h, shared_gate = self._outputs[s][1], self._outputs[s][-1]
        if not self.routed:
            fresh = be.route(self._outputs[s][2], net.top_k)
            ids.copy_(fresh[0])
            weights.copy_(fresh[1])

        def replayed(_h: Any, _ids: Any, _weights: Any, given: Iterable[ExpertPart], _shared: Any) -> torch.Tensor:
            parts = iter(given)
            part = next(parts)
            if part.device_slots is None or part.device_slots.data_ptr() != captured.device_slots.data_ptr():
                raise FmoeError(f"CUDA graphs: layer {layer}'s experts came without the slot map captured over")
            replay()
            return be.add_host_share(out, h, ids, weights, parts)  # in place

        net.routed_experts(layer, h, ids, weights, shared_gate, moe=replayed)

    # ---- segments --------------------------------------------------------------------------------
    def _segment(self, s: int, state: SequenceState, prev: Sequence[torch.Tensor], moe_out: Any) -> Tensors:
        """Segment ``s``: from the token (s = 0) or the previous cut's experts output ``moe_out`` (with
        ``prev``, the previous segment's outputs) to the next cut's ``(x, h, ids, weights, shared_gate)``
        (``routed``; else ``(x, h, router_logits, shared_gate)``), or to ``(logits, greedy pick)`` after
        the last layer."""
        net = self.network
        layers = net.config.num_hidden_layers
        start = state.position  # (attention reads the device scalar inside device_positions)
        if s == 0:
            x, h = net.begin(self._ids)
            layer = 0
        else:
            layer = self.cuts[s - 1]
            x, h = net.layer_back(layer, prev[0], moe_out, last_only=True)
            layer += 1
        while layer < layers:
            x, h, router_logits, shared_gate = net.layer_front(layer, x, h, state, start)
            if layer in self.cuts:
                if self.routed:
                    return x, h, *net.backend.route(router_logits, net.top_k), shared_gate
                return x, h, router_logits, shared_gate
            y = net.layer_experts(layer, h, router_logits, shared_gate)
            x, h = net.layer_back(layer, x, y, last_only=True)
            layer += 1
        logits = net.head(h)
        return logits, net.backend.greedy_pick(logits)  # (a greedy step reads the pick alone)

    def _run_eagerly(self, state: SequenceState) -> tuple[list[Tensors], list[torch.Tensor]]:
        """The whole step as it will be replayed, launched op by op: every segment's outputs and
        every experts stage's."""
        outputs: list[Tensors] = []
        moe: list[torch.Tensor] = []
        for s in range(len(self.cuts) + 1):
            outputs.append(self._segment(s, state, outputs[-1] if outputs else (), moe[-1] if moe else None))
            if s < len(self.cuts):
                moe.append(self._experts_eagerly(s, outputs[-1]))
        return outputs, moe

    def _experts_eagerly(self, s: int, outputs: Tensors | None = None) -> torch.Tensor:
        """Cut ``s``'s experts stage op by op, on ``outputs`` (default: its segment's captured ones)."""
        net = self.network
        layer = self.cuts[s]
        out = self._outputs[s] if outputs is None else outputs
        if self.routed:
            _, h, ids, weights, shared_gate = out
            return net.routed_experts(layer, h, ids, weights, shared_gate)
        _, h, router_logits, shared_gate = out
        return net.layer_experts(layer, h, router_logits, shared_gate)

    def _segment_fn(self, s: int, state: SequenceState) -> Callable[[], Tensors]:
        prev = self._outputs[s - 1] if s else ()
        moe_out = self._moe_out[s - 1] if s else None
        return lambda: self._segment(s, state, prev, moe_out)
