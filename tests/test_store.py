"""The expert store (runtime/experts.py) and the dense loader (runtime/dense.py) on a tiny packed model."""

from __future__ import annotations

import json
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from fmoe.errors import CorruptionError, FmoeError
from fmoe.formats.packed import DENSE_MANIFEST, ExpertLayout, expert_relpath, read_identity
from fmoe.formats.quant import bf16_to_f32
from fmoe.runtime.dense import DenseWeights
from fmoe.runtime.diagnostics import build_packed
from fmoe.runtime.experts import ExpertStore


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(source checkpoint, packed directory with bf16 dense weights and 4-bit experts)."""
    return build_packed(tmp_path_factory.mktemp("store"), seed=3)


@pytest.fixture(scope="module")
def packed(artifacts: tuple[Path, Path]) -> Path:
    return artifacts[1]


@pytest.fixture
def packed_copy(packed: Path, tmp_path: Path) -> Path:
    """A private copy to damage."""
    return Path(shutil.copytree(packed, tmp_path / "packed"))


def _direct(packed: Path, bits: int, layer: int, expert: int) -> dict[str, np.ndarray]:
    """The nine arrays of an expert file, parsed straight from a plain read (the reference)."""
    _, cfg = read_identity(packed)
    layout = ExpertLayout.for_config(cfg, bits)
    data = (packed / f"experts-q{bits}" / expert_relpath(layer, expert)).read_bytes()
    assert len(data) == layout.file_size
    dtypes = {"uint32": np.uint32, "bf16": np.uint16}
    return {
        name: np.frombuffer(data[c.offset : c.offset + c.size], dtype=dtypes[c.dtype]).reshape(c.shape)
        for name, c in layout.components.items()
    }


def _assert_same(fetched, direct: dict[str, np.ndarray]) -> None:
    for proj, qt in (("gate_proj", fetched.gate), ("up_proj", fetched.up), ("down_proj", fetched.down)):
        for part in ("weight", "scales", "biases"):
            np.testing.assert_array_equal(getattr(qt, part), direct[f"{proj}.{part}"])


def test_parallel_reads_equal_direct_reads(packed: Path, rng: np.random.Generator) -> None:
    store = ExpertStore(packed, 4, io_threads=4, parallel_min_bytes=0)  # force the thread pool
    cfg = store.config
    for layer in rng.choice(cfg.num_hidden_layers, 3, replace=False):
        experts = [int(e) for e in rng.choice(cfg.num_experts, 6, replace=False)]
        got = store.fetch(int(layer), experts)
        assert list(got) == experts
        for e in experts:
            _assert_same(got[e], _direct(packed, 4, int(layer), e))
            assert got[e].gate.shape == (cfg.moe_intermediate_size, cfg.hidden_size)
            assert got[e].down.shape == (cfg.hidden_size, cfg.moe_intermediate_size)
    s = store.stats.summary()
    assert s["reads"] == 18 and s["misses"] == 18 and s["hits"] == 0
    assert s["bytes"] == 18 * store.layout.file_size
    store.close()


def test_short_read_is_corruption(packed_copy: Path) -> None:
    path = packed_copy / "experts-q4" / expert_relpath(2, 5)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 4096)
    store = ExpertStore(packed_copy, 4)
    store.fetch(2, [4, 6])  # the other files are fine
    with pytest.raises(CorruptionError, match=r"expert_0005\.bin: short read"):
        store.fetch(2, [4, 5, 6])


def test_verify_reads_catches_flipped_byte(packed_copy: Path) -> None:
    path = packed_copy / "experts-q4" / expert_relpath(1, 7)
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x10
    path.write_bytes(bytes(data))
    ExpertStore(packed_copy, 4).fetch(1, [7])  # same length: only the checksum can tell
    with pytest.raises(CorruptionError, match=r"expert_0007\.bin: xxh3_128 mismatch"):
        ExpertStore(packed_copy, 4, verify_reads=True).fetch(1, [3, 7])
    ExpertStore(packed_copy, 4, verify_reads=True).fetch(1, [3, 8])  # intact files pass


def test_cache_hits_lru_eviction_and_stats(packed: Path) -> None:
    _, cfg = read_identity(packed)
    size = ExpertLayout.for_config(cfg, 4).file_size
    store = ExpertStore(packed, 4, cache_bytes=int(2.5 * size))  # room for two experts
    store.fetch(0, [0, 1])  # miss, miss
    first = store.fetch(0, [0, 1])  # hit, hit
    _assert_same(first[1], _direct(packed, 4, 0, 1))
    store.fetch(0, [2])  # miss; evicts expert 0 (least recently used)
    store.fetch(0, [1])  # hit
    store.fetch(0, [0])  # miss again
    row = store.stats.layers[0]
    assert (row.hits, row.misses, row.reads, row.bytes) == (3, 4, 4, 4 * size)
    assert store.cached_bytes == 2 * size <= store.cache_bytes
    s = store.stats.summary()
    assert s["hit_rate"] == pytest.approx(3 / 7)
    assert s["per_layer"][0]["hits"] == 3 and s["per_layer"][1]["reads"] == 0
    store.stats.reset()
    assert store.stats.summary()["reads"] == 0


def test_cache_recycles_evicted_buffers(packed: Path, rng: np.random.Generator) -> None:
    """Under eviction pressure every fetch returns the right bytes, while the buffers (cache entries
    plus recycled slots) stay bounded by the budget plus one fetch: nothing is allocated per token."""
    _, cfg = read_identity(packed)
    store = ExpertStore(packed, 4, cache_bytes=int(3.5 * ExpertLayout.for_config(cfg, 4).file_size))
    size, k = store.layout.file_size, 2
    made = []
    new_slot = store._slot
    store._slot = lambda: made.append(1) or new_slot()  # count buffer allocations
    for _ in range(60):
        layer = int(rng.integers(2))
        experts = [int(e) for e in rng.choice(6, k, replace=False)]
        got = store.fetch(layer, experts)
        for e in experts:
            _assert_same(got[e], _direct(packed, 4, layer, e))
        assert store.cached_bytes <= store.cache_bytes
        assert store.pool_bytes + store.cached_bytes <= (3 + 2 * k) * size
    s = store.stats.summary()
    assert s["hits"] > 0 and s["reads"] > 20
    assert len(made) <= 3 + 2 * k  # the same few buffers, over and over


def test_expert_file_longer_than_its_layout_is_refused(packed_copy: Path) -> None:
    path = packed_copy / "experts-q4" / expert_relpath(4, 2)
    with open(path, "ab") as f:
        f.write(b"\0" * 4096)  # a read of the layout's length would succeed, and hash clean
    with pytest.raises(CorruptionError, match=r"expert_0002\.bin: \d+ bytes, longer than"):
        ExpertStore(packed_copy, 4, verify_reads=True).fetch(4, [2])


def test_expert_larger_than_budget_is_not_cached(packed: Path) -> None:
    store = ExpertStore(packed, 4, cache_bytes=100)
    store.fetch(3, [1])
    got = store.fetch(3, [1])
    assert store.stats.layers[3].hits == 0 and store.cached_bytes == 0
    assert store.stats.layers[3].reads == 2
    _assert_same(got[1], _direct(packed, 4, 3, 1))


def test_memory_bounded_pool_does_not_grow(packed: Path, rng: np.random.Generator) -> None:
    store = ExpertStore(packed, 4)
    cfg, k = store.config, store.config.num_experts_per_tok
    store.fetch(0, list(range(k)))
    pool = store.pool_bytes
    assert pool == k * store.layout.file_size
    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    for _ in range(200):
        layer = int(rng.integers(cfg.num_hidden_layers))
        store.fetch(layer, [int(e) for e in rng.choice(cfg.num_experts, k, replace=False)])
    now, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert store.pool_bytes == pool
    assert now - base < store.layout.file_size  # nothing accumulates per read
    assert store.stats.summary()["reads"] == 200 * k + k


def test_views_valid_until_next_fetch_and_pool_follows_largest_fetch(packed: Path) -> None:
    store = ExpertStore(packed, 4)
    assert list(store.fetch(5, [9, 3, 9])) == [9, 3]  # duplicates read once
    got = store.fetch(5, [12])
    _assert_same(got[12], _direct(packed, 4, 5, 12))
    assert store.pool_bytes == 2 * store.layout.file_size  # the pool follows the largest fetch


def test_bad_requests(packed: Path) -> None:
    store = ExpertStore(packed, 4)
    with pytest.raises(FmoeError, match="expert 15 out of range"):
        store.fetch(0, [15])
    with pytest.raises(FmoeError, match="layer 8 out of range"):
        store.fetch(8, [0])


def test_missing_manifest_or_file(packed_copy: Path) -> None:
    with pytest.raises(FmoeError, match=r"experts-q2.*fmoe repack"):
        ExpertStore(packed_copy, 2)
    (packed_copy / "experts-q4" / expert_relpath(0, 2)).unlink()
    store = ExpertStore(packed_copy, 4)
    with pytest.raises(FmoeError, match=r"expert_0002\.bin: missing expert file"):
        store.fetch(0, [2])


def test_other_models_manifest_is_refused(packed_copy: Path) -> None:
    path = packed_copy / "experts-q4" / "manifest.json"
    doc = json.loads(path.read_text())
    doc["model_fingerprint"] = "0123456789abcdef"
    path.write_text(json.dumps(doc))
    with pytest.raises(FmoeError, match="belongs to another model"):
        ExpertStore(packed_copy, 4)


def test_incomplete_manifest_is_refused(packed_copy: Path) -> None:
    path = packed_copy / "experts-q4" / "manifest.json"
    doc = json.loads(path.read_text())
    del doc["files"][expert_relpath(7, 14)]
    path.write_text(json.dumps(doc))
    with pytest.raises(FmoeError, match=r"layer_007/expert_0014\.bin is not listed"):
        ExpertStore(packed_copy, 4)


# ---- dense weights ------------------------------------------------------------------------------
def test_dense_load_matches_file_and_embeds_rows(packed: Path, rng: np.random.Generator) -> None:
    doc, cfg = read_identity(packed)
    dense = DenseWeights(packed, cfg, fingerprint=doc["model_fingerprint"], verify_reads=True)
    manifest = json.loads((packed / DENSE_MANIFEST).read_text())
    data = (packed / "model_weights.bin").read_bytes()
    for name in ("norm.weight", "layers.0.linear_attn.in_proj_qkv.weight", "layers.3.self_attn.o_proj.weight"):
        part = manifest["tensors"][name]["parts"]["data"]
        raw = np.frombuffer(
            data[part["offset"] : part["offset"] + part["size"]],
            dtype=np.uint16 if part["dtype"] in ("bf16", "bfloat16") else np.float32,
        )
        want = bf16_to_f32(raw) if raw.dtype == np.uint16 else raw
        got = dense[name]
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got.reshape(-1), want)
    ids = rng.integers(0, cfg.vocab_size, 7)
    table = np.asarray(dense["embed_tokens.weight"])
    np.testing.assert_array_equal(dense.embed(ids), table[ids])
    with pytest.raises(FmoeError, match="outside the vocabulary"):
        dense.embed([cfg.vocab_size])


def test_dense_load_holds_little_beyond_the_resident_weights(packed: Path) -> None:
    """Parts are read into their final arrays (bf16 widened chunk by chunk): the peak while loading
    is the resident weights plus small change, never the whole file on top of them."""
    _, cfg = read_identity(packed)
    file_size = (packed / "model_weights.bin").stat().st_size
    tracemalloc.start()
    dense = DenseWeights(packed, cfg)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert dense.nbytes > file_size  # bf16 matrices became float32
    assert peak - dense.nbytes < file_size / 4


def test_dense_quantised_tensors_stay_packed(tmp_path: Path, artifacts: tuple[Path, Path]) -> None:
    from fmoe.convert.extract import extract

    out = tmp_path / "q"
    extract(artifacts[0], out, dense_bits=4)
    _, cfg = read_identity(out)
    dense = DenseWeights(out, cfg, verify_reads=True)
    qt = dense["layers.0.mlp.shared_expert.up_proj.weight"]
    assert qt.bits == 4 and qt.shape == (cfg.shared_expert_intermediate_size, cfg.hidden_size)
    ids = [0, 5, 17]
    np.testing.assert_array_equal(dense.embed(ids), dense["embed_tokens.weight"].dequantize()[ids])


def test_dense_missing_tensor_and_flipped_byte(packed_copy: Path) -> None:
    _, cfg = read_identity(packed_copy)
    path = packed_copy / DENSE_MANIFEST
    manifest = json.loads(path.read_text())
    entry = manifest["tensors"]["layers.2.linear_attn.in_proj_z.weight"]
    offset = entry["parts"]["data"]["offset"]
    with open(packed_copy / "model_weights.bin", "r+b") as f:
        f.seek(offset + 11)
        byte = f.read(1)
        f.seek(offset + 11)
        f.write(bytes([byte[0] ^ 0x04]))
    DenseWeights(packed_copy, cfg)  # without verification the flip goes unnoticed
    with pytest.raises(CorruptionError, match=r"layers\.2\.linear_attn\.in_proj_z\.weight fails its xxh3_128"):
        DenseWeights(packed_copy, cfg, verify_reads=True)
    del manifest["tensors"]["layers.5.mlp.gate.weight"]
    path.write_text(json.dumps(manifest))
    with pytest.raises(FmoeError, match=r"tensor layers\.5\.mlp\.gate\.weight is missing"):
        DenseWeights(packed_copy, cfg)


def test_dense_truncated_file(packed_copy: Path) -> None:
    _, cfg = read_identity(packed_copy)
    with open(packed_copy / "model_weights.bin", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(CorruptionError, match="truncated"):
        DenseWeights(packed_copy, cfg)
