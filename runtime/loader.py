"""Open a packed directory for inference: check it is complete and all of one model, then build
the dense weights, the expert store, the backend, the network and the tokenizer.

Structure is checked first (one-line errors), then contents as they are read: with the default
``checks="first-read"`` every dense tensor's xxh3_128 at load and every expert file's on its first
read in the process; "every-read" checks each expert read, "off" trusts the files (the full pass
over every file is `fmoe verify`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fmoe.errors import FmoeError
from fmoe.formats.expert_manifest import ExpertManifest
from fmoe.formats.packed import (
    DENSE_BIN,
    DENSE_MANIFEST,
    EXPERT_MANIFEST,
    IDENTITY_FILE,
    experts_dirname,
    read_identity,
)
from fmoe.fsutil import check_regular_file
from fmoe.runtime.engine.engine import Engine
from fmoe.runtime.experts.files import CHECKS, IO_MODES
from fmoe.runtime.model import whole_number

EXPERT_BITS = (4, 2)


def available_bits(packed_dir: Path) -> list[int]:
    """Expert bit widths whose manifest is present (a manifest means the repack finished)."""
    return [b for b in EXPERT_BITS if (packed_dir / experts_dirname(b) / EXPERT_MANIFEST).is_file()]


def check_packed_dir(packed_dir: Path | str, bits: int) -> Path:
    """The packed directory, after checking that it holds a model's dense weights and ``bits``-bit experts."""
    p = Path(packed_dir)
    if not p.is_dir():
        raise FmoeError(f"{p}: no such directory")
    make = f"`fmoe extract SOURCE --out {p}` then `fmoe repack SOURCE --bits {bits} --out {p}`"
    if not (p / IDENTITY_FILE).is_file():
        raise FmoeError(f"{p}: not a packed fmoe directory (no {IDENTITY_FILE}); make one with {make}")
    for name in (DENSE_MANIFEST, DENSE_BIN):
        if not os.path.lexists(p / name):
            raise FmoeError(f"{p}: incomplete, no {name}; run `fmoe extract SOURCE --out {p}`")
        check_regular_file(p / name)
    if bits not in EXPERT_BITS:
        raise FmoeError(f"--bits {bits}: expert bit width must be one of {', '.join(map(str, EXPERT_BITS))}")
    if not (p / experts_dirname(bits) / EXPERT_MANIFEST).is_file():
        have = available_bits(p)
        hint = (
            f"run `fmoe repack {p} --bits {bits}` (requantises the 4-bit experts)"
            if bits == 2 and 4 in have
            else f"run `fmoe repack SOURCE --bits {bits} --out {p}`"
        )
        present = f" (present: {', '.join(f'{b}-bit' for b in have)})" if have else ""
        raise FmoeError(f"{p}: no {bits}-bit experts ({experts_dirname(bits)}/{EXPERT_MANIFEST}){present}; {hint}")
    return p


def load_model(
    packed_dir: Path | str,
    bits: int = 4,
    backend: str = "cpu",
    k: int | None = None,
    *,
    device: str | None = None,
    threads: int | None = None,
    cache_bytes: int = 0,
    checks: str = "first-read",
    io: str = "pread",
    io_threads: int | None = None,
    max_context: int | None = None,
    warmup: bool = True,
    read_pool_bytes: int = 1 << 30,
    backend_options: dict[str, Any] | None = None,
    device_cache_bytes: int | None = None,
    host_compute: str | float | None = None,
    host_reads: str = "copy",
    host_bits: int | None = None,
    cuda_graph: bool = False,
    prefill_chunk: int | None = None,
) -> Engine:
    """Load a packed model for inference (see fmoe.load). The cheap checks come first: a big model's
    dense weights take a while to read."""
    from fmoe.runtime.backends import make_backend
    from fmoe.runtime.dense import read_dense_weights
    from fmoe.runtime.engine.runner import Runner
    from fmoe.runtime.experts.cache import HostCache
    from fmoe.runtime.experts.files import ExpertFiles
    from fmoe.runtime.experts.store import ExpertStore
    from fmoe.runtime.model import Qwen35MoeNetwork, check_k
    from fmoe.runtime.text.chat import ChatTemplate, stop_token_ids
    from fmoe.runtime.text.tokenizer import Tokenizer
    from fmoe.runtime.weights import ModelWeights

    whole_number("bits", bits, 1, 64)
    p = check_packed_dir(packed_dir, bits)
    _, cfg = read_identity(p)
    k = check_k(cfg, k)
    if max_context is not None:
        whole_number("--max-context", max_context, 1, cfg.max_position_embeddings)
    if prefill_chunk is not None:
        whole_number("--prefill-chunk", prefill_chunk, 1, 1 << 20)
    whole_number("cache_bytes", cache_bytes, 0, 1 << 62)
    whole_number("read_pool_bytes", read_pool_bytes, 1, 1 << 62)
    if io_threads is not None:
        whole_number("io_threads", io_threads, 1, 1024)
    if checks not in CHECKS:
        raise FmoeError(f"--checks {checks!r}: must be one of {', '.join(CHECKS)}")
    if io not in IO_MODES or (io == "mmap" and backend != "cpu"):
        raise FmoeError(f"--io {io!r}: must be pread, or mmap with the cpu backend")
    if io == "mmap" and cache_bytes:
        raise FmoeError("--cache-gb: no cache with --io mmap (the experts are computed on in the OS page cache)")
    options = dict(backend_options or {})
    if threads is not None:
        options["threads"] = threads
    be = make_backend(backend, device, **options)
    if cuda_graph and (getattr(be, "name", None) != "torch" or be.torch_device.type != "cuda"):
        raise FmoeError("--cuda-graph: needs the torch backend on a CUDA device (--backend torch --device cuda)")
    from fmoe.runtime.experts.host_share import (
        HostShare,
        check_direct_share,
        check_host_bits,
        check_host_reads,
        share_direct_reads,
    )

    check_host_reads(host_reads)
    share = HostShare.parse(host_compute)  # (a bad value fails now, before the weights are read)
    if share is not None and host_reads == "direct":
        check_direct_share(be)
    host_bits = check_host_bits(host_bits, bits, host_reads)
    if host_bits is not None:
        check_packed_dir(p, host_bits)
    manifest = ExpertManifest.read(p, cfg, bits, digest=checks != "off")
    cache = None
    if cache_bytes >= manifest.layout.file_size and host_reads == "copy":  # direct: the host slab holds them
        cache = HostCache(manifest.layout, cache_bytes)

    def expert_store(manifest: ExpertManifest, cache: HostCache | None) -> ExpertStore:
        files = ExpertFiles(manifest, checks=checks, io=io)
        layers, experts = cfg.num_hidden_layers, cfg.num_experts
        return ExpertStore(files, layers, experts, cache=cache, pool_bytes=read_pool_bytes, io_threads=io_threads)

    store = expert_store(manifest, cache)
    host_store = None  # the host-homed experts' files where they take another width (--host-bits)
    if host_bits is not None:
        host_store = expert_store(ExpertManifest.read(p, cfg, host_bits, digest=checks != "off"), None)
    tokenizer = Tokenizer(p / "tokenizer.json")
    chat_template = ChatTemplate.from_dir(p)
    host = ModelWeights.from_tensors(cfg, read_dense_weights(p, cfg, verify=checks != "off"))
    weights = be.prepare(host)
    if host_reads == "direct":
        provider = _placed_experts(be, store, cfg, device_cache_bytes, host_store)
        if share is not None:
            share_direct_reads(provider, be, share, threads)
    else:
        provider = _device_experts(be, store, cfg, device_cache_bytes, host_compute)
    network = Qwen35MoeNetwork(cfg, weights, provider or store, be, k)
    if warmup:
        be.warmup()
    context = max_context or cfg.max_position_embeddings
    return Engine(
        runner=Runner(network, context, cuda_graph=cuda_graph, prefill_chunk=prefill_chunk),
        tokenizer=tokenizer,
        chat_template=chat_template,
        stop_ids=stop_token_ids(cfg, tokenizer, p),
        packed_dir=p,
    )


def _device_experts(be: Any, store: Any, cfg: Any, budget: int | None, host_compute: str | float | None) -> Any:
    """The device expert tier in front of ``store`` (runtime/experts/device.py), or None.

    On a CUDA device it is on by default, sized to the free memory after the dense weights less a
    margin (``budget`` None) or to ``budget`` bytes (0: off); elsewhere only when ``budget`` asks.
    When it holds every expert, all are loaded now and decode never reads experts back.
    ``host_compute`` (off, auto or a share): misses computed on the host (:class:`HostShare`)."""
    from fmoe.runtime.experts.host_share import HostShare

    share = HostShare.parse(host_compute)
    no_tier = "--host-compute: needs a device expert cache (the torch backend, on CUDA or with one asked)"
    if budget == 0 or getattr(be, "name", None) != "torch":
        if share is not None:
            raise FmoeError(no_tier)
        return None
    from fmoe.runtime.experts.device import DeviceExpertStore, default_budget

    device = be.torch_device
    if budget is None:
        budget = default_budget(device)
    total = cfg.num_hidden_layers * cfg.num_experts
    capacity = min(total, budget // store.layout.file_size)
    if capacity < cfg.num_experts:  # a prefill may route to every expert of a layer at once
        if share is not None:
            raise FmoeError(f"{no_tier}; {budget} bytes of device memory hold no whole layer")
        return None
    if share is not None and capacity == total:
        raise FmoeError("--host-compute: every expert fits the device; nothing is left on the host")
    tier = DeviceExpertStore(
        store.layout, cfg.num_hidden_layers, cfg.num_experts, capacity, device, host=store, host_compute=share
    )
    tier.pin_host()
    if capacity == total:
        tier.load_all()
    return tier


class _HomeFiles:
    """Two widths' expert files (``--host-bits``), for the swaps of placed experts: each read into its
    own buffer, checked as the store's reads are. Its own descriptors: it reads on the provider's thread."""

    def __init__(self, device_files: Any, host_files: Any) -> None:
        from fmoe.runtime.experts.files import ExpertFiles

        self._files = {
            on_device: ExpertFiles(f.manifest, checks=f.checks)
            for on_device, f in ((True, device_files), (False, host_files))
        }

    def read_into(self, layer: int, expert: int, on_device: bool, buf: Any) -> None:
        files = self._files[on_device]
        files.read_into(layer, expert, files.open(layer, expert), buf)

    def close(self) -> None:
        for f in self._files.values():
            f.close()


def _placed_experts(be: Any, store: Any, cfg: Any, budget: int | None, host_store: Any = None) -> Any:
    """Every expert at a home (runtime/experts/placed.py): as many as ``budget`` bytes of device
    memory hold (None: its free memory less a margin) in device slots, the rest in page-locked host
    memory that the kernels read in place; all read from the files now (checked as the store checks
    them), with progress. ``host_store``: the files of the host-homed experts where they take another
    width than ``store``'s (``--host-bits``)."""
    import numpy as np

    from fmoe.progress import byte_progress
    from fmoe.runtime.experts.device import default_budget
    from fmoe.runtime.experts.placed import PlacedExperts
    from fmoe.runtime.experts.slots import HostSlab

    if getattr(be, "name", None) != "torch" or (budget is None and be.torch_device.type != "cuda"):
        raise FmoeError("--host-reads direct: needs the torch backend on a GPU (or --gpu-cache-gb on another device)")
    layout, layers, experts = store.layout, cfg.num_hidden_layers, cfg.num_experts
    host_layout = layout if host_store is None else host_store.layout
    total = layers * experts
    capacity = min(total, (default_budget(be.torch_device) if budget is None else budget) // layout.file_size)
    host = HostSlab(host_layout, max(1, total - capacity))
    files = None if host_store is None else _HomeFiles(store.files, host_store.files)
    placed = PlacedExperts(
        layout, layers, experts, capacity, be.torch_device, host.data, host_layout=host_layout, files=files
    )
    sources = [(store, True)] if host_store is None else [(store, True), (host_store, False)]
    with byte_progress(transient=True) as bar:
        nbytes = capacity * layout.file_size + (total - capacity) * host_layout.file_size
        task = bar.add_task("experts to their homes", total=nbytes)
        every = np.arange(experts, dtype=np.int64)
        for layer in range(layers):
            for source, device in sources:
                wanted = every if host_store is None else every[placed.homed_on_device(layer) == device]
                for part in source.resident(layer, wanted):  # a part's rows are valid until the next is drawn
                    placed.place(layer, part)
                    bar.advance(task, len(part) * source.layout.file_size)
    for source, _ in sources:
        source.close()
    return placed
