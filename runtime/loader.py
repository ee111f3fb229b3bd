"""Open a packed directory for inference: check it is complete and all of one model, then build
the dense weights, the expert store, the backend, the network and the tokenizer.

These are cheap structural checks with one-line errors; the full checksum pass is `fmoe verify`
(`verify_reads=True` adds per-tensor and per-read xxh3_128 checks at run time).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from fmoe.errors import FmoeError
from fmoe.formats.packed import (
    DENSE_BIN,
    DENSE_MANIFEST,
    EXPERT_MANIFEST,
    IDENTITY_FILE,
    experts_dirname,
    read_identity,
)
from fmoe.runtime.engine import Model

# backend name -> (module, class); imported only when chosen
BACKENDS = {"cpu": ("fmoe.runtime.backends.cpu", "CpuBackend")}
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
        if not (p / name).is_file():
            raise FmoeError(f"{p}: incomplete, no {name}; run `fmoe extract SOURCE --out {p}`")
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


def make_backend(name: str, **options: Any) -> Any:
    if name not in BACKENDS:
        raise FmoeError(f"--backend {name!r}: unknown backend (available: {', '.join(BACKENDS)})")
    module, cls = BACKENDS[name]
    return getattr(importlib.import_module(module), cls)(**options)


def load_model(
    packed_dir: Path | str,
    bits: int = 4,
    backend: str = "cpu",
    k: int | None = None,
    cache_bytes: int = 0,
    verify_reads: bool = False,
    io_threads: int | None = None,
    max_context: int | None = None,
    warmup: bool = True,
    fetch_buffer_bytes: int = 1 << 30,
    backend_options: dict[str, Any] | None = None,
) -> Model:
    """Load a packed model for inference (see fmoe.load)."""
    from fmoe.runtime.chat import ChatTemplate, stop_token_ids
    from fmoe.runtime.dense import DenseWeights
    from fmoe.runtime.experts import ExpertStore
    from fmoe.runtime.model import Qwen35MoeNetwork, check_k
    from fmoe.runtime.tokenizer import Tokenizer

    p = check_packed_dir(packed_dir, bits)
    identity, cfg = read_identity(p)
    k = check_k(cfg, k)  # before the (long) loading of the weights
    if max_context is not None and not 1 <= max_context <= cfg.max_position_embeddings:
        raise FmoeError(f"--max-context {max_context}: must be between 1 and {cfg.max_position_embeddings}")
    if cache_bytes < 0:
        raise FmoeError("--cache-gb: must be >= 0")
    be = make_backend(backend, **(backend_options or {}))
    # the cheap checks first: the dense weights take long to load on a big model
    store = ExpertStore(p, bits, cache_bytes=cache_bytes, verify_reads=verify_reads, io_threads=io_threads)
    tokenizer = Tokenizer(p / "tokenizer.json")
    chat_template = ChatTemplate.from_dir(p)
    dense = DenseWeights(p, cfg, fingerprint=identity["model_fingerprint"], verify_reads=verify_reads)
    # A long prefill may route to every expert of a layer: cap one fetch (the store's buffer pool)
    # at fetch_buffer_bytes; each expert is still read once per layer.
    fetch_chunk = max(k, fetch_buffer_bytes // store.layout.file_size)
    network = Qwen35MoeNetwork(cfg, dense, store, be, k, fetch_chunk=fetch_chunk)
    if warmup:
        be.warmup()
    return Model(
        config=cfg,
        tokenizer=tokenizer,
        network=network,
        store=store,
        chat_template=chat_template,
        stop_ids=stop_token_ids(cfg, tokenizer, p),
        packed_dir=p,
        bits=bits,
        max_context=max_context or cfg.max_position_embeddings,
    )
