"""scripts/layer_slope.py: a decode layer's own time from two depths of `fmoe bench synthetic`."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "layer_slope", Path(__file__).parents[1] / "scripts" / "layer_slope.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_slope_separates_a_layer_from_the_fixed_cost() -> None:
    per_layer, fixed = _script().slope((4, 0.5468), (8, 0.9134))
    assert per_layer == pytest.approx(0.09165) and fixed == pytest.approx(0.1802)
    assert _script().slope((2, 3.0), (6, 3.0)) == (0.0, 3.0)  # depth costs nothing: all fixed


def test_layer_slope_runs_the_bench_at_both_depths(capsys: pytest.CaptureFixture[str]) -> None:
    script = _script()
    bench = ["--tokens", "2", "--prompt-tokens", "2", "--backend", "cpu"]
    assert script.main(["tiny", "--layers", "2", "4", "--rounds", "1", "--json", "--", *bench]) == 0
    doc = json.loads(capsys.readouterr().out)
    (row,) = doc["rounds"]
    assert set(row["ms_a_token"]) == {"2", "4"} and all(ms > 0 for ms in row["ms_a_token"].values())
    two, four = row["ms_a_token"]["2"], row["ms_a_token"]["4"]
    assert row["ms_a_layer"] == pytest.approx((four - two) / 2)
    assert doc["bench_args"] == bench


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["tiny", "--layers", "8", "4"], "need 1 <= SHALLOW < DEEP"),
        (["tiny", "--rounds", "0"], "--rounds: 0"),
        (["tiny", "--", "--layers", "3"], "must not set --layers"),
    ],
)
def test_layer_slope_bad_arguments_are_one_line_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _script().main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_failed_bench_names_its_command() -> None:
    with pytest.raises(SystemExit, match=r"fmoe bench synthetic no-such-preset .* failed: "):
        _script().main(["no-such-preset", "--rounds", "1"])
