"""`fmoe run`, `fmoe bench model` and `fmoe demo` through the CLI, and their one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jinja2
import pytest
from support import assert_cli_error, torch_devices
from tokenizers import Tokenizer
from typer.testing import CliRunner

from fmoe.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from fmoe.convert.extract import extract
    from fmoe.convert.repack import repack
    from fmoe.convert.synth import synthesize

    root = tmp_path_factory.mktemp("runcli")
    synthesize(root / "src", preset="tiny", seed=2)
    extract(root / "src", root / "packed")
    repack(root / "src", root / "packed", bits=4)
    # another model (fewer layers): its artifacts must never mix with the first one's
    synthesize(root / "other-src", preset="tiny", layers=4, seed=2)
    extract(root / "other-src", root / "other")
    repack(root / "other-src", root / "other", bits=4)
    return {"root": root, "packed": root / "packed", "other": root / "other"}


def test_run_json_prints_one_object(dirs: dict[str, Path]) -> None:
    r = runner.invoke(app, ["run", str(dirs["packed"]), "--prompt", "Hi there", "--tokens", "5", "--json", "--timing"])
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)  # the whole of stdout is one JSON object
    assert {"prompt_tokens", "tokens", "text", "timing"} <= set(doc)
    assert doc["prompt_tokens"] > 2 and 0 <= doc["tokens"] <= 5
    assert doc["tokens"] == len(doc["token_ids"])
    t = doc["timing"]
    assert t["prefill"]["tokens"] == doc["prompt_tokens"] and t["k"] == 3 and t["bits"] == 4
    assert len(t["prefill"]["profile"]["layers"]) == 8
    assert "Throughput" in r.stderr  # --timing tables still come, on stderr


@pytest.mark.skipif(not torch_devices(), reason="torch is not installed")
def test_run_on_the_torch_backend_equals_cpu(dirs: dict[str, Path]) -> None:
    args = ["run", str(dirs["packed"]), "-p", "Hi", "--tokens", "6", "--json", "--raw"]
    cpu = runner.invoke(app, args)
    torch_cpu = runner.invoke(app, [*args, "--backend", "torch", "--device", "cpu"])
    assert cpu.exit_code == torch_cpu.exit_code == 0, torch_cpu.stderr
    a, b = json.loads(cpu.stdout), json.loads(torch_cpu.stdout)
    assert a["token_ids"] == b["token_ids"] and b["timing"]["backend"] == "torch" and b["timing"]["device"] == "cpu"


def test_bad_backend_or_device(dirs: dict[str, Path]) -> None:
    assert_cli_error(runner.invoke(app, ["run", str(dirs["packed"]), "-p", "x", "--backend", "tpu"]), "unknown backend")
    assert_cli_error(
        runner.invoke(app, ["run", str(dirs["packed"]), "-p", "x", "--device", "cuda"]), "--device cuda", "cpu only"
    )
    if torch_devices():
        assert_cli_error(
            runner.invoke(app, ["run", str(dirs["packed"]), "-p", "x", "--backend", "torch", "--device", "tpu:7"]),
            "--device",
        )


def test_run_streams_text_and_timing_tables(dirs: dict[str, Path]) -> None:
    args = [
        "run",
        str(dirs["packed"]),
        "-p",
        "Hello",
        "--tokens",
        "6",
        "--raw",
        "--timing",
        "--seed",
        "1",
        "--temperature",
        "0.8",
        "--top-k",
        "20",
        "--top-p",
        "0.9",
        "--cache-gb",
        "0.001",
        "--checks",
        "every-read",
    ]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.stderr
    assert r.stdout.endswith("\n")
    for title in ("Decode: ms per token", "Prefill", "Throughput", "Expert store", "exp I/O", "mixer", "memory"):
        assert title in r.stderr, title
    again = runner.invoke(app, args)
    assert again.stdout == r.stdout  # seeded


def test_run_with_verify_and_no_think(dirs: dict[str, Path]) -> None:
    r = runner.invoke(
        app,
        [
            "run",
            str(dirs["packed"]),
            "-p",
            "Hi",
            "--tokens",
            "2",
            "--verify",
            "--no-think",
            "--system",
            "You are terse.",
            "--stop",
            "zz",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["tokens"] <= 2
    # --system and --no-think reach the prompt: its length is that of the chat template rendered
    # independently (plain jinja2 + the tokenizers library) with both
    doc = json.loads(r.stdout)
    template = jinja2.Environment().from_string((dirs["packed"] / "chat_template.jinja").read_text())
    tok = Tokenizer.from_file(str(dirs["packed"] / "tokenizer.json"))
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}]
    want = template.render(messages=msgs, add_generation_prompt=True, enable_thinking=False)
    assert doc["prompt_tokens"] == len(tok.encode(want).ids)
    assert want.endswith("<think>\n\n</think>\n\n") and "You are terse." in want
    assert "zz" not in doc["text"] and doc["tokens"] == len(doc["token_ids"])


def test_bench_model_json_and_table(dirs: dict[str, Path]) -> None:
    r = runner.invoke(app, ["bench", "model", str(dirs["packed"]), "--tokens", "4", "--prompt-tokens", "8", "--json"])
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["prefill"]["tokens"] == 8 and doc["decode"]["tokens"] == 4
    assert doc["prefill"]["tokens_per_second"] > 0 and doc["decode"]["tokens_per_second"] > 0
    r = runner.invoke(app, ["bench", "model", str(dirs["packed"]), "--tokens", "2", "--prompt-tokens", "4"])
    assert r.exit_code == 0 and "prefill" in r.stdout and "decode" in r.stdout


# ---- bad input: one red line, non-zero exit -----------------------------------------------------
def test_not_a_packed_dir_and_incomplete(dirs: dict[str, Path], tmp_path: Path) -> None:
    assert_cli_error(
        runner.invoke(app, ["run", str(tmp_path), "-p", "x"]), "not a packed fmoe directory", "fmoe extract"
    )
    broken = Path(shutil.copytree(dirs["packed"], tmp_path / "broken"))
    (broken / "model_weights.json").unlink()
    assert_cli_error(runner.invoke(app, ["run", str(broken), "-p", "x"]), "no model_weights.json", "fmoe extract")
    assert_cli_error(
        runner.invoke(app, ["run", str(dirs["packed"]), "-p", "x", "--bits", "2"]), "no 2-bit experts", "fmoe repack"
    )
    shutil.rmtree(broken / "experts-q4")
    (broken / "model_weights.json").write_text((dirs["packed"] / "model_weights.json").read_text())
    assert_cli_error(runner.invoke(app, ["run", str(broken), "-p", "x"]), "no 4-bit experts", "fmoe repack")


def test_other_models_artifacts(dirs: dict[str, Path], tmp_path: Path) -> None:
    mixed = Path(shutil.copytree(dirs["packed"], tmp_path / "mixed"))
    shutil.copy(dirs["other"] / "experts-q4" / "manifest.json", mixed / "experts-q4" / "manifest.json")
    assert_cli_error(
        runner.invoke(app, ["run", str(mixed), "-p", "x"]), "experts-q4/manifest.json", "(manifest of another model)"
    )
    mixed2 = Path(shutil.copytree(dirs["packed"], tmp_path / "mixed2"))
    for name in ("model_weights.json", "model_weights.bin"):
        shutil.copy(dirs["other"] / name, mixed2 / name)
    assert_cli_error(
        runner.invoke(app, ["run", str(mixed2), "-p", "x"]), "model_weights.json", "(manifest of another model)"
    )


def test_k_out_of_range(dirs: dict[str, Path]) -> None:
    for k in ("0", "16"):
        assert_cli_error(
            runner.invoke(app, ["run", str(dirs["packed"]), "-p", "x", "--k", k]), f"--k {k}", "between 1 and 15"
        )


def test_prompt_too_long(dirs: dict[str, Path]) -> None:
    r = runner.invoke(app, ["run", str(dirs["packed"]), "-p", "a long prompt " * 5, "--raw", "--max-context", "8"])
    assert_cli_error(r, "exceed the context limit of 8")
    r = runner.invoke(app, ["run", str(dirs["packed"]), "-p", "word " * 4200, "--raw"])  # > max_position_embeddings
    assert_cli_error(r, "exceed the context limit of 4096")


def test_prefill_chunk(dirs: dict[str, Path]) -> None:
    """--prefill-chunk reaches the runner (the cpu backend's prompt in chunks of 3 tokens: the same
    greedy text and the whole prompt counted), and a chunk of no tokens is a one-line error."""
    args = ["run", str(dirs["packed"]), "--prompt", "Hi there, a prompt of some tokens", "--tokens", "4", "--json"]
    whole, chunked = runner.invoke(app, args), runner.invoke(app, [*args, "--prefill-chunk", "3"])
    assert whole.exit_code == 0 and chunked.exit_code == 0, chunked.stderr
    a, b = json.loads(whole.stdout), json.loads(chunked.stdout)
    assert a["prompt_tokens"] > 3 and b["prompt_tokens"] == a["prompt_tokens"]
    assert b["token_ids"] == a["token_ids"]
    assert_cli_error(runner.invoke(app, [*args, "--prefill-chunk", "0"]), "--prefill-chunk 0", "between 1 and")


def test_bad_sampling_options(dirs: dict[str, Path]) -> None:
    assert_cli_error(runner.invoke(app, ["run", str(dirs["packed"]), "-p", "x", "--top-p", "0"]), "--top-p")
    assert_cli_error(
        runner.invoke(app, ["run", str(dirs["packed"]), "-p", "x", "--temperature", "-1"]), "--temperature"
    )


# ---- demo ---------------------------------------------------------------------------------------
def test_demo_end_to_end_and_rerun(tmp_path: Path) -> None:
    demo_dir = tmp_path / "demo"
    r = runner.invoke(app, ["demo", "--dir", str(demo_dir), "--tokens", "12"])
    assert r.exit_code == 0, r.stderr
    for step in range(1, 7):
        assert f"step {step}/6" in r.stdout
    assert "trained reference model" in r.stdout and "models/reference" in r.stdout
    assert "Throughput" in r.stderr and "Expert store" in r.stderr
    # the trained model continues the Python prompt, at 4 and at 2 bits: an indented body after the def
    assert r.stdout.count("\ndef main(argv=None):\n    ") == 2 and "--bits 2" in r.stdout
    packed = demo_dir / "packed"
    for rel in ("fmoe.json", "model_weights.bin", "experts-q4/manifest.json", "experts-q2/manifest.json"):
        assert (packed / rel).is_file(), rel
    again = runner.invoke(app, ["demo", "--dir", str(demo_dir), "--tokens", "4"])
    assert again.exit_code == 0, again.stderr
    assert "reused" in again.stdout


def test_verify_option_refuses_a_corrupt_directory(dirs: dict[str, Path], tmp_path: Path) -> None:
    bad = Path(shutil.copytree(dirs["packed"], tmp_path / "bad"))
    path = bad / "experts-q4" / "layer_006" / "expert_0009.bin"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    line = assert_cli_error(runner.invoke(app, ["run", str(bad), "-p", "x", "--verify"]), "fails `fmoe verify`")
    assert "expert_0009.bin" in line


def test_run_int8_dot_runs_where_its_kernels_do(dirs: dict[str, Path]) -> None:
    """The cpu backend on VNNI/AVX2 CPUs; the torch backend with its Triton kernels (on CUDA; without a
    GPU it runs plain torch, so a one-line error); no other backend."""
    from fmoe.runtime.kernels.int8dot import AVAILABLE

    args = ["run", str(dirs["packed"]), "-p", "Hi", "--tokens", "4", "--json", "--raw", "--int8-dot"]
    r = runner.invoke(app, args)
    if AVAILABLE:
        assert r.exit_code == 0, r.stderr
        assert json.loads(r.stdout)["tokens"] <= 4
    else:
        assert_cli_error(r, "--int8-dot", "AVX2")
    torch_run = runner.invoke(app, [*args, "--backend", "torch", "--device", "cpu"])
    assert_cli_error(torch_run, "--int8-dot", "Triton kernels")
    assert_cli_error(runner.invoke(app, [*args, "--backend", "mlx"]), "--int8-dot", "cpu and torch backends")
    synthetic = ["bench", "synthetic", "tiny", "--device", "cpu", "--tokens", "2", "--prompt-tokens", "3", "--int8-dot"]
    assert_cli_error(runner.invoke(app, synthetic), "--int8-dot", "Triton kernels")


def test_the_cpu_path_runs_without_torch(dirs: dict[str, Path]) -> None:
    """The base install has no torch: `fmoe run` and `fmoe bench synthetic` on the cpu backend, and
    the option checks of the GPU tiers (--host-reads, --host-compute), never import it."""
    import subprocess
    import sys

    code = f"""
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not installed")
sys.meta_path.insert(0, NoTorch())
from typer.testing import CliRunner
from fmoe.cli import app
for args in (["run", {str(dirs["packed"])!r}, "--prompt", "x", "--tokens", "1"],
             ["bench", "synthetic", "tiny", "--backend", "cpu", "--tokens", "1", "--prompt-tokens", "2"]):
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
r = CliRunner().invoke(app, ["bench", "synthetic", "tiny", "--backend", "cpu", "--host-reads", "nope"])
assert r.exit_code != 0 and "--host-reads 'nope'" in r.output, r.output
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout[-2000:] + done.stderr[-2000:]
