"""A model of any geometry built in memory with random weights and no files, to measure a full-depth
model on the box that runs it (docs/PERFORMANCE.md) instead of extrapolating from a slice.

Every quantised matrix gets uniform random codes and, per group, a scale of ``2 / (levels *
sqrt(in))`` with the bias centring the codes, so a matvec maps a unit-RMS input to an output of
about unit RMS and a 60-layer pass stays finite. Experts are the same (``fill_random_experts``): on
the device (as many as its memory holds) and, on a GPU, for the rest
in a host slab that the device tier copies misses from. The host slab holds ``host_bytes`` of
experts; when the model has more, experts share its slots (``(layer, expert)`` modulo its size):
the bytes moved, and so the timings, are those of distinct experts.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fmoe.config import TextConfig
from fmoe.errors import FmoeError
from fmoe.formats.dense_tensors import MIN_8BIT_SUFFIXES, dense_tensor_shapes
from fmoe.formats.packed import ExpertLayout
from fmoe.formats.quant import QuantTensor, f32_to_bf16
from fmoe.runtime.experts.slots import ExpertPart, HostSlab
from fmoe.runtime.experts.stats import ExpertStats
from fmoe.runtime.weights import ModelWeights

_GROUP = 64


def synthetic_config(preset: str, layers: int | None = None, experts: int | None = None) -> TextConfig:
    """A preset's text config, cut to ``layers`` layers and ``experts`` experts (as ``fmoe synth``)."""
    from fmoe.convert.synth import build_text_config
    from fmoe.presets import load_preset

    return TextConfig.from_dict(build_text_config(load_preset(preset), layers, experts), where=f"preset {preset}")


def unit_rms_affine(bits: int, n_in: int) -> tuple[np.uint16, np.uint16]:
    """bf16 bits of the (scale, bias) that make uniform random ``bits``-bit codes a matrix mapping a
    unit-RMS input of ``n_in`` to an output of about unit RMS (the bias centres the codes)."""
    levels = (1 << bits) - 1
    scale = 2.0 / (levels * np.sqrt(n_in))
    pair = f32_to_bf16(np.array([scale, -scale * levels / 2], np.float32))
    return pair[0], pair[1]


def random_quant(rng: np.random.Generator, shape: tuple[int, int], bits: int) -> QuantTensor:
    """A ``[out, in]`` matrix of uniform random ``bits``-bit codes, scaled to keep unit RMS."""
    n_out, n_in = shape
    scale, bias = unit_rms_affine(bits, n_in)
    weight = rng.integers(0, 1 << 32, (n_out, n_in * bits // 32), dtype=np.uint32)
    groups = (n_out, n_in // _GROUP)
    return QuantTensor(weight, np.full(groups, scale), np.full(groups, bias), bits, _GROUP)


def random_device_quant(shape: tuple[int, int], bits: int, device: Any) -> Any:
    """:func:`random_quant` made on ``device`` as the torch backend holds it (a ``TorchQuant``):
    uniform random codes, :func:`unit_rms_affine` scales and biases. For the kernel sweeps."""
    import torch

    from fmoe.runtime.backends.torch_backend import TorchQuant

    n_out, n_in = shape
    words = torch.randint(-(2**31), 2**31 - 1, (n_out, n_in * bits // 32), dtype=torch.int32, device=device)

    def bf16(value: np.uint16) -> Any:
        return torch.full((n_out, n_in // _GROUP), int(value.view(np.int16)), dtype=torch.int16, device=device)

    scale, bias = unit_rms_affine(bits, n_in)
    return TorchQuant(words, bf16(scale).view(torch.bfloat16), bf16(bias).view(torch.bfloat16), bits, _GROUP)


def fill_random_experts(slab: Any, layout: ExpertLayout, generator: Any = None) -> None:
    """Random expert files in every row of a device ``slab`` (torch uint8 ``[S, file_size]``): uniform
    codes, :func:`unit_rms_affine` scales and biases; a block of rows at a time (no temporary the
    size of the slab)."""
    import torch

    words, halves = slab.view(torch.int32), slab.view(torch.int16)
    fill: list[tuple[int, int, int | None]] = []  # (first element, count, a constant or None: random words)
    for name, comp in layout.components.items():
        proj, part = name.split(".")
        if part == "weight":
            fill.append((comp.offset // 4, comp.size // 4, None))
            continue
        n_in = layout.components[f"{proj}.weight"].shape[1] * 32 // layout.bits
        scale, bias = unit_rms_affine(layout.bits, n_in)
        value = int((scale if part == "scales" else bias).view(np.int16))
        fill.append((comp.offset // 2, comp.size // 2, value))
    step = 64
    for r0 in range(0, slab.shape[0], step):
        rows = slice(r0, min(slab.shape[0], r0 + step))
        for lo, n, const in fill:
            if const is None:
                words[rows, lo : lo + n] = torch.randint(
                    -(2**31), 2**31 - 1, (rows.stop - rows.start, n), dtype=torch.int32, device=slab.device,
                    generator=generator,
                )  # fmt: skip
            else:
                halves[rows, lo : lo + n] = const


def host_random_experts(layout: ExpertLayout, rows: int, device: Any) -> Any:
    """``rows`` random expert files (:func:`fill_random_experts`) in host memory, page-locked when
    ``device`` is CUDA (as ``--host-reads direct`` keeps its host tier): a block of up to 64 made on
    ``device`` and copied over in turn, so rows repeat every 64 (the bytes a read moves are real, their
    values need not differ)."""
    import torch

    block = torch.empty((min(rows, 64), layout.file_size), dtype=torch.uint8, device=device)
    fill_random_experts(block, layout)
    host = torch.empty((rows, layout.file_size), dtype=torch.uint8, pin_memory=torch.device(device).type == "cuda")
    for r0 in range(0, rows, block.shape[0]):
        n = min(block.shape[0], rows - r0)
        host[r0 : r0 + n].copy_(block[:n])
    return host


def synthetic_dense(cfg: TextConfig, dense_bits: int, seed: int = 0) -> ModelWeights:
    """Host dense weights for ``cfg``: matrices at ``dense_bits`` (the router and the shared expert's
    gate at 8 at least, as extract stores them), norms of scale one, a stable DeltaNet (decay rates of
    a trained model's order, small conv taps)."""
    if dense_bits not in (4, 8):
        raise FmoeError(f"--dense-bits {dense_bits}: a synthetic model takes 4 or 8")
    rng = np.random.default_rng(seed)
    tensors: dict[str, Any] = {}
    for name, shape in dense_tensor_shapes(cfg).items():
        if name.endswith("conv1d.weight"):
            tensors[name] = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
        elif len(shape) == 2 and shape[1] % _GROUP == 0:
            bits = max(dense_bits, 8) if name.endswith(MIN_8BIT_SUFFIXES) else dense_bits
            tensors[name] = random_quant(rng, (shape[0], shape[1]), bits)
        elif len(shape) == 2:
            tensors[name] = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
        elif name.endswith("A_log"):
            tensors[name] = np.log(rng.uniform(1, 16, shape)).astype(np.float32)
        elif name.endswith("dt_bias"):
            tensors[name] = np.zeros(shape, np.float32)
        else:  # norms: effective scale one
            tensors[name] = np.ones(shape, np.float32)
    return ModelWeights.from_tensors(cfg, tensors)


class SyntheticHostExperts:
    """Random experts in one host slab of ``count`` slots, (layer, expert) at slot
    ``(layer * num_experts + expert) % count``: the host tier behind a device tier."""

    stable_rows = True  # the slab is filled once

    def __init__(self, layout: ExpertLayout, num_layers: int, num_experts: int, count: int, seed: int = 0) -> None:
        self.layout, self.num_experts = layout, num_experts
        self.slab = HostSlab(layout, max(1, min(count, num_layers * num_experts)))
        self.stats = ExpertStats.zeros(num_layers)
        rng = np.random.default_rng(seed)
        distinct = min(8, self.slab.count)  # a few random files, repeated: filling 100 GB stays a copy
        files = [_random_file(rng, layout) for _ in range(distinct)]
        for slot in range(self.slab.count):
            self.slab.data[slot] = files[slot % distinct]

    def resident(self, layer: int, experts: Sequence[int] | np.ndarray) -> Iterator[ExpertPart]:
        ids = np.asarray(experts, dtype=np.int64)
        self.stats.requested[layer] += len(ids)
        self.stats.record(layer, "memory", len(ids), len(ids) * self.layout.file_size)
        yield ExpertPart(self.slab.table, ids, (layer * self.num_experts + ids) % self.slab.count)

    @property
    def bits(self) -> int:
        return self.layout.bits

    @property
    def cache_bytes(self) -> int:
        return 0

    def host_buffers(self) -> list[np.ndarray]:
        return [self.slab.data]

    def close(self) -> None:
        pass


def synthetic_engine(
    cfg: TextConfig,
    *,
    bits: int = 4,
    dense_bits: int = 4,
    k: int | None = None,
    backend: str = "torch",
    device: str | None = None,
    device_cache_bytes: int | None = None,
    host_bytes: int = 8 << 30,
    max_context: int = 4096,
    seed: int = 0,
    host_compute: str | float | None = None,
    host_reads: str = "copy",
    host_bits: int | None = None,
    backend_options: dict[str, Any] | None = None,
    cuda_graph: bool = False,
    prefill_chunk: int | None = None,
) -> Any:
    """An Engine over a synthetic model of ``cfg``: dense weights prepared by the backend, experts on
    the device (torch) when they fit, else a device tier over a synthetic host slab; on the cpu
    backend, all experts in a host slab. ``host_compute``: misses of the device tier computed on the
    host (runtime/experts/host_share.py). ``host_reads``: "copy" (misses copied into the device
    tier) or "direct" (the experts the device does not hold read by its kernels from the host slab
    in place, runtime/experts/placed.py); ``host_bits``: those host rows' width where not ``bits``
    (``--host-bits``). ``backend_options``: the backend's own (``{"int8": True}``
    for ``--int8-dot``). ``cuda_graph``, ``prefill_chunk``: the runner's (runtime/engine/runner.py). Its
    tokenizer is the synthetic checkpoints' (ids only matter)."""
    from fmoe.convert.synth_tokenizer import write_tokenizer_files
    from fmoe.runtime.backends import make_backend
    from fmoe.runtime.engine.engine import Engine
    from fmoe.runtime.engine.runner import Runner
    from fmoe.runtime.experts.host_share import (
        HostShare,
        check_direct_share,
        check_host_bits,
        check_host_reads,
        share_direct_reads,
    )
    from fmoe.runtime.model import Qwen35MoeNetwork, check_k
    from fmoe.runtime.text.tokenizer import Tokenizer

    check_host_reads(host_reads)
    host_bits = check_host_bits(host_bits, bits, host_reads)
    k = check_k(cfg, k)
    be: Any = make_backend(backend, device, **(backend_options or {}))
    share = HostShare.parse(host_compute)
    if share is not None and host_reads == "direct":
        check_direct_share(be)
    layout = ExpertLayout.for_config(cfg, bits)
    host_layout = layout if host_bits is None else ExpertLayout.for_config(cfg, host_bits)
    weights = be.prepare(synthetic_dense(cfg, dense_bits, seed))
    total = cfg.num_hidden_layers * cfg.num_experts
    host_slots = host_bytes // host_layout.file_size
    provider: Any
    if getattr(be, "name", None) == "torch":
        import torch

        from fmoe.runtime.experts.device import DeviceExpertStore, default_budget

        if device_cache_bytes is None:  # CUDA: its free memory less a margin; elsewhere the whole model
            cuda = be.torch_device.type == "cuda"
            device_cache_bytes = default_budget(be.torch_device) if cuda else total * layout.file_size
        capacity = min(total, device_cache_bytes // layout.file_size)
        if capacity < cfg.num_experts and host_reads == "copy":  # a prefill may route to every expert of a layer
            raise FmoeError(f"synthetic model: {device_cache_bytes} bytes of device memory hold no whole layer")
        host = None
        if capacity < total:
            host = SyntheticHostExperts(host_layout, cfg.num_hidden_layers, cfg.num_experts, host_slots)
        if share is not None and host is None:
            raise FmoeError("--host-compute: every expert fits the device; nothing is left on the host")
        generator = torch.Generator(device=be.torch_device).manual_seed(seed)
        if host is not None and host_reads == "direct":
            from fmoe.runtime.experts.placed import PlacedExperts

            provider = PlacedExperts(
                layout,
                cfg.num_hidden_layers,
                cfg.num_experts,
                capacity,
                be.torch_device,
                host.slab.data,
                host_layout=host_layout,
                files=None if host_layout is layout else _SyntheticHomeFiles(layout, host_layout, seed),
            )
            provider.fill_device(generator)
            if share is not None:
                share_direct_reads(provider, be, share, (backend_options or {}).get("threads"))
        else:
            provider = DeviceExpertStore(
                layout, cfg.num_hidden_layers, cfg.num_experts, capacity, be.torch_device, host, host_compute=share
            )
            if host is None:
                fill_random_experts(provider.slab, layout, generator)
                provider.assign_all()
            else:
                provider.pin_host()
    else:
        if share is not None or host_reads != "copy":
            option = "--host-compute" if share is not None else "--host-reads"
            raise FmoeError(f"{option}: the torch backend's option (a device expert cache over the host)")
        provider = SyntheticHostExperts(layout, cfg.num_hidden_layers, cfg.num_experts, host_slots, seed)
    network = Qwen35MoeNetwork(cfg, weights, provider, be, k)
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer_files(Path(tmp), vocab_size=cfg.vocab_size, eos_token_id=None, max_length=max_context)
        tokenizer = Tokenizer(Path(tmp) / "tokenizer.json")
    runner = Runner(network, max_context, cuda_graph=cuda_graph, prefill_chunk=prefill_chunk)
    return Engine(runner=runner, tokenizer=tokenizer, chat_template=None, stop_ids=(), packed_dir=Path())


class _SyntheticHomeFiles:
    """A synthetic model's expert files of two widths for the swaps of placed experts (``--host-bits``):
    a few random files a width, copied per read (from memory: no disk time)."""

    def __init__(self, layout: ExpertLayout, host_layout: ExpertLayout, seed: int) -> None:
        rng = np.random.default_rng(seed + 1)
        self._files = {
            on_device: [_random_file(rng, lay) for _ in range(2)]
            for on_device, lay in ((True, layout), (False, host_layout))
        }

    def read_into(self, layer: int, expert: int, on_device: bool, buf: np.ndarray) -> None:
        files = self._files[on_device]
        buf[...] = files[(layer + expert) % len(files)]

    def close(self) -> None:
        pass


def _random_file(rng: np.random.Generator, layout: ExpertLayout) -> np.ndarray:
    """One expert file's bytes: random codes, unit-RMS scales and biases."""
    tensors = {}
    for proj in ("gate_proj", "up_proj", "down_proj"):
        shape = layout.components[f"{proj}.weight"].shape
        tensors[proj] = random_quant(rng, (shape[0], shape[1] * 32 // layout.bits), layout.bits)
    return np.frombuffer(layout.encode(tensors), dtype=np.uint8)
