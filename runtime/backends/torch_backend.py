"""Torch backend: the model's ops in plain torch, on the CPU or a CUDA device (extra ``fmoe[cuda]``).

Activations are float32. Float weights become float32 tensors on the device, the embedding table
stays bf16, and affine-quantised matrices stay packed on the device (:class:`TorchQuant`). Two kernel
sets: "triton" (the default on CUDA) dequantises inside fused matvecs and expert kernels
(runtime/kernels/triton_moe.py) and runs each glue op (norms, the DeltaNet's conv, inputs and
recurrence, routing, gates) as one kernel (runtime/kernels/triton_ops.py); "torch" dequantises a
block of rows at a time inside each matmul and composes the glue from torch ops (any device; the
reference path). Expert parts come from host memory (copied to the device per part) or, with a
device expert tier (runtime/experts/device.py), already on the device: then routing maps to slots
there, and with every expert resident a decode step can be captured as a CUDA graph
(``device_positions``; runtime/engine/cuda_graph.py).
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fmoe.errors import FmoeError
from fmoe.formats.packed import EXPERT_PROJECTIONS, ExpertLayout
from fmoe.formats.quant import QuantTensor
from fmoe.runtime.backends.base import Backend, Rotary, SharedExpert, sample_pick_host, shared_output
from fmoe.runtime.experts.slots import DeviceSlots, ExpertPart
from fmoe.runtime.state import LinearState
from fmoe.runtime.text.sampling import draw
from fmoe.runtime.timing import PhaseProfile, PhaseTimer, WallTimer
from fmoe.runtime.weights import ModelWeights

L2NORM_EPS = 1e-6  # the q/k l2norm epsilon of the reference DeltaNet
_DEQUANT_BLOCK = 1 << 24  # weights dequantised per step of a quantised matmul (64 MiB of float32)
_DEVICE_MATVEC_PAIRS = 64  # (token, choice) pairs up to which device experts run as matvecs, GEMMs above


@dataclass(frozen=True)
class TorchQuant:
    """An affine-quantised matrix on the device, in fmoe's packed format (fmoe/formats/quant.py):
    codes as int32 words ``[..., out, in * bits / 32]`` (low bits first), bf16 scales and biases."""

    weight: torch.Tensor
    scales: torch.Tensor
    biases: torch.Tensor
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.weight.shape[:-1], self.weight.shape[-1] * 32 // self.bits)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.scales, self.biases))

    def rows(self, index: Any) -> TorchQuant:
        return TorchQuant(self.weight[index], self.scales[index], self.biases[index], self.bits, self.group_size)

    def dequantize(self) -> torch.Tensor:
        """float32 ``scale * q + bias`` (exact, as the numpy reference)."""
        per = 32 // self.bits
        shifts = torch.arange(per, device=self.weight.device, dtype=torch.int32) * self.bits
        # arithmetic shifts on int32 sign-extend; the mask keeps only the code's own bits
        q = (self.weight.unsqueeze(-1) >> shifts) & ((1 << self.bits) - 1)
        q = q.reshape(*self.weight.shape[:-1], -1, self.group_size).float()
        w = q * self.scales.float().unsqueeze(-1) + self.biases.float().unsqueeze(-1)
        return w.reshape(self.shape)


class TorchKVCache:
    """Keys and values of one attention layer, ``[Hkv, capacity, D]``, grown by doubling."""

    def __init__(self, kv_heads: int, head_dim: int, device: torch.device) -> None:
        self.length = 0
        self.k = torch.zeros((kv_heads, 0, head_dim), dtype=torch.float32, device=device)
        self.v = torch.zeros_like(self.k)

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * 4

    def reserve(self, capacity: int) -> None:
        """Room for ``capacity`` positions (zeros past ``length``), so appends up to it never reallocate."""
        if capacity > self.k.shape[1]:
            for name in ("k", "v"):
                old = getattr(self, name)
                new = old.new_zeros((old.shape[0], capacity, old.shape[2]))
                new[:, : self.length] = old[:, : self.length]
                setattr(self, name, new)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        need = self.length + k.shape[0]
        if need > self.k.shape[1]:
            self.reserve(max(need, 2 * self.k.shape[1], 16))
        self.k[:, self.length : need] = k.transpose(0, 1)
        self.v[:, self.length : need] = v.transpose(0, 1)
        self.length = need


_PINNED_COPY_BYTES = 64 << 20  # to_numpy's reads through page-locked memory: up to this size
# attention scores of a prompt's later chunk held at once: a 2048-token chunk of the 397B (32 query
# heads) at 32k positions would hold 8.6 GB of them (twice, with the softmax) on a GPU the model fills
_SCORES_BYTES = 512 << 20


class CudaTimer:
    """A PhaseTimer of CUDA events: each mark is recorded in the stream, so phases are device time."""

    def __init__(self, profile: PhaseProfile) -> None:
        self.profile = profile
        self.start = torch.cuda.Event(enable_timing=True)
        self.start.record()
        self.marks: list[tuple[int, str, torch.cuda.Event]] = []

    def mark(self, layer: int, phase: str) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self.marks.append((layer, phase, event))

    def finish(self) -> None:
        if not self.marks:
            return
        self.marks[-1][2].synchronize()
        prev = self.start
        for layer, phase, event in self.marks:
            self.profile.add(layer, phase, prev.elapsed_time(event) / 1e3)
            prev = event
        self.marks.clear()


class TorchBackend:
    """The Backend contract in torch (runtime/backends/base.py has the op contracts)."""

    name = "torch"

    def __init__(
        self, device: str | None = None, threads: int | None = None, kernels: str | None = None, int8: bool = False
    ) -> None:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError):
            raise FmoeError(f"--device {device!r}: not a torch device (cpu, cuda, cuda:N)") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise FmoeError(f"--device {device}: torch sees no CUDA device")
        if dev.type not in ("cpu", "cuda"):
            raise FmoeError(f"--device {device}: the torch backend runs on cpu or cuda")
        self.torch_device = dev
        self.device = str(dev)
        if threads is not None:  # intra-op threads of torch's CPU kernels (process-wide)
            if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
                raise FmoeError(f"--threads {threads!r}: must be a whole number >= 1")
            torch.set_num_threads(threads)
        # "triton": fused dequantise + matvec kernels (runtime/kernels/triton_moe.py; the default on
        # CUDA); "torch": dequantise then matmul in plain torch (any device; the reference path)
        if kernels is None:
            kernels = "triton" if dev.type == "cuda" and importlib.util.find_spec("triton") else "torch"
        if kernels not in ("triton", "torch"):
            raise FmoeError(f"kernels {kernels!r}: must be triton or torch")
        if kernels == "triton" and importlib.util.find_spec("triton") is None:
            raise FmoeError("kernels triton: needs the triton package (pip install 'fmoe[cuda]')")
        self.kernels = kernels
        fused = kernels == "triton"
        self._triton: Any = importlib.import_module("fmoe.runtime.kernels.triton_moe") if fused else None
        # --int8-dot: decode's matvecs on int8 activations (runtime/kernels/triton_int8.py)
        if int8 and not fused:
            raise FmoeError("--int8-dot: the torch backend's int8 matvecs are Triton kernels (on a CUDA device)")
        self.int8 = int8
        self._ops: Any = importlib.import_module("fmoe.runtime.kernels.triton_ops") if fused else None
        self._attention: Any = importlib.import_module("fmoe.runtime.kernels.triton_attention") if fused else None
        self._offsets: dict[int, Any] = {}  # id(layout) -> the Triton kernels' ExpertOffsets
        self._format_slabs: dict[int, torch.Tensor] = {}  # file size -> a placeholder slab (_format_slab)
        # the plain-torch experts over a device slab read slot ids back to the host: on a GPU that
        # waits for it, so a CUDA graph cannot hold them (runtime/engine/cuda_graph.py)
        self.moe_waits_on_device = not fused and dev.type == "cuda"
        self._positions: torch.Tensor | None = None  # see device_positions
        # a device expert tier's host share (runtime/experts/device.py): the CPU backend's kernels,
        # made on first use, with ``threads`` threads
        self._host: Any = None
        self._host_threads = threads
        self._readback_stream: torch.cuda.Stream | None = None
        self._rotary_cache: dict[Rotary, torch.Tensor] = {}
        # input width -> (bits, group size) in which the ops whose result a matvec of that width reads
        # (the norms, the attention's output gate) also hand it over as the matvecs' input
        # (triton_moe.rms_norm_prepared and its kin); set by prepare()
        self._input_formats: dict[int, tuple[int, int]] = {}

    @property
    def kernels_in_use(self) -> str:
        """What runs the decode kernels, for reports: with ``--int8-dot`` on a GPU where they compile,
        the CUDA C matvecs and experts (runtime/kernels/cuda_kernels.py) beside Triton."""
        if self.int8 and self.torch_device.type == "cuda":
            from fmoe.runtime.kernels import cuda_kernels

            if cuda_kernels.available(self.torch_device) and not cuda_kernels.failed():
                return f"{self.kernels} + CUDA C"
        return self.kernels

    @contextlib.contextmanager
    def device_positions(self, position: torch.Tensor) -> Iterator[None]:
        """Inside the block, attention takes the sequence position from ``position`` (an int64
        scalar on the device) instead of the host's ``start``: RoPE is computed on the device, keys
        and values are written at that position of KV caches reserved to their full length, and
        attention masks the rest. What a captured CUDA graph needs: one graph for every position."""
        self._positions = position
        try:
            yield
        finally:
            self._positions = None

    # ---- arrays, weights, state, time ---------------------------------------------------------
    def asarray(self, x: np.ndarray) -> torch.Tensor:
        x = np.ascontiguousarray(x)
        return self._tensor(x.astype(np.float32, copy=False) if x.dtype.kind == "f" else x)

    def to_numpy(self, x: torch.Tensor) -> np.ndarray:
        if x.device.type != "cuda" or x.numel() * x.element_size() > _PINNED_COPY_BYTES:
            return x.detach().to("cpu").numpy()
        # through page-locked memory (torch's cached host blocks): a decode step's logits (1 MB on a
        # 248k vocabulary) cross at the link's rate instead of through the driver's pageable staging
        # (60-85 us less a token on an H200, docs/PERFORMANCE.md twentieth pass); large reads (every
        # prompt position's logits) stay pageable, so as not to pin gigabytes in torch's host cache
        host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        host.copy_(x.detach(), non_blocking=True)
        torch.cuda.current_stream(x.device).synchronize()
        return host.numpy()

    def weight(self, tensor: Any) -> Any:
        """Float32 arrays as float32 tensors, bf16 bits as bf16, QuantTensor as TorchQuant, on the device."""
        if isinstance(tensor, QuantTensor):
            return self._quant(tensor.weight, tensor.scales, tensor.biases, tensor.bits, tensor.group_size)
        if tensor.dtype == np.uint16:  # bf16 bit patterns
            return self._tensor(np.ascontiguousarray(tensor).view(np.int16)).view(torch.bfloat16)
        return self._tensor(np.ascontiguousarray(tensor, dtype=np.float32))

    def prepare(self, weights: ModelWeights) -> ModelWeights:
        prepared = weights.map(self.weight)
        if self._triton is not None:  # per input width, the most common format of its matrices
            formats: dict[int, Counter[tuple[int, int]]] = {}
            for w in prepared.tensors():
                if isinstance(w, TorchQuant):
                    formats.setdefault(w.shape[1], Counter())[(w.bits, w.group_size)] += 1
            self._input_formats = {n: c.most_common(1)[0][0] for n, c in formats.items()}
        return prepared

    def new_linear_state(self, conv_shape: tuple[int, int], recurrent_shape: tuple[int, int, int]) -> LinearState:
        zeros = lambda shape: torch.zeros(shape, dtype=torch.float32, device=self.torch_device)  # noqa: E731
        return LinearState(zeros(conv_shape), zeros(recurrent_shape))

    def new_kv_cache(self, kv_heads: int, head_dim: int) -> TorchKVCache:
        return TorchKVCache(kv_heads, head_dim, self.torch_device)

    def timer(self, profile: PhaseProfile) -> PhaseTimer:
        return CudaTimer(profile) if self.torch_device.type == "cuda" else WallTimer(profile)

    def warmup(self) -> None:
        pass  # nothing is compiled ahead

    # ---- dense ops ----------------------------------------------------------------------------
    def embed(self, table: Any, ids: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(ids, torch.Tensor):  # already on the device (a CUDA graph's input)
            index = ids
        else:
            index = self._upload(np.asarray(ids, dtype=np.int64))
        if isinstance(table, TorchQuant):
            if self._triton is not None:
                return self._triton.embed_rows(table, index)
            return table.rows(index).dequantize()
        return table[index].float()

    def linear(self, x: torch.Tensor, w: Any) -> torch.Tensor:
        if not isinstance(w, TorchQuant):
            return x @ w.T
        if self._triton is not None:
            return self._triton.qmatvec(x.contiguous(), w, int8=self.int8)
        n_out, n_in = w.shape
        step = max(1, _DEQUANT_BLOCK // n_in)
        if step >= n_out:
            return x @ w.dequantize().T
        return torch.cat([x @ w.rows(slice(lo, lo + step)).dequantize().T for lo in range(0, n_out, step)], dim=-1)

    def linears(self, x: torch.Tensor, ws: Sequence[Any]) -> list[torch.Tensor]:
        # one prepared input and launch when every matrix is quantised in one format (triton_moe.qmatvecs)
        if self._triton is not None and all(isinstance(w, TorchQuant) for w in ws):
            formats = {(w.shape[1], w.bits, w.group_size) for w in ws}
            if len(formats) == 1:
                return self._triton.qmatvecs(x.contiguous(), list(ws), int8=self.int8)
        return [self.linear(x, w) for w in ws]

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if self._ops is not None:
            return self._fused_norm(x, weight, eps, None)[1]
        return x * torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + eps) * weight

    def add_rms_norm(
        self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._ops is not None:
            return self._fused_norm(x, weight, eps, y)
        s = x + y
        return s, self.rms_norm(s, weight, eps)

    def _fused_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden-state rows normed with their matvec input prepared in the same launch; other
        shapes (per-head q/k norms) by the plain norm kernel."""
        fmt = self._handover_format(x)
        if fmt is not None and x.is_contiguous():
            return self._triton.rms_norm_prepared(x, weight, eps, *fmt, residual=residual, int8=self.int8)
        return self._ops.rms_norm(x, weight, eps, residual=residual)

    def _handover_format(self, rows: torch.Tensor) -> tuple[int, int] | None:
        """The format in which an op producing the 2-D ``rows`` hands them over as a matvec's input:
        that of the matrices of their width, when they are whole groups of it."""
        fmt = self._input_formats.get(rows.shape[-1]) if rows.dim() == 2 else None
        return fmt if fmt is not None and rows.shape[1] % fmt[1] == 0 else None

    def swiglu(self, x: torch.Tensor, gate: Any, up: Any, down: Any) -> torch.Tensor:
        if self._triton is not None and _one_format(gate, up):  # gate and up in one launch, any length
            return self.linear(self._triton.dense_gate_up(x.contiguous(), gate, up, self.int8), down)
        return self.linear(torch.nn.functional.silu(self.linear(x, gate)) * self.linear(x, up), down)

    def sigmoid_gate(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        if self._ops is not None:
            fmt = self._handover_format(x)
            if fmt is not None and gate.shape == x.shape:  # the attention's gate: o_proj's input handed over
                return self._triton.sigmoid_gate_prepared(x, gate, *fmt, int8=self.int8)
            return self._ops.sigmoid_gate(x, gate)
        return x * torch.sigmoid(gate)

    # ---- Gated DeltaNet -----------------------------------------------------------------------
    def causal_conv1d(
        self, x: torch.Tensor, weight: torch.Tensor, conv_state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._ops is not None:
            return self._ops.causal_conv(x, weight, conv_state), conv_state
        t, width = x.shape[0], weight.shape[1]
        full = torch.cat([conv_state, x], dim=0)  # [K-1+T, C]
        out = full[0:t] * weight[:, 0]
        for j in range(1, width):
            out = out + full[j : j + t] * weight[:, j]
        conv_state.copy_(full[t:])  # in place: a captured CUDA graph keeps reading the same buffer
        return torch.nn.functional.silu(out), conv_state

    def delta_rule_inputs(
        self,
        qkv: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        A_log: torch.Tensor,
        dt_bias: torch.Tensor,
        heads: tuple[int, int, int, int],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._ops is not None:
            return self._ops.delta_rule_inputs(qkv, a, b, A_log.float(), dt_bias, heads)
        hk, dk, hv, dv = heads
        t, kd = qkv.shape[0], hk * dk
        q = _l2_normalize(qkv[:, :kd].reshape(t, hk, dk)) * dk**-0.5
        k = _l2_normalize(qkv[:, kd : 2 * kd].reshape(t, hk, dk))
        v = qkv[:, 2 * kd :].reshape(t, hv, dv)
        g = -torch.exp(A_log.float()) * torch.logaddexp(torch.zeros_like(a), a + dt_bias)  # log decay <= 0
        return q, k, v, g, torch.sigmoid(b)

    def gated_delta_rule(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        g: torch.Tensor,
        beta: torch.Tensor,
        state: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._ops is not None:
            return self._ops.gated_delta_rule(q, k, v, g, beta, state), state
        rep = v.shape[1] // k.shape[1]
        q, k = q.repeat_interleave(rep, dim=1), k.repeat_interleave(rep, dim=1)  # value head j reads key head j // rep
        out = torch.empty_like(v)
        s = state
        for t in range(v.shape[0]):
            s = s * torch.exp(g[t])[:, None, None]
            kv = torch.einsum("hij,hi->hj", s, k[t])
            delta = (v[t] - kv) * beta[t][:, None]
            s = s + k[t][:, :, None] * delta[:, None, :]
            out[t] = torch.einsum("hij,hi->hj", s, q[t])
        state.copy_(s)  # in place, as the conv state
        return out, state

    def delta_net(
        self,
        qkv: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        z: torch.Tensor,
        A_log: torch.Tensor,
        dt_bias: torch.Tensor,
        norm: torch.Tensor,
        eps: float,
        heads: tuple[int, int, int, int],
        state: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._ops is None:
            q, k, v, g, beta = self.delta_rule_inputs(qkv, a, b, A_log, dt_bias, heads)
            o, state = self.gated_delta_rule(q, k, v, g, beta, state)
            return self.gated_rms_norm(o, norm, z, eps), state
        fmt = self._handover_format(z)
        if self.int8 and fmt is not None:  # the recurrence, the norm and out_proj's int8 input: one launch
            return self._triton.delta_rule_int8(
                qkv, a, b, A_log.float(), dt_bias, heads, state, z, norm, eps, *fmt
            ), state
        o = self._ops.delta_rule(qkv, a, b, A_log.float(), dt_bias, heads, state)  # the inputs made inside it
        return self.gated_rms_norm(o, norm, z, eps), state

    def gated_rms_norm(self, x: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor, eps: float) -> torch.Tensor:
        if self._ops is not None:
            fmt = self._handover_format(gate)
            if fmt is not None and gate.shape[1] == x.shape[1] * x.shape[2]:  # out_proj's input handed over
                return self._triton.gated_rms_norm_prepared(x, weight, gate, eps, *fmt, int8=self.int8)
            return self._ops.rms_norm(x, weight, eps, gate=gate)[1].reshape(x.shape[0], -1)
        out = self.rms_norm(x, weight, eps) * torch.nn.functional.silu(gate.reshape(x.shape))
        return out.reshape(x.shape[0], -1)

    # ---- attention ----------------------------------------------------------------------------
    def attention_inputs(
        self,
        qg: torch.Tensor,
        k: torch.Tensor,
        q_norm: torch.Tensor,
        k_norm: torch.Tensor,
        start: int,
        rotary: Rotary,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t, d = qg.shape[0], q_norm.shape[0]
        qg = qg.reshape(t, -1, 2 * d)
        gate = qg[..., d:].reshape(t, -1)
        # the rotary tables computed on the device in float64 (Rotary.tables' formula): nothing to upload,
        # so nothing holds the host or keeps a pass out of a CUDA graph
        if self._positions is None:
            pos = torch.arange(start, start + t, dtype=torch.float64, device=qg.device)
        else:  # positions on the device (decode replayed from a CUDA graph)
            pos = (self._positions + torch.arange(t, device=qg.device)).double()
        freqs = pos[:, None] * self._inv_freq(rotary)[None, :]
        cos, sin = freqs.cos().float(), freqs.sin().float()
        k = k.reshape(t, -1, d)
        if self._ops is not None:  # norm and rotation in one launch each; the strided query rows read in place
            return (
                self._ops.norm_rope(qg[..., :d], q_norm, eps, cos, sin),
                gate,
                self._ops.norm_rope(k, k_norm, eps, cos, sin),
            )
        cos, sin = cos[:, None, :], sin[:, None, :]
        return (
            _rotate(self.rms_norm(qg[..., :d], q_norm, eps), cos, sin),
            gate,
            _rotate(self.rms_norm(k, k_norm, eps), cos, sin),
        )

    def attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: TorchKVCache, start: int, scale: float
    ) -> tuple[torch.Tensor, TorchKVCache]:
        t, hq, d = q.shape
        first: int | torch.Tensor = start
        if self._positions is None:
            cache.append(k, v.reshape(t, -1, d))
            length = cache.length
        else:  # CUDA graph replay: write at the device position (the reserved cache never moves)
            rows = self._positions + torch.arange(t, device=q.device)
            cache.k.index_copy_(1, rows, k.transpose(0, 1))
            cache.v.index_copy_(1, rows, v.reshape(t, -1, d).transpose(0, 1))
            length, first = cache.k.shape[1], self._positions
        if self._attention is not None and t <= self._attention.MAX_ROWS:  # decode: the positions written only
            o = self._attention.decode_attention(q.contiguous(), cache.k, cache.v, first, scale)
            return o, cache
        keys, values = cache.k[:, :length], cache.v[:, :length]
        if self._positions is None and start == 0:  # (then the cache holds exactly these t positions)
            # a sequence's first chunk: plainly causal, which SDPA's fused kernels take (not with GQA
            # in float32: the key and value heads repeated for them; an H200, 32 x 512 x 256: 215 us
            # against 375 us for the mask and the scores in memory)
            group = hq // keys.shape[0]
            o = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(0, 1)[None], keys.repeat_interleave(group, 0)[None],
                values.repeat_interleave(group, 0)[None], is_causal=True, scale=scale,
            )  # fmt: skip
        else:  # a later chunk: the query rows in blocks whose scores stay within _SCORES_BYTES
            block = max(1, _SCORES_BYTES // (4 * hq * length))  # (SDPA's math path holds them with a mask)
            positions, parts = torch.arange(length, device=q.device)[None, :], []
            for r0 in range(0, t, block):
                visible = positions <= first + torch.arange(r0, min(t, r0 + block), device=q.device)[:, None]
                parts.append(
                    torch.nn.functional.scaled_dot_product_attention(
                        q[r0 : r0 + block].transpose(0, 1)[None], keys[None], values[None], attn_mask=visible,
                        scale=scale, enable_gqa=True,
                    )  # [1, Hq, rows, D]; q head h reads kv head h // (Hq // Hkv)
                )  # fmt: skip
            o = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        return o[0].transpose(0, 1).reshape(t, hq * d), cache

    # ---- mixture of experts -------------------------------------------------------------------
    def route(self, logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._ops is not None:
            return self._ops.route(logits.float(), k)
        probs = torch.softmax(logits.float(), dim=-1)
        w, ids = torch.topk(probs, k, dim=-1)
        return ids, w / w.sum(dim=-1, keepdim=True)

    def expert_ids(self, ids: torch.Tensor) -> np.ndarray:
        return np.unique(ids.to("cpu").numpy()).astype(np.int64, copy=False)  # a few ids: no device sort

    def greedy_pick(self, logits: torch.Tensor) -> torch.Tensor:
        # (torch.argmax, like numpy's, takes the first of equal maxima; it also holds in a CUDA graph)
        return torch.stack((logits[-1].argmax(), torch.isfinite(logits).all().to(torch.int64)))

    def sample_pick(self, logits: torch.Tensor, temperature: float, top_k: int, top_p: float, u: float) -> torch.Tensor:
        if logits.device.type == "cpu":  # on the host already: the host sampler (no whole-vocabulary sort)
            return torch.from_numpy(sample_pick_host(logits.numpy(), temperature, top_k, top_p, u))
        if top_k > 0 and top_k + TOP_K_MARGIN < logits.shape[-1]:  # a few candidates: their draw on the host
            picked = sample_pick_top_k(logits, temperature, top_k, top_p, u, self.to_numpy)
            if picked is not None:
                return torch.from_numpy(picked)
        return sample_pick_tensors(logits, temperature, top_k, top_p, u)

    def moe(
        self,
        x: torch.Tensor,
        ids: torch.Tensor,
        weights: torch.Tensor,
        parts: Iterable[ExpertPart],
        shared: torch.Tensor | SharedExpert,
    ) -> torch.Tensor:
        parts = iter(parts)
        first = next(parts, None)
        if first is not None and isinstance(first.table, DeviceSlots):
            out = self.moe_on_device(x, ids, weights, first, shared)
            return self.add_host_share(out, x, ids, weights, parts)
        shared = shared_output(self, x, shared)
        t, k = ids.shape
        y = x.new_zeros((t, k, x.shape[1]))  # one row per (token, choice), summed in choice order below
        done = torch.zeros((t, k), dtype=torch.bool, device=x.device)
        for part in itertools.chain([] if first is None else [first], parts):
            table = self._upload_part(part)
            for i, e in enumerate(part.ids.tolist()):
                rows, choice = torch.nonzero(ids == e, as_tuple=True)
                if rows.numel():
                    y[rows, choice] = self.swiglu(x[rows], *(q.rows(i) for q in table))
                    done[rows, choice] = True
        if not bool(done.all()):
            raise FmoeError("expert store: an expert was routed to but never made resident")
        out = shared.clone()
        for j in range(k):
            out = out + weights[:, j, None] * y[:, j]
        return out

    def add_host_share(
        self, out: torch.Tensor, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, parts: Iterable[ExpertPart]
    ) -> torch.Tensor:
        """``out`` plus the experts of host ``parts`` (the misses a device tier left on the host, after
        its device part), computed by the CPU backend's kernels from where they lie while the device
        copies and computes the rest; ``out`` itself when there are none."""
        total: np.ndarray | None = None
        for part in parts:  # each computed before the next is asked for: the provider may reuse its rows
            if isinstance(part.table, DeviceSlots):
                raise FmoeError("device experts: the provider must hand every expert on the device in one part")
            if total is None:
                if self._host is None:
                    from fmoe.runtime.backends.cpu import CpuBackend

                    self._host = CpuBackend(threads=self._host_threads)
                self._host.use_threads()
                xh, ih, wh = self._read_back(part.ready, x, ids, weights)
            y = self._host.moe_partial(xh, ih, wh, [part])
            total = y if total is None else total + y
        if total is None:
            return out
        if self.torch_device.type == "cuda":  # through page-locked memory: the upload does not wait
            staged = torch.empty(total.shape, dtype=torch.float32, pin_memory=True)
            staged.numpy()[...] = total
            return out.add_(staged.to(self.torch_device, non_blocking=True))
        return out.add_(torch.from_numpy(total))

    def _read_back(self, ready: Any, *tensors: torch.Tensor) -> list[np.ndarray]:
        """``tensors`` on the host. On CUDA on a stream of their own, after the ``ready`` event: not
        behind the work queued since (copies of misses, kernels), which the host's share runs beside."""
        if ready is None or self.torch_device.type != "cuda":
            return [t.detach().cpu().numpy() for t in tensors]
        if self._readback_stream is None:
            self._readback_stream = torch.cuda.Stream(self.torch_device)
        stream = self._readback_stream
        with torch.cuda.stream(stream):
            stream.wait_event(ready)
            host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for h, t in zip(host, tensors, strict=True):
                h.copy_(t, non_blocking=True)
        stream.synchronize()
        return [h.numpy() for h in host]

    def moe_on_device(
        self,
        x: torch.Tensor,
        ids: torch.Tensor,
        weights: torch.Tensor,
        part: ExpertPart,
        shared: torch.Tensor | SharedExpert,
    ) -> torch.Tensor:
        """Experts resident in a device slab: routing maps to slots on the device (nothing read
        back), then the fused kernels; the torch path decodes each slot's matrices from the slab.
        Experts whose slot is -1 (left on the host) add nothing here; slots <= -2 are rows of the
        table's host slab, read in place over the link (runtime/experts/placed.py). With the fused kernels
        nothing is read back, so a CUDA graph can hold it (``moe_waits_on_device`` False). In decode,
        a shared expert in the experts' format is one more pair of the same two launches. Host rows of
        another width (``--host-bits``): the device slots' experts first, then the host rows' added to
        their output by the kernels of that width. A part with ``cocompute`` hands some host-homed
        experts of a decode token to the host's workers and adds their sum (cocompute_device.py)."""
        table = part.table
        assert isinstance(table, DeviceSlots)
        if part.routed_counts is not None:  # the provider follows the routing from this counter
            flat = ids.reshape(-1)
            part.routed_counts.index_add_(0, flat, torch.ones_like(flat, dtype=part.routed_counts.dtype))
        host_map = part.device_slots if table.host_layout is None else part.host_slots
        cocompute = part.cocompute if ids.shape[0] == 1 and self._triton is not None else None
        if cocompute is not None:  # decode: some host-homed experts computed by the host meanwhile
            host_map = cocompute[0].hand_over(cocompute[1], x, ids, weights, host_map)
        if table.host_layout is None:
            out = self._experts_in_slabs(x, ids, weights, part, host_map, table.layout, table.host, shared)
        else:
            out = self._experts_in_slabs(x, ids, weights, part, part.device_slots, table.layout, None, shared)
            out = self._experts_in_slabs(x, ids, weights, part, host_map, table.host_layout, table.host, out)
        return out if cocompute is None else cocompute[0].add_host_sum(cocompute[1], out)

    def _experts_in_slabs(
        self,
        x: torch.Tensor,
        ids: torch.Tensor,
        weights: torch.Tensor,
        part: ExpertPart,
        slot_map: torch.Tensor,
        layout: ExpertLayout,
        host: torch.Tensor | None,
        shared: torch.Tensor | SharedExpert,
    ) -> torch.Tensor:
        """``shared`` plus the routed experts that ``slot_map`` places, in ``layout``'s format: slots >= 0
        in the table's device slab (when it is in that format), <= -2 rows of ``host``, -1 not here."""
        table = part.table
        assert isinstance(table, DeviceSlots)
        slab = table.slab if layout is table.layout else self._format_slab(layout)
        t, k = ids.shape
        offsets = None
        if self._triton is not None:
            offsets = self._offsets.get(id(layout))
            if offsets is None:
                offsets = self._offsets[id(layout)] = self._triton.ExpertOffsets.from_layout(layout)
        # the kernels map expert ids to slots themselves, and pair p reads token p // k
        flat, decode = ids.reshape(-1), t * k <= _DEVICE_MATVEC_PAIRS
        if offsets is not None and decode and isinstance(shared, SharedExpert) and _expert_shaped(shared, offsets):
            gate_up = (shared.gate, shared.up)
            h = self._triton.experts_gate_up(
                slab, offsets, flat, x, k, slot_map=slot_map, shared=gate_up, host=host, int8=self.int8
            )
            return self._triton.experts_down_combine(
                slab, offsets, ids, h, weights, shared.gate_logit, slot_map=slot_map, shared_down=shared.down,
                host=host, int8=self.int8,
            )  # fmt: skip
        shared = shared_output(self, x, shared)
        if offsets is not None:
            if not decode:  # prefill: each expert's tokens as one tiled GEMM
                slots = slot_map[ids]
                if host is not None:
                    slots, host = stage_host_experts(part, ids, table, only=slots)
                return self._triton.experts_grouped(
                    slab, offsets, slots, x, weights, shared, host=host, int8=self.int8, experts=slot_map.shape[0]
                )
            h = self._triton.experts_gate_up(slab, offsets, flat, x, k, slot_map=slot_map, host=host, int8=self.int8)
            return self._triton.experts_down_combine(
                slab, offsets, ids, h, weights, shared, slot_map=slot_map, host=host, int8=self.int8
            )
        slots = slot_map[ids]  # [T, K] slot of each choice
        y = x.new_zeros((t, k, x.shape[1]))
        for slot in torch.unique(slots).tolist():
            if slot == -1 or (slot < 0 and host is None):  # not here: the host's share, or the other width's
                continue
            rows, choice = torch.nonzero(slots == slot, as_tuple=True)
            y[rows, choice] = self.swiglu(x[rows], *_slab_matrices(slab, host, layout, slot))
        out = shared.clone()
        for j in range(k):
            out = out + weights[:, j, None] * y[:, j]
        return out

    def _format_slab(self, layout: ExpertLayout) -> torch.Tensor:
        """A one-row device slab in ``layout``'s format that the kernels are given but never read (every
        expert of that width lives in host rows)."""
        slab = self._format_slabs.get(layout.file_size)
        if slab is None:
            slab = self._format_slabs[layout.file_size] = torch.zeros(
                (1, layout.file_size), dtype=torch.uint8, device=self.torch_device
            )
        return slab

    # ---- helpers ------------------------------------------------------------------------------
    def _inv_freq(self, rotary: Rotary) -> torch.Tensor:
        """The rotary's float64 inverse frequencies on the device, uploaded once (no host copy may
        happen inside a CUDA graph capture)."""
        cached = self._rotary_cache.get(rotary)
        if cached is None:
            cached = self._rotary_cache[rotary] = torch.from_numpy(rotary.inv_freq).to(self.torch_device)
        return cached

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(self.torch_device)

    def _upload(self, a: np.ndarray) -> torch.Tensor:
        """A small per-call host array (token ids) on the device without waiting for it: a blocking copy
        to CUDA from pageable memory holds the host until the device has run everything queued before
        it; an asynchronous one stages the bytes at once and returns."""
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.torch_device, non_blocking=True)

    def _quant(self, weight: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, gs: int) -> TorchQuant:
        def dev(a: np.ndarray, dtype: Any) -> torch.Tensor:
            return self._tensor(np.ascontiguousarray(a).view(dtype))

        return TorchQuant(
            dev(weight, np.int32),
            dev(scales, np.int16).view(torch.bfloat16),
            dev(biases, np.int16).view(torch.bfloat16),
            bits,
            gs,
        )

    def _upload_part(self, part: ExpertPart) -> tuple[TorchQuant, TorchQuant, TorchQuant]:
        """The part's experts (slot rows of its host table) on the device, stacked in part order."""
        slots = part.slots
        return tuple(  # type: ignore[return-value]
            self._quant(q.weight[slots], q.scales[slots], q.biases[slots], q.bits, q.group_size)
            for q in (part.table.gate, part.table.up, part.table.down)
        )


def _expert_shaped(shared: SharedExpert, offsets: Any) -> bool:
    """Whether the shared expert's matrices are quantised like the routed experts, in their
    shapes: then the expert kernels compute it as one more expert."""
    matrices = ((shared.gate, "gate"), (shared.up, "up"), (shared.down, "down"))
    return all(isinstance(w, TorchQuant) and offsets.holds(w, proj) for w, proj in matrices)


def _one_format(a: Any, b: Any) -> bool:
    """Both quantised matrices of one shape and format (what the fused gate+up kernel reads)."""
    return (
        isinstance(a, TorchQuant)
        and isinstance(b, TorchQuant)
        and (a.shape, a.bits, a.group_size, a.weight.dim()) == (b.shape, b.bits, b.group_size, 2)
    )


def stage_host_experts(
    part: ExpertPart, ids: torch.Tensor, table: DeviceSlots, only: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """For a prefill over a part with a host slab: the host-homed experts that ``ids`` routes to, copied
    to a device buffer, and the slot of each choice with those experts renamed to the buffer's rows
    (``-2 - i``, so the kernels read the buffer as their host slab); (slots, None) when none are used.
    ``only``: the slots of the choices to compute (``[T, K]``), -1 where another pass does (the
    device slots' width, ``--host-bits``). The grouped GEMM tiles read a few bytes of each of many rows
    a step, which the link serves at a fraction of its rate, so a prefill reads routing back and
    copies whole experts instead."""
    homes = np.full(int(part.ids.max()) + 1, -1, dtype=np.int64)
    homes[part.ids] = part.slots
    used = np.unique(ids.cpu().numpy())
    staged = used[homes[used] <= -2]
    if len(staged):
        buffer = torch.empty((len(staged), table.host.shape[1]), dtype=torch.uint8, device=table.slab.device)
        for i, e in enumerate(staged.tolist()):
            buffer[i].copy_(table.host[-2 - homes[e]], non_blocking=True)
        homes[staged] = -2 - np.arange(len(staged))
    slots = torch.from_numpy(homes).to(ids.device)[ids]
    if only is not None:
        slots = torch.where(only == -1, -1, slots)
    return slots, (buffer if len(staged) else None)


def _slab_matrices(
    slab: torch.Tensor, host: torch.Tensor | None, layout: ExpertLayout, slot: int
) -> tuple[TorchQuant, ...]:
    """(gate, up, down) of the expert in ``slot`` as views of the device slab's bytes (a row of the
    host slab, ``slot <= -2``, copied to the device first), in ``layout``'s format."""
    row = slab[slot] if slot >= 0 else host[-2 - slot].to(slab.device)  # type: ignore[index]

    def view(proj: str, part: str, dtype: torch.dtype) -> torch.Tensor:
        c = layout.components[f"{proj}.{part}"]
        return row[c.offset : c.offset + c.size].view(dtype).reshape(c.shape)

    return tuple(
        TorchQuant(
            view(p, "weight", torch.int32),
            view(p, "scales", torch.bfloat16),
            view(p, "biases", torch.bfloat16),
            layout.bits,
            layout.group_size,
        )
        for p in EXPERT_PROJECTIONS
    )


def _l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.square().sum(dim=-1, keepdim=True) + L2NORM_EPS)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX rotate-half on the first ``2 * half`` dims of ``x [T, H, D]``; the rest pass through."""
    half = cos.shape[-1]
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., 2 * half :]], dim=-1)


def sample_pick_tensors(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, u: float | torch.Tensor
) -> torch.Tensor:
    """:meth:`Backend.sample_pick` in torch ops, on any device: the host sampler's steps on
    whole-vocabulary vectors (filtered entries zeroed; no shapes that depend on the data, so nothing
    waits for the device, and a CUDA graph can hold them), in float64; ``u`` a number or a float64
    device tensor of one (what a captured draw reads)."""
    finite = torch.isfinite(logits).all()
    row = torch.where(finite, logits[-1], 0)  # (NaN would upset the sort; refused anyway)
    z = row.to(torch.float64)
    zt = z / temperature
    p = torch.exp(zt - zt.max())
    if 0 < top_k < z.numel():  # the k largest, ties at the k-th value kept (found in the logits' own
        # precision: the float64 copy orders them alike, and a float64 top-k costs twice the time)
        p = torch.where(z >= torch.topk(row, top_k, sorted=False).values.min().to(torch.float64), p, 0)
    p = p / p.sum()
    if top_p < 1.0:  # the nucleus: most likely first, ties in id order (a stable sort)
        ordered, order = torch.sort(p, descending=True, stable=True)
        keep = torch.empty_like(p, dtype=torch.bool)
        keep[order] = (torch.cumsum(ordered, 0) - ordered) < top_p
        p = torch.where(keep, p, 0)
        p = p / p.sum()
    # the first kept entry whose normalised cumulative sum passes u (a filtered entry's sum can be
    # lifted past u by a parallel scan's rounding, so it is not a candidate); the last kept entry
    # when rounding leaves none (u near 1)
    kept = p > 0
    cdf = torch.cumsum(p, 0)
    draw = u.reshape(()) if isinstance(u, torch.Tensor) else torch.tensor(u, dtype=torch.float64, device=p.device)
    passed = kept & (cdf / cdf[-1] > draw)
    last_kept = z.numel() - 1 - torch.argmax(kept.flip(0).to(torch.uint8))
    token = torch.where(passed.any(), torch.argmax(passed.to(torch.uint8)), last_kept)
    return torch.stack((token, finite.to(torch.int64)))


TOP_K_MARGIN = 64  # candidates read past the k-th: ties at its value among them keep the draw exact


def sample_pick_top_k(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    u: float,
    to_numpy: Callable[[torch.Tensor], np.ndarray],
) -> np.ndarray | None:
    """:meth:`Backend.sample_pick` (as a host array) with ``top_k``: the ``top_k + TOP_K_MARGIN``
    largest logits and their ids read in one copy, and the host sampler's draw from them, which
    depends on the top-k values alone, so the token is exactly the host sampler's; None where ties
    at the k-th value run past the margin (the caller draws over the whole vocabulary)."""
    n = top_k + TOP_K_MARGIN
    top = torch.topk(logits[-1], n)  # most likely first
    finite = torch.isfinite(logits).all().to(torch.float64).reshape(1)
    host = to_numpy(torch.cat((top.values.to(torch.float64), top.indices.to(torch.float64), finite)))  # (ids < 2**53)
    if not host[-1]:
        return np.zeros(2, dtype=np.int64)
    values, ids = host[:n], host[n : 2 * n].astype(np.int64)
    if values[-1] == values[top_k - 1]:
        return None
    order = np.argsort(ids)  # the candidates in id order, as the host sampler holds them
    token = draw(values[order].astype(np.float32), temperature, top_k, top_p, u)
    return np.array([ids[order][token], 1], dtype=np.int64)


if TYPE_CHECKING:  # the type checker proves the class implements the whole contract
    _conforms: Backend = TorchBackend()
