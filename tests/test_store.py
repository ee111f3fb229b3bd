"""The expert store (runtime/experts/) and the dense loader (runtime/dense.py) on a tiny packed model."""

from __future__ import annotations

import json
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import fmoe
from fmoe.errors import CorruptionError, FmoeError
from fmoe.formats.expert_manifest import ExpertManifest
from fmoe.formats.packed import DENSE_MANIFEST, ExpertLayout, expert_relpath, read_identity
from fmoe.formats.quant import bf16_to_f32
from fmoe.runtime.dense import read_dense_weights
from fmoe.runtime.diagnostics import build_packed
from fmoe.runtime.experts.cache import HostCache
from fmoe.runtime.experts.files import ExpertFiles
from fmoe.runtime.experts.store import ExpertStore


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


def make_store(
    packed: Path, bits: int = 4, *, cache_bytes: int = 0, checks: str = "first-read", io: str = "pread", **options
) -> ExpertStore:
    _, cfg = read_identity(packed)
    manifest = ExpertManifest.read(packed, cfg, bits)
    cache = HostCache(manifest.layout, cache_bytes) if cache_bytes else None
    files = ExpertFiles(manifest, checks=checks, io=io)
    return ExpertStore(files, cfg.num_hidden_layers, cfg.num_experts, cache=cache, **options)


def fetch(store: ExpertStore, layer: int, experts: list[int]) -> dict[int, tuple[str, dict[str, np.ndarray]]]:
    """Draw the whole ticket; per expert: the tier's table it came in and a copy of its nine arrays
    (a part is valid only until the next is drawn)."""
    out = {}
    for part in store.resident(layer, experts):
        tier = "memory" if store.cache is not None and part.table is store.cache.table else "pool"
        for e, w in part.experts():
            out[e] = (tier, _arrays(w))
    return out


def _arrays(w) -> dict[str, np.ndarray]:
    return {
        f"{proj}.{part}": np.array(getattr(getattr(w, name), part))
        for proj, name in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down"))
        for part in ("weight", "scales", "biases")
    }


def _assert_same(got: dict[str, np.ndarray], direct: dict[str, np.ndarray]) -> None:
    assert got.keys() == direct.keys()
    for name in direct:
        np.testing.assert_array_equal(got[name], direct[name])


def test_parallel_reads_equal_direct_reads(packed: Path, rng: np.random.Generator) -> None:
    store = make_store(packed, io_threads=4, parallel_min_bytes=0)  # force the thread pool
    _, cfg = read_identity(packed)
    for layer in rng.choice(cfg.num_hidden_layers, 3, replace=False):
        experts = [int(e) for e in rng.choice(cfg.num_experts, 6, replace=False)]
        got = fetch(store, int(layer), experts)
        assert sorted(got) == sorted(experts)
        for e in experts:
            _assert_same(got[e][1], _direct(packed, 4, int(layer), e))
    s = store.stats
    assert int(s.requested.sum()) == 18 and store.stats.tier("disk")["served"] == 18
    assert store.stats.tier("disk")["bytes"] == 18 * store.layout.file_size
    assert store.stats.tier("memory")["served"] == 0
    store.close()


def test_views_are_of_the_slot_table(packed: Path) -> None:
    """A part hands out strided views of its tier's slab: nothing is copied between read and compute."""
    store = make_store(packed)
    (part,) = list(store.resident(2, [3, 9]))
    assert part.table is store.pool.table and sorted(part.ids.tolist()) == [3, 9]
    for _, w in part.experts():
        assert np.shares_memory(w.gate.weight, store.pool.data) and np.shares_memory(w.down.biases, store.pool.data)


def test_short_read_is_corruption_and_releases_the_slots(packed_copy: Path) -> None:
    path = packed_copy / "experts-q4" / expert_relpath(2, 5)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 4096)
    store = make_store(packed_copy, io_threads=3, parallel_min_bytes=0)
    fetch(store, 2, [4, 6])  # the other files are fine
    free = len(store._pool_free)
    with pytest.raises(CorruptionError, match=r"expert_0005\.bin: short read"):
        fetch(store, 2, [4, 5, 6])
    assert len(store._pool_free) == free  # every slot back: none leaks to a failed request
    fetch(store, 2, [4, 6])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x10
    path.write_bytes(bytes(data))


def test_checks_catch_a_flipped_byte(packed_copy: Path) -> None:
    _flip(packed_copy / "experts-q4" / expert_relpath(1, 7))
    fetch(make_store(packed_copy, checks="off"), 1, [7])  # same length: only the checksum can tell
    for checks in ("first-read", "every-read"):
        with pytest.raises(CorruptionError, match=r"expert_0007\.bin: xxh3_128 mismatch"):
            fetch(make_store(packed_copy, checks=checks), 1, [3, 7])
        fetch(make_store(packed_copy, checks=checks), 1, [3, 8])  # intact files pass
    with pytest.raises(FmoeError, match="--checks 'sometimes'"):
        make_store(packed_copy, checks="sometimes")


def test_first_read_proves_a_file_once_every_read_always(packed_copy: Path) -> None:
    first, every = make_store(packed_copy), make_store(packed_copy, checks="every-read")
    fetch(first, 2, [5])
    fetch(every, 2, [5])
    _flip(packed_copy / "experts-q4" / expert_relpath(2, 5))  # changed under a running process
    fetch(first, 2, [5])  # proven on its first read: not hashed again (the documented trade-off)
    with pytest.raises(CorruptionError, match="xxh3_128 mismatch"):
        fetch(every, 2, [5])


def test_cache_hits_lru_eviction_and_stats(packed: Path) -> None:
    _, cfg = read_identity(packed)
    size = ExpertLayout.for_config(cfg, 4).file_size
    store = make_store(packed, cache_bytes=int(2.5 * size))  # room for two experts
    assert store.cache_bytes == 2 * size
    assert {t for t, _ in fetch(store, 0, [0, 1]).values()} == {"memory"}  # misses read into cache slots
    first = fetch(store, 0, [0, 1])  # hit, hit
    _assert_same(first[1][1], _direct(packed, 4, 0, 1))
    fetch(store, 0, [2])  # miss; evicts expert 0 (least recently used)
    fetch(store, 0, [1])  # hit
    fetch(store, 0, [0])  # miss again
    s = store.stats
    assert int(s.requested[0]) == 7
    assert store.stats.tier("memory")["served"] == 3 and store.stats.tier("disk")["served"] == 4
    assert store.stats.tier("disk")["bytes"] == 4 * size
    assert store.stats.tier("memory")["share"] == pytest.approx(3 / 7)
    assert len(store.cache) == 2 and store.cache.nbytes == 2 * size
    before = store.stats.copy()
    fetch(store, 1, [5])
    delta = store.stats - before
    assert int(delta.requested.sum()) == 1 and int(delta.requested[1]) == 1 and delta.tier("disk")["served"] == 1


def test_cache_under_eviction_pressure_stays_correct(packed: Path, rng: np.random.Generator) -> None:
    """Random requests larger than the cache: every expert arrives with the right bytes, hits and
    misses add up, and the slabs never grow (the slots are reused)."""
    _, cfg = read_identity(packed)
    size = ExpertLayout.for_config(cfg, 4).file_size
    store = make_store(packed, cache_bytes=3 * size, pool_bytes=4 * size)
    slabs = (store.cache.slab.data, store.pool.data)
    for _ in range(60):
        layer = int(rng.integers(2))
        experts = [int(e) for e in rng.choice(6, int(rng.integers(1, 6)), replace=False)]
        got = fetch(store, layer, experts)
        assert sorted(got) == sorted(experts)
        for e in experts:
            _assert_same(got[e][1], _direct(packed, 4, layer, e))
        assert len(store.cache) <= 3
    s = store.stats
    assert store.stats.tier("memory")["served"] > 0 and store.stats.tier("disk")["served"] > 20
    assert store.stats.tier("memory")["served"] + store.stats.tier("disk")["served"] == int(s.requested.sum())
    assert (store.cache.slab.data, store.pool.data) == slabs  # same buffers throughout


def test_more_misses_than_pool_slots_come_in_overlapping_batches(packed: Path) -> None:
    """A pool of 4 slots and 11 misses: batches of 2 (half the pool, so one is read while the one
    before is computed), each expert once, the right bytes, no slot held by two parts at once."""
    _, cfg = read_identity(packed)
    size = ExpertLayout.for_config(cfg, 4).file_size
    store = make_store(packed, pool_bytes=4 * size, io_threads=2, parallel_min_bytes=0)
    wanted = list(range(11))
    seen = []
    for part in store.resident(3, wanted):
        assert len(part) <= 2
        for e, w in part.experts():
            _assert_same(_arrays(w), _direct(packed, 4, 3, e))
            seen.append(e)
    assert sorted(seen) == wanted
    assert store.stats.tier("disk")["served"] == 11 and len(store._pool_free) == 4


def test_abandoned_ticket_gives_its_slots_back(packed: Path) -> None:
    _, cfg = read_identity(packed)
    size = ExpertLayout.for_config(cfg, 4).file_size
    store = make_store(packed, pool_bytes=4 * size, io_threads=2, parallel_min_bytes=0)
    ticket = store.resident(0, list(range(9)))
    next(ticket)  # one part drawn, more in flight
    ticket.close()  # the consumer gave up (an exception in the MoE op, say)
    assert len(store._pool_free) == 4
    assert sorted(fetch(store, 0, [1, 2, 3])) == [1, 2, 3]


def test_expert_file_longer_than_its_layout_is_refused(packed_copy: Path) -> None:
    path = packed_copy / "experts-q4" / expert_relpath(4, 2)
    with open(path, "ab") as f:
        f.write(b"\0" * 4096)  # a read of the layout's length would succeed, and hash clean
    with pytest.raises(CorruptionError, match=r"expert_0002\.bin: \d+ bytes, longer than"):
        fetch(make_store(packed_copy, checks="off"), 4, [2])


def test_cache_smaller_than_an_expert_is_refused(packed: Path) -> None:
    with pytest.raises(ValueError, match="holds no"):
        make_store(packed, cache_bytes=100)
    with fmoe.load(packed, cache_bytes=100) as model:  # the loader then runs without a cache
        assert model.runner.store.cache is None


def test_memory_bounded_nothing_allocated_per_request(packed: Path, rng: np.random.Generator) -> None:
    store = make_store(packed)
    _, cfg = read_identity(packed)
    k = cfg.num_experts_per_tok
    fetch(store, 0, list(range(k)))
    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    for _ in range(200):
        layer = int(rng.integers(cfg.num_hidden_layers))
        for part in store.resident(layer, [int(e) for e in rng.choice(cfg.num_experts, k, replace=False)]):
            assert len(part) == k
    now, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert now - base < store.layout.file_size  # nothing accumulates per read
    assert store.stats.tier("disk")["served"] == 200 * k + k


def test_bad_requests(packed: Path) -> None:
    store = make_store(packed)
    with pytest.raises(FmoeError, match="expert 15 out of range"):
        fetch(store, 0, [15])
    with pytest.raises(FmoeError, match="layer 8 out of range"):
        fetch(store, 8, [0])
    assert sorted(fetch(store, 5, [9, 3, 9])) == [3, 9]  # duplicates read once
    assert store.stats.tier("disk")["served"] == 2


def test_missing_manifest_or_file(packed_copy: Path) -> None:
    with pytest.raises(FmoeError, match=r"experts-q2.*fmoe repack"):
        make_store(packed_copy, 2)
    (packed_copy / "experts-q4" / expert_relpath(0, 2)).unlink()
    store = make_store(packed_copy)
    with pytest.raises(FmoeError, match=r"expert_0002\.bin: missing \(an expert file; re-run `fmoe repack --bits 4`\)"):
        fetch(store, 0, [2])


def test_other_models_manifest_is_refused(packed_copy: Path) -> None:
    path = packed_copy / "experts-q4" / "manifest.json"
    doc = json.loads(path.read_text())
    doc["model_fingerprint"] = "0123456789abcdef"
    path.write_text(json.dumps(doc))
    with pytest.raises(FmoeError, match="another model"):
        make_store(packed_copy)


def test_incomplete_manifest_is_refused(packed_copy: Path) -> None:
    path = packed_copy / "experts-q4" / "manifest.json"
    doc = json.loads(path.read_text())
    del doc["files"][expert_relpath(7, 14)]
    path.write_text(json.dumps(doc))
    with pytest.raises(FmoeError, match=r"expected ones absent \(e\.g\. layer_007/expert_0014\.bin\)"):
        make_store(packed_copy)


# ---- dense weights ------------------------------------------------------------------------------
def test_dense_load_matches_file_and_keeps_the_embedding_as_stored(packed: Path) -> None:
    _, cfg = read_identity(packed)
    dense = read_dense_weights(packed, cfg, verify=True)
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
    part = manifest["tensors"]["embed_tokens.weight"]["parts"]["data"]
    raw = np.frombuffer(data[part["offset"] : part["offset"] + part["size"]], dtype=np.uint16)
    assert dense["embed_tokens.weight"].dtype == np.uint16  # bf16 bits: rows are widened when used
    np.testing.assert_array_equal(dense["embed_tokens.weight"].reshape(-1), raw)


def test_dense_load_holds_little_beyond_the_resident_weights(packed: Path) -> None:
    """Parts are read into their final arrays (bf16 widened chunk by chunk): the peak while loading
    is the resident weights plus small change, never the whole file on top of them."""
    _, cfg = read_identity(packed)
    file_size = (packed / "model_weights.bin").stat().st_size
    tracemalloc.start()
    dense = read_dense_weights(packed, cfg)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    held = sum(t.nbytes for t in dense.values())
    assert held > file_size  # bf16 matrices became float32
    assert peak - held < file_size / 4


def test_dense_quantised_tensors_stay_packed(tmp_path: Path, artifacts: tuple[Path, Path]) -> None:
    from fmoe.convert.extract import extract

    out = tmp_path / "q"
    extract(artifacts[0], out, dense_bits=4)
    _, cfg = read_identity(out)
    dense = read_dense_weights(out, cfg, verify=True)
    qt = dense["layers.0.mlp.shared_expert.up_proj.weight"]
    assert qt.bits == 4 and qt.shape == (cfg.shared_expert_intermediate_size, cfg.hidden_size)
    assert dense["embed_tokens.weight"].bits in (4, 8)


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
    read_dense_weights(packed_copy, cfg, verify=False)  # without verification the flip goes unnoticed
    with pytest.raises(CorruptionError, match=r"layers\.2\.linear_attn\.in_proj_z\.weight fails its xxh3_128"):
        read_dense_weights(packed_copy, cfg, verify=True)
    del manifest["tensors"]["layers.5.mlp.gate.weight"]
    path.write_text(json.dumps(manifest))
    with pytest.raises(FmoeError, match=r"model_weights\.json: xxh3_128 differs from the one fmoe\.json records"):
        read_dense_weights(packed_copy, cfg)  # an edited manifest: fmoe.json's record of it tells
    with pytest.raises(FmoeError, match=r"tensor layers\.5\.mlp\.gate\.weight is missing"):
        read_dense_weights(packed_copy, cfg, verify=False)


def test_dense_truncated_file(packed_copy: Path) -> None:
    _, cfg = read_identity(packed_copy)
    with open(packed_copy / "model_weights.bin", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(CorruptionError, match="truncated"):
        read_dense_weights(packed_copy, cfg)


# ---- io="mmap": the files mapped side by side, computed on in place ------------------------------------
def test_mmap_io_serves_the_files_in_place(packed_copy: Path, rng: np.random.Generator) -> None:
    _, cfg = read_identity(packed_copy)
    store = make_store(packed_copy, io="mmap", checks="off")
    for _ in range(20):
        layer = int(rng.integers(cfg.num_hidden_layers))
        experts = [int(e) for e in rng.choice(cfg.num_experts, int(rng.integers(1, 9)), replace=False)]
        (part,) = list(store.resident(layer, experts))  # one part: every expert is in its slot already
        np.testing.assert_array_equal(part.ids, experts)
        np.testing.assert_array_equal(part.slots, experts)  # slot = expert id in the layer's range
        assert part.table.slab is not None and not part.table.slab.flags.writeable
        for e, w in part.experts():
            _assert_same(_arrays(w), _direct(packed_copy, 4, layer, e))
    assert store.stats.tier("mapped")["served"] == int(store.stats.requested.sum())
    assert store.stats.tier("disk")["served"] == 0
    # in place, not copied: a byte written to the file shows in the slab
    path = packed_copy / "experts-q4" / expert_relpath(2, 3)
    (part,) = list(store.resident(2, [3]))
    before = int(part.table.slab[3, 0])
    with open(path, "r+b") as f:
        f.write(bytes([before ^ 0xFF]))
    assert int(part.table.slab[3, 0]) == before ^ 0xFF
    store.close()


def test_mmap_io_every_read_rechecks_the_mapping(packed_copy: Path) -> None:
    store = make_store(packed_copy, io="mmap", checks="every-read")
    fetch(store, 1, [4])
    _flip(packed_copy / "experts-q4" / expert_relpath(1, 4))
    with pytest.raises(CorruptionError, match=r"expert_0004\.bin: xxh3_128 mismatch"):
        fetch(store, 1, [4])


def test_mmap_io_checks_and_refuses_like_pread(packed_copy: Path) -> None:
    _flip(packed_copy / "experts-q4" / expert_relpath(3, 2))
    with pytest.raises(CorruptionError, match=r"expert_0002\.bin: xxh3_128 mismatch"):
        fetch(make_store(packed_copy, io="mmap"), 3, [1, 2])
    fetch(make_store(packed_copy, io="mmap", checks="off"), 3, [2])
    path = packed_copy / "experts-q4" / expert_relpath(5, 6)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 4096)
    with pytest.raises(CorruptionError, match=r"expert_0006\.bin: \d+ bytes, not the \d+ of its layout"):
        fetch(make_store(packed_copy, io="mmap", checks="off"), 5, [6])
    with pytest.raises(FmoeError, match="--io 'aio'"):
        make_store(packed_copy, io="aio")


# ---- replacement policies ---------------------------------------------------------------------------------
def _fill(index, keys):
    for layer, e in keys:
        if index.lookup(layer, e) is None:
            slot = index.claim(set())
            assert slot is not None
            index.insert(layer, e, slot)


@pytest.mark.parametrize("policy", ["lru", "slru"])
def test_a_popular_expert_survives_a_scan_only_under_slru(policy: str) -> None:
    from fmoe.runtime.experts.cache import SlotIndex

    index = SlotIndex(4, policy)
    _fill(index, [(0, 0), (0, 0)])  # expert 0 hit twice: popular
    _fill(index, [(0, e) for e in range(1, 8)])  # seven one-off experts stream through 4 slots
    assert (index.lookup(0, 0) is not None) == (policy == "slru")
    assert len(index) == 4


def test_slot_index_never_evicts_a_pinned_slot_and_refuses_unknown_policies() -> None:
    from fmoe.runtime.experts.cache import SlotIndex

    index = SlotIndex(3)
    _fill(index, [(1, 0), (1, 1), (1, 2)])
    pinned = {index.lookup(1, 0), index.lookup(1, 1)}
    slot = index.claim(pinned)
    assert slot is not None and slot not in pinned
    assert index.claim({0, 1, 2}) is None
    with pytest.raises(ValueError, match="cache policy 'fifo'"):
        SlotIndex(3, "fifo")
