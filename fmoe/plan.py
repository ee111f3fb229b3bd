"""`fmoe plan`: what a model needs, where it fits on this machine, and how fast it can stream.

From a preset (or a hub alias), a source checkpoint or a packed directory, every figure comes from the
model's config and fmoe's formats (docs/FORMAT.md), never from a table of models:

- bytes: the dense weights at ``dense_bits`` (exactly what ``fmoe extract`` writes: each part 64-byte
  aligned, routers at 8 bits at least, ungroupable matrices bf16, vectors float32), one expert file at
  ``bits`` (``ExpertLayout``) times layers x experts, and per sequence at ``context`` tokens the KV
  cache (full-attention layers x K,V x KV heads x head_dim x 4 bytes: fmoe's caches are float32) and
  the DeltaNet state (linear layers x (value heads x key dim x value dim + (kernel - 1) x conv
  channels) x 4 bytes);
- placement, in this order: the dense weights and one sequence's state on the GPU when they fit (the
  GPU computes), else in host memory (the CPU computes); then whole expert files on the GPU, in pinned
  host memory (the in-process cache: by default all the host memory left when a GPU computes, none
  otherwise), in the OS page cache (the host memory left), and the rest on disk;
- bytes read per decoded token per tier: with K experts per token and uniform routing, each of a
  layer's E experts is used with probability K / E, so a tier holding n of the L x E expert files
  serves K x n / E x file_size bytes per token (the whole: K x L x file_size; with ``host_bits`` the
  files off the GPU are that width's, as ``--host-bits`` reads them); ``hit_rate`` instead
  makes the memory tiers serve that fraction of the expert bytes (in proportion to what they hold) and
  disk the rest. Dense weights are read once per token (the embedding: one row), the state once;
- the ceiling: each path bounds tokens/s at its bandwidth / its bytes per token (disk: the experts
  read from disk; host to GPU link: every expert byte not resident on the GPU; host memory: what is
  read from it; GPU memory: dense, state and every expert used). The ceiling is the smallest of the
  known bounds: no overlap, contention or compute time makes it any faster. With
  ``host_compute_bw`` (the runtime's ``--host-compute``) the host's cores share the page-locked
  experts' bytes with the link: the two together carry every byte off the GPU at the sum of their
  rates at best, the link alone whatever is not page-locked.

Capacities are given or measured: host memory (MemAvailable now), the GPU's free memory and
bandwidths (with torch on CUDA), and the disk's read bandwidth (O_DIRECT reads of a sample of a
packed directory's expert files). GB means 10^9 bytes throughout.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fmoe.config import TextConfig
from fmoe.errors import FmoeError

GB = 1e9
FLOAT32 = 4
STATE_DTYPE = "float32"  # what fmoe's backends keep the KV cache and the DeltaNet state in
TIERS = ("gpu", "pinned", "page_cache", "disk")
DISK_SAMPLE_FILES = 64  # expert files read to measure the disk (at most DISK_SAMPLE_BYTES)
DISK_SAMPLE_BYTES = 2 << 30
DISK_READERS = 8  # parallel reads, as the expert store's read pool issues them


# ---- the model's bytes ----------------------------------------------------------------------------
def dense_bytes(cfg: TextConfig, dense_bits: int) -> dict[str, int]:
    """``{"total", "embedding", "per_token"}``: the size of model_weights.bin at ``dense_bits`` (the
    rules of convert/extract.py), the embedding's share, and what one decoded token reads of it."""
    from fmoe.formats.dense_tensors import MIN_8BIT_SUFFIXES, dense_tensor_shapes
    from fmoe.formats.packed import DENSE_ALIGN, DENSE_BITS, align_up
    from fmoe.formats.quant import DEFAULT_GROUP_SIZE

    if dense_bits not in DENSE_BITS:
        raise FmoeError(f"--dense-bits: {dense_bits} is not one of {', '.join(map(str, DENSE_BITS))}")
    offset, embedding = 0, 0
    for name, shape in dense_tensor_shapes(cfg).items():
        start = offset
        if len(shape) != 2 or name.endswith("conv1d.weight"):  # norms, vectors, conv: float32
            parts = [FLOAT32 * _count(shape)]
        else:
            out_dim, in_dim = shape
            bits = max(dense_bits, 8) if dense_bits != 16 and name.endswith(MIN_8BIT_SUFFIXES) else dense_bits
            if in_dim % DEFAULT_GROUP_SIZE:
                bits = 16
            if bits == 16:
                parts = [2 * out_dim * in_dim]
            else:
                groups = out_dim * (in_dim // DEFAULT_GROUP_SIZE) * 2  # bf16 scales, and as many biases
                parts = [out_dim * in_dim * bits // 8, groups, groups]
        for size in parts:
            offset = align_up(offset, DENSE_ALIGN) + size
        if name == "embed_tokens.weight":
            embedding = offset - start
    per_token = offset if cfg.tie_word_embeddings else offset - embedding + embedding // cfg.vocab_size
    return {"total": offset, "embedding": embedding, "per_token": per_token}


def _count(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def state_bytes(cfg: TextConfig, context: int) -> dict[str, int]:
    """One sequence's state at ``context`` tokens: KV cache of the full-attention layers and the
    DeltaNet state (recurrent and conv) of the linear ones, float32 as fmoe keeps them."""
    full = sum(cfg.is_full_attention(L) for L in range(cfg.num_hidden_layers))
    linear = cfg.num_hidden_layers - full
    kv_per_token = full * 2 * cfg.num_key_value_heads * cfg.head_dim * FLOAT32
    recurrent = cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim * FLOAT32
    conv = (cfg.linear_conv_kernel_dim - 1) * cfg.conv_dim * FLOAT32
    return {
        "full_layers": full,
        "linear_layers": linear,
        "kv_per_token": kv_per_token,
        "kv": kv_per_token * context,
        "deltanet_per_layer": recurrent + conv,
        "deltanet": linear * (recurrent + conv),
        "total": kv_per_token * context + linear * (recurrent + conv),
    }


def expert_file_size(cfg: TextConfig, bits: int) -> int:
    from fmoe.formats.packed import ExpertLayout

    return ExpertLayout.for_config(cfg, bits).file_size


# ---- capacities ---------------------------------------------------------------------------------------
@dataclass
class Capacities:
    """Memory sizes (bytes) and bandwidths (bytes/s, None: unknown), each with where it came from."""

    gpu: int = 0
    ram: int = 0
    pinned: int | None = None  # None: the default (all host memory left with a GPU, none without)
    disk_bw: float | None = None
    ram_bw: float | None = None
    gpu_bw: float | None = None
    link_bw: float | None = None
    host_compute_bw: float | None = None  # the host's cores on page-locked experts (`--host-compute`); None: off
    origin: dict[str, str] = field(default_factory=dict)


def _gb(value: float | None, option: str, *, positive: bool = False) -> float | None:
    if value is None:
        return None
    if not (value == value and value >= 0 and value != float("inf")) or (positive and value == 0):
        raise FmoeError(f"{option}: {value!r} must be a {'positive' if positive else 'non-negative'} finite number")
    return value * GB


def capacities(
    *,
    gpu_mem: float | None,
    ram: float | None,
    pinned: float | None,
    disk_bw: float | None,
    ram_bw: float | None,
    gpu_bw: float | None,
    link_bw: float | None,
    packed: Path | None,
    bits: int,
    host_compute_bw: float | None = None,
) -> Capacities:
    """The capacities given (GB, GB/s), the others measured on this machine where possible."""
    given = {
        "gpu": _gb(gpu_mem, "--gpu-mem"),
        "ram": _gb(ram, "--ram"),
        "pinned": _gb(pinned, "--pinned"),
        "disk_bw": _gb(disk_bw, "--disk-bw", positive=True),
        "ram_bw": _gb(ram_bw, "--ram-bw", positive=True),
        "gpu_bw": _gb(gpu_bw, "--gpu-bw", positive=True),
        "link_bw": _gb(link_bw, "--link-bw", positive=True),
        "host_compute_bw": _gb(host_compute_bw, "--host-compute-bw", positive=True),
    }
    cap = Capacities(origin={k: "given" for k, v in given.items() if v is not None})
    for key in ("pinned", "disk_bw", "ram_bw", "gpu_bw", "link_bw", "host_compute_bw"):
        setattr(cap, key, given[key])
    if given["ram"] is not None:
        cap.ram = int(given["ram"])
    else:
        cap.ram, cap.origin["ram"] = _available_memory()
    if given["gpu"] is not None:
        cap.gpu = int(given["gpu"])
    else:
        _measure_gpu(cap)
    if cap.disk_bw is None and packed is not None:
        measured = measure_disk(packed, bits)
        if measured is not None:
            cap.disk_bw, cap.origin["disk_bw"] = measured
    return cap


def _available_memory() -> tuple[int, str]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "measured (MemAvailable)"
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"), "measured (free pages)"
    except (ValueError, OSError, AttributeError):
        raise FmoeError("--ram: cannot measure this machine's free memory; pass --ram GB") from None


def _measure_gpu(cap: Capacities) -> None:
    """Free memory, device memory bandwidth and host-to-device bandwidth of CUDA device 0 (torch)."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        cap.origin["gpu"] = "none (torch is not installed)"
        return
    import torch

    if not torch.cuda.is_available():
        cap.origin["gpu"] = "none (no CUDA device)"
        return
    free, _ = torch.cuda.mem_get_info(0)
    cap.gpu, cap.origin["gpu"] = int(free), f"measured (free memory of {torch.cuda.get_device_name(0)})"
    n = 256 << 20
    if cap.gpu_bw is None:
        a = torch.empty(n, dtype=torch.uint8, device="cuda")
        b = torch.empty_like(a)
        cap.gpu_bw, cap.origin["gpu_bw"] = 2 * n / _best_time(lambda: b.copy_(a), torch), "measured (copy)"
    if cap.link_bw is None:
        host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty(n, dtype=torch.uint8, device="cuda")
        timed = _best_time(lambda: dev.copy_(host, non_blocking=True), torch)
        cap.link_bw, cap.origin["link_bw"] = n / timed, "measured (pinned host to device copy)"


def _best_time(op: Any, torch: Any, repeat: int = 5) -> float:
    op()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        op()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_disk(packed: Path, bits: int) -> tuple[float, str] | None:
    """Read bandwidth of a packed directory's expert files: a spread sample read in parallel, with
    O_DIRECT where the filesystem allows it (else after asking the kernel to drop them from the page
    cache), so cached pages do not count. None when the directory has no such files."""
    import mmap

    from fmoe.formats.packed import expert_relpath, experts_dirname

    cfg = _packed_config(packed)
    folder = packed / experts_dirname(bits)
    size = expert_file_size(cfg, bits)
    total = cfg.num_hidden_layers * cfg.num_experts
    count = max(1, min(DISK_SAMPLE_FILES, DISK_SAMPLE_BYTES // size, total))
    picks = [(i * total // count) for i in range(count)]
    files = [folder / expert_relpath(i // cfg.num_experts, i % cfg.num_experts) for i in picks]
    files = [f for f in files if f.is_file() and f.stat().st_size == size]
    if not files:
        return None
    direct = getattr(os, "O_DIRECT", 0)
    lock = threading.Lock()
    queue = list(files)
    done = [0]
    how = ["O_DIRECT"]

    def reader() -> None:
        buf = mmap.mmap(-1, size)  # page-aligned, as O_DIRECT needs
        try:
            while True:
                with lock:
                    if not queue:
                        return
                    path = queue.pop()
                fd = _open_uncached(path, direct, how, lock)
                try:
                    n = 0
                    while n < size:
                        got = os.preadv(fd, [memoryview(buf)[n:]], n)
                        if got <= 0:
                            break
                        n += got
                finally:
                    os.close(fd)
                with lock:
                    done[0] += n
        finally:
            buf.close()

    threads = [threading.Thread(target=reader) for _ in range(min(DISK_READERS, len(files)))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if done[0] == 0 or elapsed <= 0:
        return None
    return done[0] / elapsed, f"measured ({len(files)} expert files, {how[0]})"


def _open_uncached(path: Path, direct: int, how: list[str], lock: threading.Lock) -> int:
    if direct:
        try:
            return os.open(path, os.O_RDONLY | direct)
        except OSError:
            pass
    fd = os.open(path, os.O_RDONLY)
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    with lock:
        how[0] = "page cache dropped" if hasattr(os, "posix_fadvise") else "page cache not bypassed"
    return fd


# ---- the input ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Model:
    """What is planned: its config and, for a packed directory, its artifacts."""

    kind: str  # preset | source | packed
    name: str
    cfg: TextConfig
    packed: Path | None = None
    dense_bits: int | None = None  # a packed directory's
    dense_file_size: int | None = None  # a packed directory's model_weights.bin, when whole
    expert_bits: tuple[int, ...] = ()  # a packed directory's finished expert sets


def resolve_model(target: str) -> Model:
    """A packed directory, a source checkpoint (its config.json), a preset or a hub alias."""
    from fmoe.formats.packed import IDENTITY_FILE
    from fmoe.presets import load_preset, preset_for_alias, preset_names, repo_aliases

    path = Path(target)
    if path.is_dir():
        if (path / IDENTITY_FILE).is_file():
            return _packed_model(path)
        if (path / "config.json").is_file():
            return Model("source", str(path), TextConfig.from_file(path / "config.json"))
        raise FmoeError(f"{path}: neither a packed fmoe directory (no {IDENTITY_FILE}) nor a source checkpoint")
    name = target
    if target not in preset_names() and target in repo_aliases():
        found = preset_for_alias(target)
        if found is None:
            raise FmoeError(f"{target}: no preset describes alias {target}'s repo {repo_aliases()[target]['repo']}")
        name = found
    if name not in preset_names():
        raise FmoeError(
            f"{target!r}: not a directory, a preset ({', '.join(preset_names())}) or an alias "
            f"({', '.join(repo_aliases())})"
        )
    doc = load_preset(name)
    return Model("preset", name, TextConfig.from_dict(doc["text_config"], where=f"preset {name}"))


def _packed_config(packed: Path) -> TextConfig:
    from fmoe.formats.packed import read_identity

    return read_identity(packed)[1]


def _packed_model(path: Path) -> Model:
    from fmoe.formats.packed import DENSE_BIN, DENSE_MANIFEST, EXPERT_MANIFEST, experts_dir_bits
    from fmoe.fsutil import read_json_or_none

    cfg = _packed_config(path)
    dense = read_json_or_none(path / DENSE_MANIFEST) or {}
    bits = dense.get("dense_bits")
    size = dense.get("file_size")
    whole = type(size) is int and (path / DENSE_BIN).is_file() and (path / DENSE_BIN).stat().st_size == size
    sets = tuple(
        sorted(
            b
            for d in path.iterdir()
            if d.is_dir() and (b := experts_dir_bits(d.name)) is not None and (d / EXPERT_MANIFEST).is_file()
        )
    )
    return Model(
        "packed",
        str(path),
        cfg,
        packed=path,
        dense_bits=bits if type(bits) is int else None,
        dense_file_size=size if whole else None,
        expert_bits=sets,
    )


# ---- the plan ------------------------------------------------------------------------------------------
def plan(
    target: str,
    *,
    bits: int | None = None,
    k: int | None = None,
    context: int | None = None,
    dense_bits: int | None = None,
    gpu_mem: float | None = None,
    ram: float | None = None,
    pinned: float | None = None,
    disk_bw: float | None = None,
    ram_bw: float | None = None,
    gpu_bw: float | None = None,
    link_bw: float | None = None,
    hit_rate: float | None = None,
    host_bits: int | None = None,
    host_compute_bw: float | None = None,
) -> dict[str, Any]:
    """The whole plan as a JSON-ready dict (see the module doc); :func:`render` shows its arithmetic."""
    model = resolve_model(target)
    cfg = model.cfg
    if bits is None:
        bits = 4 if (not model.expert_bits or 4 in model.expert_bits) else model.expert_bits[0]
    if bits not in (4, 2):
        raise FmoeError(f"--bits: {bits} is not 4 or 2")
    k = cfg.num_experts_per_tok if k is None else k
    if not 1 <= k <= cfg.num_experts:
        raise FmoeError(f"--k: {k} must be between 1 and the model's {cfg.num_experts} experts")
    context = cfg.max_position_embeddings if context is None else context
    if not 1 <= context <= cfg.max_position_embeddings:
        raise FmoeError(f"--context: {context} must be between 1 and the model's {cfg.max_position_embeddings}")
    if host_bits is not None and host_bits not in (4, 2):
        raise FmoeError(f"--host-bits: {host_bits} is not 4 or 2")
    if hit_rate is not None and not 0 <= hit_rate <= 1:
        raise FmoeError(f"--hit-rate: {hit_rate} must be between 0 and 1")
    if dense_bits is None:
        dense_bits = model.dense_bits if model.dense_bits is not None else 4
    dense = dense_bytes(cfg, dense_bits)
    if model.dense_file_size is not None and model.dense_bits == dense_bits:
        dense["total"] = model.dense_file_size  # what is on disk (the formula gives the same)
    state = state_bytes(cfg, context)
    file_size = expert_file_size(cfg, bits)
    host_file_size = file_size if host_bits in (None, bits) else expert_file_size(cfg, host_bits)
    sizes = {tier: file_size if tier == "gpu" else host_file_size for tier in TIERS}  # a file's bytes by tier
    files = cfg.num_hidden_layers * cfg.num_experts
    cap = capacities(
        gpu_mem=gpu_mem,
        ram=ram,
        pinned=pinned,
        disk_bw=disk_bw,
        ram_bw=ram_bw,
        gpu_bw=gpu_bw,
        link_bw=link_bw,
        packed=model.packed if bits in model.expert_bits else None,
        bits=bits,
        host_compute_bw=host_compute_bw,
    )
    place = placement(dense["total"], state["total"], sizes, files, cap)
    if cap.host_compute_bw is not None and place["compute"] != "gpu":
        raise FmoeError("--host-compute-bw: the host computes part of a GPU's experts; here the CPU computes them all")
    if host_file_size != file_size:
        if place["compute"] != "gpu":
            raise FmoeError("--host-bits: experts off the GPU at another width need a GPU that computes")
        if place["experts"]["page_cache"] or place["experts"]["disk"]:
            place["notes"].append(
                "--host-bits: the runtime reads host experts at another width only from page-locked memory "
                "(--host-reads direct), which must hold every file the GPU does not"
            )
    uniform = traffic(cfg, k, sizes, place["experts"], dense["per_token"], state, None)
    at_hit = traffic(cfg, k, sizes, place["experts"], dense["per_token"], state, hit_rate)
    report = {
        "model": {
            "kind": model.kind,
            "name": model.name,
            "layers": cfg.num_hidden_layers,
            "full_attention_layers": state["full_layers"],
            "linear_attention_layers": state["linear_layers"],
            "hidden_size": cfg.hidden_size,
            "experts": cfg.num_experts,
            "experts_per_token": cfg.num_experts_per_tok,
            "moe_intermediate_size": cfg.moe_intermediate_size,
            "vocab_size": cfg.vocab_size,
        },
        "bits": bits,
        "host_bits": None if host_file_size == file_size else host_bits,
        "dense_bits": dense_bits,
        "k": k,
        "context": context,
        "bytes": {
            "dense": dense["total"],
            "dense_embedding": dense["embedding"],
            "expert_file": file_size,
            "host_expert_file": host_file_size,
            "expert_files": files,
            "experts": file_size * files,
            "kv_per_token": state["kv_per_token"],
            "kv": state["kv"],
            "deltanet_per_layer": state["deltanet_per_layer"],
            "deltanet": state["deltanet"],
            "state": state["total"],
            "state_dtype": STATE_DTYPE,
        },
        "capacities": {
            "gpu": cap.gpu,
            "ram": cap.ram,
            "pinned": cap.pinned,
            "disk_bw": cap.disk_bw,
            "ram_bw": cap.ram_bw,
            "gpu_bw": cap.gpu_bw,
            "link_bw": cap.link_bw,
            "host_compute_bw": cap.host_compute_bw,
            "origin": cap.origin,
        },
        "placement": place,
        "per_token": {"uniform": uniform, "hit_rate": None if hit_rate is None else at_hit},
        "hit_rate": hit_rate,
    }
    report["ceiling"] = {
        "uniform": ceiling(uniform, place["compute"], cap, place["fits"]),
        "hit_rate": None if hit_rate is None else ceiling(at_hit, place["compute"], cap, place["fits"]),
    }
    return report


def placement(dense: int, state: int, sizes: dict[str, int], files: int, cap: Capacities) -> dict[str, Any]:
    """Where the dense weights, the state and each whole expert file (``sizes``: its bytes in each
    tier) live (see the module doc)."""
    notes: list[str] = []
    compute = "cpu"
    if cap.gpu > 0:
        if dense + state <= cap.gpu:
            compute = "gpu"
        else:
            notes.append(
                f"the dense weights and state ({_gbs(dense + state)}) do not fit the GPU's {_gbs(cap.gpu)}: "
                "the CPU computes"
            )
    gpu_left = cap.gpu - dense - state if compute == "gpu" else 0
    host_left = cap.ram - (0 if compute == "gpu" else dense + state)
    fits = host_left >= 0
    if not fits:
        notes.append(f"the dense weights and state ({_gbs(dense + state)}) do not fit host memory ({_gbs(cap.ram)})")
    host_left = max(0, host_left)
    pinned = cap.pinned if cap.pinned is not None else (host_left if compute == "gpu" else 0)
    if pinned > host_left:
        notes.append(f"--pinned {_gbs(pinned)} is over the {_gbs(host_left)} of host memory left: cut to it")
        pinned = host_left
    slots = {
        "gpu": int(gpu_left // sizes["gpu"]),
        "pinned": int(pinned // sizes["pinned"]),
        "page_cache": int((host_left - pinned) // sizes["page_cache"]),
    }
    experts: dict[str, int] = {}
    left = files
    for tier in ("gpu", "pinned", "page_cache"):
        experts[tier] = min(slots[tier], left)
        left -= experts[tier]
    experts["disk"] = left
    return {
        "compute": compute,
        "fits": fits,
        "dense": "gpu" if compute == "gpu" else "ram",
        "state": "gpu" if compute == "gpu" else "ram",
        "gpu_free_for_experts": gpu_left,
        "host_free_for_experts": host_left,
        "pinned_bytes": pinned,
        "experts": experts,
        "expert_bytes": {tier: n * sizes[tier] for tier, n in experts.items()},
        "notes": notes,
    }


def traffic(
    cfg: TextConfig,
    k: int,
    sizes: dict[str, int],
    experts: dict[str, int],
    dense_per_token: int,
    state: dict[str, int],
    hit_rate: float | None,
) -> dict[str, Any]:
    """Bytes read per decoded token from each tier: experts (uniform routing, or ``hit_rate`` of them
    from memory; ``sizes``: a file's bytes in each tier), plus the dense weights and the state."""
    choices = k * cfg.num_hidden_layers  # routed experts a token
    files = sum(experts.values())
    resident = files - experts["disk"]
    if hit_rate is None:
        share = {tier: experts[tier] / files for tier in TIERS}  # K x n / E x file = total x n / (L x E)
    else:
        if hit_rate > 0 and resident == 0:
            raise FmoeError(f"--hit-rate: {hit_rate} but no expert file fits in memory here")
        share = {tier: (hit_rate * experts[tier] / resident if resident else 0.0) for tier in TIERS[:3]}
        share["disk"] = 1.0 - hit_rate
    expert_bytes = {
        tier: (
            _ratio(k * experts[tier] * sizes[tier], cfg.num_experts)
            if hit_rate is None
            else share[tier] * (choices * sizes[tier])
        )
        for tier in TIERS
    }
    one_width = len(set(sizes.values())) == 1
    return {
        "experts_total": choices * sizes["gpu"] if one_width else sum(expert_bytes.values()),
        "experts": expert_bytes,
        "hit": 1.0 - share["disk"],
        "dense": dense_per_token,
        "state": state["kv"] + state["deltanet"],
    }


def _ratio(a: int, b: int) -> int | float:
    """a / b, an exact integer when it is one."""
    q, r = divmod(a, b)
    return q if r == 0 else a / b


def ceiling(per_token: dict[str, Any], compute: str, cap: Capacities, fits: bool) -> dict[str, Any]:
    """Each path's bound (bandwidth / bytes per token) and the smallest: the tokens/s ceiling.

    With the host's cores computing part of the page-locked experts (``host_compute_bw``), the link
    and the cores share those bytes: the link still carries every other expert byte off the GPU, and
    together they move all of it at the sum of their rates at best (the cores taking ``host_share``
    of the page-locked bytes); host memory serves both."""
    e = per_token["experts"]
    resident_bytes = per_token["dense"] + per_token["state"]
    off_gpu = e["pinned"] + e["page_cache"] + e["disk"]
    host_share = None
    if compute == "gpu":
        paths = {"disk": (e["disk"], cap.disk_bw), "link": (off_gpu, cap.link_bw)}
        if cap.host_compute_bw is not None:
            both = None if cap.link_bw is None else cap.link_bw + cap.host_compute_bw
            paths["link"] = (e["page_cache"] + e["disk"], cap.link_bw)
            paths["link+host"] = (off_gpu, both)
            if both is not None and e["pinned"]:
                host_share = min(1.0, off_gpu * cap.host_compute_bw / both / e["pinned"])
        paths |= {
            "ram": (off_gpu, cap.ram_bw),
            "gpu": (resident_bytes + per_token["experts_total"], cap.gpu_bw),
        }
    else:
        paths = {"disk": (e["disk"], cap.disk_bw), "ram": (resident_bytes + per_token["experts_total"], cap.ram_bw)}
    bounds: dict[str, Any] = {}
    for name, (nbytes, bw) in paths.items():
        if nbytes <= 0:
            continue
        bounds[name] = {
            "bytes_per_token": nbytes,
            "bandwidth": bw,
            "seconds_per_token": None if bw is None else nbytes / bw,
            "tokens_per_second": None if bw is None else bw / nbytes,
        }
    known = {n: b for n, b in bounds.items() if b["tokens_per_second"] is not None}
    limit = min(known, key=lambda n: known[n]["tokens_per_second"]) if known and fits else None
    return {
        "paths": bounds,
        "unknown": sorted(n for n, b in bounds.items() if b["bandwidth"] is None),
        "limited_by": limit,
        "tokens_per_second": known[limit]["tokens_per_second"] if limit else None,
        "host_share": host_share,
    }


# ---- showing it ------------------------------------------------------------------------------------------
def _gbs(n: float) -> str:
    return f"{n / GB:,.2f} GB" if n >= 1e8 or n == 0 else f"{n / 1e6:,.2f} MB"


def _b(n: float) -> str:
    return f"{n:,.0f} B" if float(n).is_integer() else f"{n:,.1f} B"


def render(r: dict[str, Any]) -> list[str]:
    """The plan as lines, each figure with the arithmetic that gives it."""
    m, b, p, cap = r["model"], r["bytes"], r["placement"], r["capacities"]
    L, E, k, fs = m["layers"], m["experts"], r["k"], b["expert_file"]
    sizes = {tier: fs if tier == "gpu" else b["host_expert_file"] for tier in TIERS}
    hk = b["kv_per_token"] // max(1, m["full_attention_layers"] * 2 * FLOAT32) if m["full_attention_layers"] else 0
    lines = [
        f"{m['name']} ({m['kind']}): {L} layers ({m['full_attention_layers']} full attention, "
        f"{m['linear_attention_layers']} DeltaNet), hidden {m['hidden_size']}, {E} experts, "
        f"top-{m['experts_per_token']}",
        "",
        "bytes",
        f"  experts   {r['bits']}-bit: {_b(fs)} per file (3 projections of {m['moe_intermediate_size']} x "
        f"{m['hidden_size']}, 4 KiB aligned) x {L} layers x {E} experts = {b['expert_files']:,} files "
        f"= {_b(b['experts'])} ({_gbs(b['experts'])})",
        *(
            [f"  host      --host-bits {r['host_bits']}: {_b(sizes['pinned'])} per file off the GPU"]
            if r["host_bits"]
            else []
        ),
        f"  dense     --dense-bits {r['dense_bits']} (routers >= 8 bits, vectors float32) = {_b(b['dense'])} "
        f"({_gbs(b['dense'])}), of which the embedding {_gbs(b['dense_embedding'])}",
        f"  KV        {m['full_attention_layers']} full layers x 2 (K, V) x {hk} (KV heads x head_dim) x 4 B "
        f"= {_b(b['kv_per_token'])} per token x {r['context']:,} tokens = {_gbs(b['kv'])} per sequence",
        f"  DeltaNet  {m['linear_attention_layers']} linear layers x {_b(b['deltanet_per_layer'])} (recurrent + "
        f"conv state, float32) = {_gbs(b['deltanet'])} per sequence",
        "",
        "capacities",
    ]
    origin = cap["origin"]
    for key, label, unit in (
        ("gpu", "GPU memory", "GB"),
        ("ram", "host memory", "GB"),
        ("disk_bw", "disk read", "GB/s"),
        ("link_bw", "host to GPU", "GB/s"),
        ("ram_bw", "host memory bw", "GB/s"),
        ("gpu_bw", "GPU memory bw", "GB/s"),
        ("host_compute_bw", "host cores", "GB/s"),
    ):
        value = cap.get(key)
        if key == "host_compute_bw" and value is None:
            continue  # (the runtime's --host-compute: only planned when given)
        shown = "unknown" if value is None else f"{value / GB:,.2f} {unit}"
        lines.append(f"  {label:<15} {shown}  ({origin.get(key, 'not given' if value is None else 'given')})")
    lines += ["", f"placement (the {p['compute'].upper()} computes)"]
    lines.append(f"  dense + state: {p['dense']} ({_gbs(b['dense'] + b['state'])})")
    for tier in TIERS:
        n = p["experts"][tier]
        lines.append(f"  {tier:<11} {n:>9,} expert files x {_b(sizes[tier])} = {_gbs(n * sizes[tier])}")
    lines += [f"  note: {n}" for n in p["notes"]]
    for key, title in (("uniform", "uniform routing"), ("hit_rate", f"hit rate {r['hit_rate']}")):
        t = r["per_token"][key]
        if t is None:
            continue
        lines += [
            "",
            f"per token, {title} (K={k}): {k} x {L} layers x {_b(fs)} = {_gbs(t['experts_total'])} of experts"
            if not r["host_bits"]
            else f"per token, {title} (K={k}): {k} x {L} layers of experts, each at its tier's width",
        ]
        resident = sum(p["experts"][tier] for tier in TIERS[:3])
        for tier in TIERS:
            n = p["experts"][tier]
            if key == "uniform":
                how = f"{k} x {n:,} / {E} x {_b(sizes[tier])}"
            elif tier == "disk":
                how = f"(1 - {r['hit_rate']}) x {_gbs(t['experts_total'])}"
            else:
                how = f"{r['hit_rate']} x {n:,} / {resident:,} x {_gbs(t['experts_total'])}"
            lines.append(f"  {tier:<11} {how} = {_gbs(t['experts'][tier])}")
        lines.append(f"  dense {_gbs(t['dense'])} (the embedding: one row), state {_gbs(t['state'])}")
        c = r["ceiling"][key]
        for name, bound in c["paths"].items():
            if bound["bandwidth"] is None:
                lines.append(f"  {name:<9} {_gbs(bound['bytes_per_token'])} per token / bandwidth unknown")
            else:
                lines.append(
                    f"  {name:<9} {_gbs(bound['bytes_per_token'])} / {bound['bandwidth'] / GB:,.2f} GB/s = "
                    f"{bound['seconds_per_token']:.4f} s -> {bound['tokens_per_second']:.3f} tok/s"
                )
        if c["tokens_per_second"] is not None:
            unknown = f" (bandwidth unknown: {', '.join(c['unknown'])})" if c["unknown"] else ""
            lines.append(f"  ceiling {c['tokens_per_second']:.3f} tok/s, limited by {c['limited_by']}{unknown}")
        else:
            lines.append("  ceiling unknown (pass the bandwidths: --disk-bw, --link-bw, --ram-bw, --gpu-bw)")
        if c["host_share"] is not None:
            share = c["host_share"]
            lines.append(f"  the host's cores take {share:.2f} of the page-locked experts' bytes (--host-compute)")
    return lines
