"""scripts/compile_kernels.py: every Triton kernel a model's passes launch compiles for sm_90, not only
runs on the interpreter; a kernel the interpreter accepts and the compiler refuses is reported."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton")

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "scripts" / "compile_kernels.py"


def _run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_every_kernel_of_the_runtime_compiles_for_sm90() -> None:
    done = _run([str(SCRIPT), "--stage", "ttir", "--json"])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["failures"] == [] and result["specialisations"] > 50
    # every kernel in runtime/kernels is among those compiled: a new one must be launched by the passes
    sources = (ROOT / "runtime" / "kernels").glob("triton*.py")
    kernels = {m for p in sources for m in re.findall(r"@triton\.jit\s*\ndef (_\w+_kernel)\(", p.read_text())}
    assert kernels and kernels <= set(result["kernels"]), kernels - set(result["kernels"])


def test_a_kernel_the_interpreter_runs_but_the_compiler_refuses_is_reported(tmp_path: Path) -> None:
    """The failure that cost a GPU call: a name given a value of another shape inside a branch."""
    (tmp_path / "kernels.py").write_text(
        textwrap.dedent(
            """
            import triton
            import triton.language as tl

            @triton.jit
            def bad(x, C, BLOCK: tl.constexpr):
                src = (tl.arange(0, 16) + 1)[:, None]
                tl.store(x + src, src.to(tl.float32))
                if tl.program_id(1) == 0:
                    src = tl.arange(0, BLOCK) + C
                    tl.store(x + src, src.to(tl.float32))

            @triton.jit
            def good(x, C, BLOCK: tl.constexpr):
                src = (tl.arange(0, 16) + 1)[:, None]
                tl.store(x + src, src.to(tl.float32))
                if tl.program_id(1) == 0:
                    row = tl.arange(0, BLOCK) + C
                    tl.store(x + row, row.to(tl.float32))
            """
        )
    )
    code = textwrap.dedent(
        f"""
        import importlib.util, sys
        def load(name, path):
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        ck = load("compile_kernels", {str(SCRIPT)!r})
        kernels = load("kernels", {str(tmp_path / "kernels.py")!r})
        import torch
        for fn in (kernels.good, kernels.bad):
            key = ck.specialisation(fn, (torch.zeros(4), 3), {{"BLOCK": 256}})
            try:
                ck.compile_one(key, 90, "ttir")
            except Exception as e:
                print(fn.__name__, "refused", type(e).__name__)
            else:
                print(fn.__name__, "compiled")
        """
    )
    done = _run(["-c", code], timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:2] == ["good compiled", "bad refused CompilationError"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nope"], "unknown preset 'nope'"),
        (["--layers", "0"], "argument --layers: must be at least 1"),
        (["--arch", "70"], "the kernels need compute capability 8.0 or later"),
        (["--stage", "ptx"], "invalid choice"),
    ],
)
def test_bad_options_get_a_one_line_error(args: list[str], message: str) -> None:
    done = _run([str(SCRIPT), *args], timeout=300)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("compile_kernels.py: error:")
