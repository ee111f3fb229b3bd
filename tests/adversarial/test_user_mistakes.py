"""A user's mistakes get a one-line error naming the option or argument, before any work, never a
traceback: bad option values, non-UTF-8 text, a hostile chat template, wrong types through the
Python API."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import assert_cli_error
from typer.testing import CliRunner

import fmoe
from fmoe.cli import app
from fmoe.errors import FmoeError
from fmoe.runtime.diagnostics import build_packed
from fmoe.runtime.text.chat import ChatTemplate

runner = CliRunner()


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_packed(tmp_path_factory.mktemp("mistakes"), seed=6)[1]


@pytest.fixture(scope="module")
def engine(packed: Path) -> fmoe.runtime.engine.engine.Engine:  # type: ignore[name-defined]
    with fmoe.load(packed) as e:
        yield e


RUN_MISTAKES = [
    (["--temperature", "nan"], "--temperature nan"),
    (["--temperature", "inf"], "--temperature inf"),
    (["--temperature", "-1"], "--temperature -1"),
    (["--top-p", "nan"], "--top-p nan"),
    (["--top-p", "0"], "--top-p 0"),
    (["--top-k", "-1"], "--top-k -1"),
    (["--seed", "-1"], "--seed -1"),
    (["--cache-gb", "nan"], "--cache-gb nan"),
    (["--cache-gb", "-2"], "--cache-gb -2"),
    (["--tokens", "-1"], "--tokens -1"),
    (["--checks", "sometimes"], "--checks 'sometimes'"),
    (["--max-context", "0"], "--max-context 0"),
    (["--k", "0"], "--k 0"),
    (["--bits", "3"], "--bits 3"),
    (["--backend", "tpu"], "--backend 'tpu'"),
]


@pytest.mark.parametrize(("args", "fragment"), RUN_MISTAKES, ids=[f for _, f in RUN_MISTAKES])
def test_run_option_mistakes(packed: Path, args: list[str], fragment: str) -> None:
    assert_cli_error(runner.invoke(app, ["run", str(packed), "-p", "hi", *args]), fragment)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [(["--seed", "-1"], "--seed -1"), (["--tokens", "0"], "--tokens"), (["--cache-gb", "nan"], "--cache-gb nan")],
)
def test_bench_option_mistakes(packed: Path, args: list[str], fragment: str) -> None:
    assert_cli_error(runner.invoke(app, ["bench", "model", str(packed), *args]), fragment)


def test_option_of_the_wrong_type_is_one_line(packed: Path) -> None:
    """Typer's own parsing errors (an int option given 2.5) go through fmoe's one-line handler too."""
    r = subprocess.run(
        [sys.executable, "-m", "fmoe", "run", str(packed), "-p", "hi", "--k", "2.5"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "fmoe run: " in lines[0] and "--k" in lines[0]


def test_demo_checks_its_options_before_any_work(tmp_path: Path) -> None:
    assert_cli_error(runner.invoke(app, ["demo", "--dir", str(tmp_path / "d"), "--tokens", "-1"]), "--tokens -1")
    assert not (tmp_path / "d").exists()


def test_non_utf8_prompt_from_the_command_line(packed: Path) -> None:
    """Bytes that are not UTF-8 arrive from argv as surrogates: one line, no traceback."""
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "fmoe",
            "run",
            str(packed),
            "--tokens",
            "1",
            "-p",
            b"caf\xe9 \xff".decode("utf-8", "surrogateescape"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "--prompt: not valid UTF-8" in r.stderr


# ---- hostile chat templates --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        ("{% include 'secrets.txt' %}", "uses {% include %}"),
        ("{% import 'macros.j2' as m %}{{ m.x() }}", "uses {% import %}"),
        ("{% from 'macros.j2' import x %}", "uses {% from %}"),
        ("{% extends 'base.j2' %}", "uses {% extends %}"),
        ("{% if %}", "not a valid jinja2 template"),
    ],
)
def test_template_that_loads_files_or_does_not_parse_is_refused(source: str, fragment: str) -> None:
    with pytest.raises(FmoeError) as err:
        ChatTemplate(source).render([{"role": "user", "content": "x"}])
    assert fragment in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        ("{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}{% endfor %}", "took more than"),
        ("{% for a in range(99999) %}{% for b in range(99999) %}{{ a }}{% endfor %}{% endfor %}", "stopped"),
        ("{{ 'x' * 10000000000 }}", "a repetition of"),
        ("{{ [0] * 10000000000 }}", "a repetition of"),
        ("{{ 9 ** 9999999 }}", "an exponent of"),
        ("{{ messages.__class__.__mro__[1].__subclasses__() }}", "unsafe"),
    ],
)
def test_template_rendering_is_bounded(source: str, fragment: str) -> None:
    t0 = time.perf_counter()
    with pytest.raises(FmoeError) as err:
        ChatTemplate(source).render([{"role": "user", "content": "x"}])
    assert fragment in str(err.value) and "\n" not in str(err.value)
    assert time.perf_counter() - t0 < 10


def test_hostile_template_in_a_packed_directory_is_one_line(packed: Path, tmp_path: Path) -> None:
    import shutil

    copy = Path(shutil.copytree(packed, tmp_path / "p"))
    (copy / "chat_template.jinja").write_text("{% include '/etc/passwd' %}")
    assert_cli_error(runner.invoke(app, ["run", str(copy), "-p", "hi"]), "chat_template.jinja", "include")


# ---- the Python API ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda e: e.logits([1.5, 2.0]), "integer token ids"),
        (lambda e: e.logits(["a", "b"]), "integer token ids"),
        (lambda e: e.logits([[1, 2]]), "integer token ids"),
        (lambda e: e.logits([10**9]), "outside the vocabulary"),
        (lambda e: e.logits([-1]), "outside the vocabulary"),
        (lambda e: e.logits([]), "empty"),
        (lambda e: e.generate(b"hello"), "bytes, not text"),
        (lambda e: e.generate("hi", max_tokens=2.5), "--tokens 2.5"),
        (lambda e: e.generate("hi", max_tokens=True), "--tokens True"),
        (lambda e: e.generate("hi", temperature="hot"), "--temperature 'hot'"),
        (lambda e: e.generate("hi", top_k=1.5), "--top-k 1.5"),
        (lambda e: e.generate("hi", seed=-1), "--seed -1"),
        (lambda e: e.generate("hi", seed=2.0), "--seed 2.0"),
        (lambda e: e.generate("hi", stop="x"), "--stop"),
        (lambda e: e.generate("caf\udce9"), "not valid UTF-8"),
        (lambda e: e.generate("hi", system=5), "--system"),
    ],
)
def test_api_argument_mistakes(engine, call, fragment: str) -> None:
    with pytest.raises(FmoeError) as err:
        call(engine)
    assert fragment in str(err.value), str(err.value)


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"k": 2.5}, "--k 2.5"),
        ({"k": True}, "--k True"),
        ({"bits": "4"}, "bits '4'"),
        ({"max_context": 3.0}, "--max-context 3.0"),
        ({"cache_bytes": -1}, "cache_bytes -1"),
        ({"cache_bytes": float("nan")}, "cache_bytes nan"),
        ({"io_threads": 0}, "io_threads 0"),
        ({"checks": "never"}, "--checks 'never'"),
    ],
)
def test_load_argument_mistakes(packed: Path, options: dict[str, object], fragment: str) -> None:
    with pytest.raises(FmoeError) as err:
        fmoe.load(packed, **options)  # type: ignore[arg-type]
    assert fragment in str(err.value), str(err.value)
