"""`fmoe plan`: the byte counts against what extract and repack write, and the placement, traffic and
ceiling of the 397B and the 2.4T against figures computed by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support import assert_cli_error
from typer.testing import CliRunner

from fmoe.cli import app
from fmoe.config import TextConfig
from fmoe.convert.extract import extract
from fmoe.convert.repack import repack
from fmoe.convert.synth import synthesize
from fmoe.errors import FmoeError
from fmoe.plan import dense_bytes, plan, render
from fmoe.presets import load_preset

Q397 = "qwen3.5-397b-a17b"
Q24T = "qwen3.8-2.4t-a95b"


def cfg_of(preset: str) -> TextConfig:
    return TextConfig.from_dict(load_preset(preset)["text_config"])


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """tiny packed at each dense width (experts at 4 bits in the 4-bit one)."""
    root = tmp_path_factory.mktemp("plan")
    synthesize(root / "src", preset="tiny", layers=4, experts=6)
    out = {}
    for bits in (16, 8, 4):
        out[bits] = root / f"p{bits}"
        extract(root / "src", out[bits], dense_bits=bits)
    repack(root / "src", out[4], bits=4)
    return out


# ---- bytes ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [16, 8, 4])
def test_dense_bytes_are_what_extract_writes(packed: dict[int, Path], bits: int) -> None:
    folder = packed[bits]
    cfg = TextConfig.from_file(folder.parent / "src" / "config.json")
    manifest = json.loads((folder / "model_weights.json").read_text())
    d = dense_bytes(cfg, bits)
    assert d["total"] == (folder / "model_weights.bin").stat().st_size == manifest["file_size"]
    parts = manifest["tensors"]["embed_tokens.weight"]["parts"].values()
    assert d["embedding"] == max(p["offset"] + p["size"] for p in parts) - min(p["offset"] for p in parts)


def test_397b_bytes_by_hand() -> None:
    c = cfg_of(Q397)
    # 4-bit dense, group 64: a [out, in] matrix is out*in/2 B of codes + 2 x out*in/64 x 2 B of scales/biases.
    # embed = lm_head = [248320, 4096]: 508,559,360 + 2 x 31,784,960 = 572,129,280; final norm 16,384.
    # every layer: 2 norms 32,768 + router [512, 4096] at 8 bits 2,228,224 + shared gate/up 2 x 2,359,296
    #   + shared down 2,359,296 + shared_expert_gate [1, 4096] at 8 bits 4,096 + 128 + 128 = 9,343,232
    # 45 DeltaNet: qkv [12288, 4096] 28,311,552 + z [8192, 4096] 18,874,368 + b, a [64, 4096] 2 x 147,456
    #   + conv [12288, 4] f32 196,608 + A_log, dt_bias 2 x 256 + norm [128] 512 + out [4096, 8192] 18,874,368
    #   = 66,552,832
    # 15 full: q [16384, 4096] 37,748,736 + k, v [512, 4096] 2 x 1,179,648 + o [4096, 8192] 18,874,368
    #   + q_norm, k_norm 2 x 1,024 = 58,984,448
    total = 2 * 572_129_280 + 16_384 + 60 * 9_343_232 + 45 * 66_552_832 + 15 * 58_984_448
    assert total == 5_584_513_024
    d = dense_bytes(c, 4)
    assert d == {"total": total, "embedding": 572_129_280, "per_token": total - 572_129_280 + 2_304}  # a row: 2,304 B


def test_24t_bytes_by_hand() -> None:
    c = cfg_of(Q24T)
    # embed = lm_head = [248320, 8192]: 1,017,118,720 + 2 x 63,569,920 = 1,144,258,560; final norm 32,768.
    # every layer: norms 65,536 + router [512, 8192] 8-bit 4,456,448 + shared gate/up [2048, 8192] 2 x 9,437,184
    #   + shared down [8192, 2048] 9,437,184 + shared_expert_gate [1, 8192] 8-bit 8,192 + 256 + 256 = 32,842,240
    # 69 DeltaNet: qkv [20480, 8192] 94,371,840 + z [16384, 8192] 75,497,472 + b, a [128, 8192] 2 x 589,824
    #   + conv [20480, 4] f32 327,680 + A_log, dt_bias, norm 3 x 512 + out [8192, 16384] 75,497,472 = 246,875,648
    # 23 full: q [32768, 8192] 150,994,944 + k, v [1024, 8192] 2 x 4,718,592 + o [8192, 16384] 75,497,472
    #   + q_norm, k_norm 2,048 = 235,931,648
    total = 2 * 1_144_258_560 + 32_768 + 92 * 32_842_240 + 69 * 246_875_648 + 23 * 235_931_648
    assert total == 27_770_883_584
    assert dense_bytes(c, 4)["total"] == total


# ---- placement, traffic, ceiling ---------------------------------------------------------------------------
def test_397b_on_a_64gb_machine_without_gpu() -> None:
    r = plan(Q397, gpu_mem=0, ram=64, context=4096, disk_bw=5.0, hit_rate=0.5)
    b = r["bytes"]
    assert b["expert_file"] == 7_077_888 and b["experts"] == 60 * 512 * 7_077_888 == 217_432_719_360
    # KV: 15 full layers x 2 x 2 heads x 256 x 4 B = 61,440 B per token; DeltaNet: 45 x (64 x 128 x 128 x 4
    # + 3 x 12,288 x 4) = 45 x 4,341,760
    assert (b["kv_per_token"], b["kv"], b["deltanet"]) == (61_440, 61_440 * 4096, 195_379_200)
    p = r["placement"]
    assert p["compute"] == "cpu" and p["fits"]
    # host: 64e9 - 5,584,513,024 - (251,658,240 + 195,379,200) = 57,968,449,536 -> 8,190 whole files of 7,077,888
    assert p["host_free_for_experts"] == 57_968_449_536
    assert p["experts"] == {"gpu": 0, "pinned": 0, "page_cache": 8_190, "disk": 30_720 - 8_190}
    u = r["per_token"]["uniform"]
    # each resident file serves K / E x file = 10 / 512 x 7,077,888 = 138,240 B per token
    assert u["experts_total"] == 10 * 60 * 7_077_888 == 4_246_732_800
    assert u["experts"] == {"gpu": 0, "pinned": 0, "page_cache": 8_190 * 138_240, "disk": 22_530 * 138_240}
    assert u["dense"] == 5_584_513_024 - 572_129_280 + 2_304
    c = r["ceiling"]["uniform"]
    assert c["limited_by"] == "disk" and c["unknown"] == ["ram"]
    assert c["tokens_per_second"] == pytest.approx(5e9 / 3_114_547_200, rel=1e-12)  # 1.6054 tok/s
    h = r["per_token"]["hit_rate"]
    assert h["experts"]["disk"] == pytest.approx(0.5 * 4_246_732_800) and h["experts"]["page_cache"] == pytest.approx(
        0.5 * 4_246_732_800
    )
    assert r["ceiling"]["hit_rate"]["tokens_per_second"] == pytest.approx(5e9 / 2_123_366_400, rel=1e-12)  # 2.3548


def test_24t_on_one_h200_with_512gb() -> None:
    r = plan(Q24T, gpu_mem=140, ram=512, context=32768, disk_bw=14, link_bw=50)
    b, p = r["bytes"], r["placement"]
    # KV: 23 x 2 x 4 x 256 x 4 = 188,416 B per token x 32,768; DeltaNet: 69 x (128 x 128 x 128 x 4 + 3 x 20,480 x 4)
    assert (b["kv_per_token"], b["deltanet"]) == (188_416, 69 * 8_634_368)
    assert b["state"] == 188_416 * 32_768 + 595_771_392 == 6_769_786_880
    assert p["compute"] == "gpu" and p["dense"] == "gpu"
    # GPU: 140e9 - 27,770,883,584 - 6,769,786,880 = 105,459,329,536 -> 3,724 files of 28,311,552;
    # pinned (all host memory): 512e9 / 28,311,552 -> 18,084 files; disk: 47,104 - 3,724 - 18,084 = 25,296
    assert p["gpu_free_for_experts"] == 105_459_329_536
    assert p["experts"] == {"gpu": 3_724, "pinned": 18_084, "page_cache": 0, "disk": 25_296}
    u = r["per_token"]["uniform"]
    # a resident file serves 10 / 512 x 28,311,552 = 552,960 B per token
    assert u["experts"] == {
        "gpu": 3_724 * 552_960,
        "pinned": 18_084 * 552_960,
        "page_cache": 0,
        "disk": 25_296 * 552_960,
    }
    c = r["ceiling"]["uniform"]
    assert c["paths"]["disk"]["bytes_per_token"] == 13_987_676_160
    assert c["paths"]["link"]["bytes_per_token"] == (18_084 + 25_296) * 552_960 == 23_987_404_800
    assert c["paths"]["link"]["tokens_per_second"] == pytest.approx(50e9 / 23_987_404_800)  # 2.084
    assert c["limited_by"] == "disk" and c["tokens_per_second"] == pytest.approx(14e9 / 13_987_676_160)  # 1.0009
    assert sorted(c["unknown"]) == ["gpu", "ram"]


def test_24t_at_full_context_and_2_bits() -> None:
    """The default context is the model's maximum; 2-bit experts are 15,728,640 B."""
    r = plan(Q24T, bits=2, gpu_mem=0, ram=2000, disk_bw=10)
    assert r["context"] == 262_144 and r["bytes"]["kv"] == 188_416 * 262_144 == 49_392_123_904
    assert r["bytes"]["expert_file"] == 15_728_640
    # host: 2000e9 - 27,770,883,584 - 49,392,123,904 - 595,771,392 = 1,922,241,221,120 of page cache,
    # over the 47,104 x 15,728,640 = 740,881,858,560 B of experts: all resident, nothing from disk
    assert r["placement"]["experts"]["disk"] == 0
    c = r["ceiling"]["uniform"]
    assert "disk" not in c["paths"] and c["tokens_per_second"] is None and c["unknown"] == ["ram"]


def test_what_does_not_fit() -> None:
    r = plan(Q24T, gpu_mem=24, ram=16, context=4096, disk_bw=7)
    p = r["placement"]
    assert p["compute"] == "cpu" and not p["fits"] and len(p["notes"]) == 2
    assert "do not fit the GPU" in p["notes"][0] and "do not fit host memory" in p["notes"][1]
    assert p["experts"]["disk"] == 47_104 and r["ceiling"]["uniform"]["tokens_per_second"] is None


def test_pinned_option_and_k() -> None:
    # pinned 0.71 GB: 100 files of 7,077,888 B; the page cache the rest of the 57,968,449,536 B left:
    # 57,258,449,536 // 7,077,888 = 8,089
    r = plan(Q397, gpu_mem=0, ram=64, context=4096, pinned=0.71, k=4, disk_bw=5)
    assert r["placement"]["experts"]["pinned"] == 100 and r["placement"]["experts"]["page_cache"] == 8_089
    assert r["k"] == 4 and r["per_token"]["uniform"]["experts_total"] == 4 * 60 * 7_077_888


def test_397b_on_one_h200_with_host_experts_at_2_bits() -> None:
    """`--host-bits 2`: the files off the GPU are the 2-bit ones (3 projections of 1024 x 4096: 1,048,576 B
    of codes + 131,072 B of scales and biases each = 3,932,160 B), the link carries those."""
    base = plan(Q397, gpu_mem=140, ram=128, context=4096, link_bw=55)
    r = plan(Q397, gpu_mem=140, ram=128, context=4096, link_bw=55, host_bits=2)
    assert base["host_bits"] is None and r["host_bits"] == 2
    assert r["bytes"]["expert_file"] == 7_077_888 and r["bytes"]["host_expert_file"] == 3_932_160
    # GPU: 140e9 - 5,584,513,024 - 447,037,440 = 133,968,449,536 -> 18,927 files of 7,077,888; the other
    # 11,793 pinned (128e9 holds 32,552 of 3,932,160)
    for report in (base, r):
        assert report["placement"]["experts"] == {"gpu": 18_927, "pinned": 11_793, "page_cache": 0, "disk": 0}
    assert r["placement"]["expert_bytes"]["pinned"] == 11_793 * 3_932_160 and not r["placement"]["notes"]
    u = r["per_token"]["uniform"]
    # a pinned file serves 10 / 512 x 3,932,160 = 76,800 B a token (a GPU one 138,240)
    assert u["experts"] == {"gpu": 18_927 * 138_240, "pinned": 11_793 * 76_800, "page_cache": 0, "disk": 0}
    assert u["experts_total"] == 18_927 * 138_240 + 11_793 * 76_800
    link = r["ceiling"]["uniform"]["paths"]["link"]
    assert link["bytes_per_token"] == 905_702_400 and link["tokens_per_second"] == pytest.approx(55e9 / 905_702_400)
    assert base["ceiling"]["uniform"]["paths"]["link"]["bytes_per_token"] == 11_793 * 138_240 == 1_630_264_320
    # 2-bit files that do not all fit page-locked memory: said; and a CPU that computes refuses it
    tight = plan(Q397, gpu_mem=140, ram=20, pinned=10, context=4096, host_bits=2)
    assert tight["placement"]["experts"]["page_cache"] > 0 and "--host-reads direct" in tight["placement"]["notes"][-1]
    with pytest.raises(FmoeError, match="--host-bits"):
        plan(Q397, gpu_mem=0, ram=512, context=4096, host_bits=2)
    with pytest.raises(FmoeError, match="--host-bits: 3"):
        plan(Q397, gpu_mem=140, ram=128, host_bits=3)


def test_397b_on_one_h200_with_the_host_computing_part() -> None:
    """`--host-compute-bw`: the host's cores and the link share the page-locked experts' bytes, so
    together they move them at the sum of their rates (the cores taking the share that balances
    them); host memory serves both; whatever is not page-locked still crosses the link alone."""
    base = plan(Q397, gpu_mem=140, ram=128, context=4096, link_bw=55, ram_bw=110)
    r = plan(Q397, gpu_mem=140, ram=128, context=4096, link_bw=55, ram_bw=110, host_compute_bw=65)
    off_gpu = 11_793 * 138_240  # (every file off the GPU is page-locked here)
    paths = r["ceiling"]["uniform"]["paths"]
    assert "link+host" not in base["ceiling"]["uniform"]["paths"] and "link" not in paths  # (none left to it alone)
    assert paths["link+host"]["bytes_per_token"] == off_gpu
    assert paths["link+host"]["tokens_per_second"] == pytest.approx(120e9 / off_gpu)  # 73.6: above the link's 33.7
    assert paths["ram"]["tokens_per_second"] == pytest.approx(110e9 / off_gpu)
    c = r["ceiling"]["uniform"]
    assert c["limited_by"] == "ram" and c["tokens_per_second"] == pytest.approx(110e9 / off_gpu)
    assert c["host_share"] == pytest.approx(65 / 120)
    assert base["ceiling"]["uniform"]["limited_by"] == "link" and base["ceiling"]["uniform"]["host_share"] is None
    # experts beyond page-locked memory: the link alone carries those, the cores none of them
    tight = plan(Q397, gpu_mem=140, ram=60, pinned=40, context=4096, link_bw=55, host_compute_bw=200)
    t = tight["per_token"]["uniform"]["experts"]
    assert t["page_cache"] + t["disk"] > 0
    tp = tight["ceiling"]["uniform"]["paths"]
    assert tp["link"]["bytes_per_token"] == t["page_cache"] + t["disk"]
    both = t["pinned"] + t["page_cache"] + t["disk"]
    assert tp["link+host"]["tokens_per_second"] == pytest.approx(255e9 / both)
    assert tight["ceiling"]["uniform"]["host_share"] == pytest.approx(min(1.0, both * 200 / 255 / t["pinned"]))
    with pytest.raises(FmoeError, match="--host-compute-bw: the host computes part of a GPU's"):
        plan(Q397, gpu_mem=0, ram=512, context=4096, host_compute_bw=65)
    with pytest.raises(FmoeError, match="--host-compute-bw: 0"):
        plan(Q397, gpu_mem=140, ram=128, host_compute_bw=0)


# ---- inputs and the CLI ---------------------------------------------------------------------------------
def test_packed_directory_uses_its_files_and_measures_the_disk(packed: dict[int, Path]) -> None:
    r = plan(str(packed[4]), gpu_mem=0, ram=1)
    assert r["model"]["kind"] == "packed" and r["bits"] == 4 and r["dense_bits"] == 4
    assert r["bytes"]["dense"] == (packed[4] / "model_weights.bin").stat().st_size
    manifest = json.loads((packed[4] / "experts-q4" / "manifest.json").read_text())
    assert r["bytes"]["expert_file"] == manifest["file_size"]
    assert r["capacities"]["disk_bw"] > 0 and r["capacities"]["origin"]["disk_bw"].startswith("measured")
    assert r["ceiling"]["uniform"]["tokens_per_second"] is None or r["placement"]["experts"]["disk"] == 0


def test_source_directory_and_alias(packed: dict[int, Path]) -> None:
    r = plan(str(packed[4].parent / "src"), gpu_mem=0, ram=1, disk_bw=1)
    assert r["model"]["kind"] == "source" and r["model"]["layers"] == 4
    assert plan("qwen3.8-2.4t-fp8", gpu_mem=0, ram=1, disk_bw=1)["model"]["name"] == Q24T


@pytest.mark.parametrize(
    "kwargs,words",
    [
        ({"bits": 3}, ("--bits",)),
        ({"k": 0}, ("--k", "512")),
        ({"context": 0}, ("--context",)),
        ({"hit_rate": 1.5}, ("--hit-rate",)),
        ({"ram": -1}, ("--ram",)),
        ({"disk_bw": 0}, ("--disk-bw", "positive")),
        ({"dense_bits": 2}, ("--dense-bits",)),
    ],
)
def test_refusals(kwargs: dict[str, Any], words: tuple[str, ...]) -> None:
    options: dict[str, Any] = {"gpu_mem": 0, "ram": 64} | kwargs
    with pytest.raises(FmoeError) as err:
        plan(Q397, **options)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_hit_rate_needs_memory() -> None:
    with pytest.raises(FmoeError, match="no expert file fits in memory"):
        plan(Q24T, gpu_mem=0, ram=20, context=1024, disk_bw=5, hit_rate=0.3)


def test_cli_shows_the_arithmetic() -> None:
    args = ["plan", "qwen3.8-2.4t", "--gpu-mem", "140", "--ram", "512", "--context", "32768"]
    result = CliRunner().invoke(app, [*args, "--disk-bw", "14", "--link-bw", "50", "--hit-rate", "0.6"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "28,311,552 B per file" in out and "47,104 files = 1,333,587,345,408 B" in out
    assert "10 x 3,724 / 512 x 28,311,552 B" in out and "ceiling 1.001 tok/s, limited by disk" in out
    assert "hit rate 0.6" in out and "(1 - 0.6) x 26.05 GB = 10.42 GB" in out
    two = CliRunner().invoke(
        app, ["plan", Q397, "--gpu-mem", "140", "--ram", "128", "--context", "4096", "--host-bits", "2"]
    )
    assert two.exit_code == 0 and "--host-bits 2: 3,932,160 B per file off the GPU" in two.output
    assert "10 x 11,793 / 512 x 3,932,160 B" in " ".join(two.output.split())
    shared = ["plan", Q397, "--gpu-mem", "140", "--ram", "128", "--context", "4096", "--link-bw", "55"]
    host = CliRunner().invoke(app, [*shared, "--ram-bw", "110", "--host-compute-bw", "65"])
    assert host.exit_code == 0, host.output
    assert "host cores      65.00 GB/s  (given)" in host.output and "link+host 1.63 GB / 120.00 GB/s" in host.output
    assert "the host's cores take 0.54 of the page-locked experts' bytes" in host.output
    assert "host cores" not in CliRunner().invoke(app, shared).output
    report = json.loads(CliRunner().invoke(app, [*args, "--disk-bw", "14", "--json"]).output)
    assert report["placement"]["experts"]["gpu"] == 3_724
    assert render(report)[0].startswith(Q24T)


def test_cli_errors_are_one_line() -> None:
    assert_cli_error(CliRunner().invoke(app, ["plan", "no-such-model"]), "no-such-model", "preset")
    assert_cli_error(CliRunner().invoke(app, ["plan", Q397, "--gpu-mem", "0", "--ram", "8", "--bits", "8"]), "--bits")
    usage = subprocess.run(  # a usage mistake, through the entry point (fmoe.cli.main)
        [sys.executable, "-m", "fmoe", "plan", Q397, "--k", "11x"], capture_output=True, text=True, timeout=120
    )
    lines = usage.stderr.strip().splitlines()
    assert usage.returncode == 2 and len(lines) == 1, usage.stderr
    assert lines[0].startswith("error: ") and "fmoe plan: Invalid value for '--k'" in lines[0]
