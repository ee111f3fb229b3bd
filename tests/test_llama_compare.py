"""scripts/llama_compare.py without llama.cpp: its command lines for the CPU and the GPU comparisons,
the build step, and reading llama-bench's JSON, with fake executables standing in for llama.cpp's."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import stat
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lc() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fmoe_llama_compare", ROOT / "scripts" / "llama_compare.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake(path: Path, body: str) -> Path:
    """An executable shell script at ``path`` (parents made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_llama_bench_command_lines(lc: ModuleType, tmp_path: Path) -> None:
    cpu = lc.llama_bench_command(tmp_path, tmp_path / "m.gguf", 2, 128, 32)
    assert cpu[0] == str(tmp_path / "bin" / "llama-bench")
    assert cpu[cpu.index("-t") + 1] == "2" and cpu[cpu.index("-p") + 1] == "128" and cpu[cpu.index("-n") + 1] == "32"
    assert cpu[cpu.index("-ngl") + 1] == "0" and "-ot" not in cpu
    gpu = lc.llama_bench_command(tmp_path, tmp_path / "m.gguf", 16, 512, 64, gpu=True)
    assert gpu[gpu.index("-ngl") + 1] == "99" and "-ot" not in gpu
    split = lc.llama_bench_command(tmp_path, tmp_path / "m.gguf", 16, 512, 64, gpu=True, experts_on_cpu=True)
    assert split[split.index("-ot") + 1] == "exps=CPU"


def test_fmoe_options_follow_the_device(lc: ModuleType) -> None:
    cpu = argparse.Namespace(gpu=False, io="mmap", int8_dot=True)
    assert lc._fmoe_options(cpu) == ["--io", "mmap", "--int8-dot"]
    gpu = argparse.Namespace(gpu=True, io="mmap", int8_dot=True)  # --io is the CPU backend's only
    assert lc._fmoe_options(gpu) == ["--backend", "torch", "--device", "cuda", "--cuda-graph", "--int8-dot"]
    assert lc._fmoe_options(argparse.Namespace(gpu=True, io="mmap", int8_dot=False))[-1] == "--cuda-graph"


def test_experts_on_cpu_needs_gpu(lc: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        lc.main([str(tmp_path), str(tmp_path), "--llama-build", str(tmp_path), "--llama-src", str(tmp_path),
                 "--experts-on-cpu"])  # fmt: skip
    assert exc.value.code == 2
    assert "--experts-on-cpu needs --gpu" in capsys.readouterr().err


def test_llama_bench_reads_prefill_and_decode(lc: ModuleType, tmp_path: Path) -> None:
    rows = [{"n_prompt": 128, "n_gen": 0, "avg_ts": 500.5}, {"n_prompt": 0, "n_gen": 32, "avg_ts": 61.25}]
    _fake(tmp_path / "bin" / "llama-bench", f"echo '{json.dumps(rows)}'\n")
    got = lc.llama_bench(tmp_path, tmp_path / "m.gguf", 2, 128, 32, gpu=True)
    assert got == {"prefill_tok_s": 500.5, "decode_tok_s": 61.25}
    _fake(tmp_path / "bin" / "llama-bench", "echo 'no such model' >&2; exit 3\n")
    with pytest.raises(SystemExit, match=r"llama-bench failed \(3\): no such model"):
        lc.llama_bench(tmp_path, tmp_path / "m.gguf", 2, 128, 32)


def test_build_runs_cmake_only_when_the_tools_are_missing(
    lc: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "cmake.log"
    _fake(tmp_path / "tools" / "cmake", f'echo "$@" >> {log}\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'tools'}{os.pathsep}{os.environ['PATH']}")
    build = tmp_path / "build"
    lc.build_llama(tmp_path / "src", build, gpu=True, jobs=4, extra=("-DGGML_CUDA_FA=OFF",))
    configure, compile_ = log.read_text().splitlines()
    assert f"-B {build}" in configure
    for arg in ("-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=native", "-DLLAMA_BUILD_TESTS=OFF", "-DGGML_CUDA_FA=OFF"):
        assert arg in configure.split()
    assert compile_.split()[-5:] == ["--target", "llama-bench", "llama-quantize", "-j", "4"]
    for tool in ("llama-bench", "llama-quantize"):
        _fake(build / "bin" / tool, "exit 0\n")
    log.unlink()
    lc.build_llama(tmp_path / "src", build, gpu=False, jobs=4)
    assert not log.exists()  # already built: no cmake


def test_paired_ratios_are_the_median_of_each_rounds_ratio(lc: ModuleType) -> None:
    llama = [{"prefill_tok_s": 100.0, "decode_tok_s": 20.0}, {"prefill_tok_s": 200.0, "decode_tok_s": 40.0},
             {"prefill_tok_s": 50.0, "decode_tok_s": 10.0}]  # fmt: skip
    fmoe = [{"prefill_tok_s": 90.0, "decode_tok_s": 25.0}, {"prefill_tok_s": 220.0, "decode_tok_s": 40.0},
            {"prefill_tok_s": 40.0, "decode_tok_s": 8.0}]  # fmt: skip
    got = lc.paired_ratios(llama, fmoe)
    assert got["prefill_tok_s"] == pytest.approx(0.9)  # rounds: 0.9, 1.1, 0.8
    assert got["decode_ms_per_token"] == pytest.approx(1.0)  # rounds: 0.8, 1.0, 1.25


def test_several_thread_counts_alternate_and_give_each_engines_speedup(
    lc: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--threads 2 16``: every round runs both engines at each count (in that order), and each
    engine's speed-up over the first count is the median of the rounds' own ratios."""
    order: list[tuple[str, int]] = []
    speed = {("llama", 2): [10.0, 12.0, 11.0], ("llama", 16): [40.0, 36.0, 55.0],
             ("fmoe", 2): [15.0, 15.0, 14.0], ("fmoe", 16): [60.0, 45.0, 70.0]}  # fmt: skip

    def run(engine: str, threads: int) -> dict[str, float]:
        order.append((engine, threads))
        tok_s = speed[(engine, threads)][order.count((engine, threads)) - 1]
        return {"prefill_tok_s": 10 * tok_s, "decode_tok_s": tok_s}

    monkeypatch.setattr(lc, "make_gguf", lambda src, *_: tmp_path / "m.gguf")
    monkeypatch.setattr(lc, "llama_bench", lambda _build, _gguf, threads, *_, **__: run("llama", threads))
    monkeypatch.setattr(lc, "fmoe_bench", lambda _packed, threads, *_: run("fmoe", threads))
    args = argparse.Namespace(
        build=False, llama_src=tmp_path, llama_build=tmp_path, quant="Q4_0", workdir=tmp_path, gpu=False,
        experts_on_cpu=False, threads=[2, 16], rounds=3, prompt_tokens=8, tokens=4, fmoe_path="installed",
        io="mmap", int8_dot=True,
    )  # fmt: skip
    doc = lc.measure([(tmp_path / "s", tmp_path / "p")], args)
    assert order == [("llama", 2), ("fmoe", 2), ("llama", 16), ("fmoe", 16)] * 3
    up = doc["speedup_over_first_threads"]
    assert up["llama"]["16"]["decode_tok_s"] == pytest.approx(4.0)  # rounds: 4.0, 3.0, 5.0
    assert up["fmoe"]["16"]["decode_tok_s"] == pytest.approx(4.0)  # rounds: 4.0, 3.0, 5.0
    assert up["fmoe"]["16"]["prefill_tok_s"] == pytest.approx(4.0)
    assert doc["ratio_fmoe_over_llama"]["2"]["decode_ms_per_token"] == pytest.approx(11.0 / 15.0)
    assert doc["ratio_fmoe_over_llama"]["16"]["decode_ms_per_token"] == pytest.approx(40.0 / 60.0)
    assert set(doc["ratio_per_round_median"]) == {"2", "16"}
