"""Sizes and numbers: every field of a config and of the manifests is checked for type and range
(fmoe/formats/schemas.py) before anything is computed or allocated from it; a bad one is a
one-line error naming the file, the field and its value."""

from __future__ import annotations

import copy
import json
import shutil
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from support import assert_cli_error
from typer.testing import CliRunner

from fmoe.cli import app
from fmoe.config import TextConfig
from fmoe.errors import FmoeError
from fmoe.runtime.diagnostics import build_packed

runner = CliRunner()

BASE: dict[str, Any] = dict(
    model_type="qwen3_5_moe_text",
    vocab_size=300,
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    linear_conv_kernel_dim=4,
    linear_key_head_dim=8,
    linear_value_head_dim=8,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    num_experts=8,
    num_experts_per_tok=2,
)

# (change to the text config, fragment the one-line error must hold)
BAD_CONFIGS = [
    ({"num_hidden_layers": 10**7}, "num_hidden_layers = 10000000: expected int <= 1024"),
    ({"hidden_size": 128.7}, "hidden_size = 128.7: expected int, got float"),
    ({"hidden_size": 128.0}, "hidden_size = 128.0: expected int"),
    ({"vocab_size": "300"}, "vocab_size = '300': expected int, got str"),
    ({"num_experts": True}, "num_experts = True: expected int, got bool"),
    ({"num_experts": None}, "num_experts = None: expected int"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps = nan"),
    ({"rms_norm_eps": 0}, "rms_norm_eps = 0: expected float > 0"),
    ({"partial_rotary_factor": -0.25}, "partial_rotary_factor = -0.25: expected float > 0"),
    ({"rope_parameters": {"partial_rotary_factor": 1.5}}, "rope_parameters.partial_rotary_factor = 1.5"),
    ({"rope_parameters": {"rope_theta": float("inf")}}, "rope_parameters.rope_theta = inf"),
    ({"rope_parameters": "fast"}, "rope_parameters = 'fast'"),
    ({"full_attention_interval": 0}, "full_attention_interval = 0: expected int >= 1"),
    ({"layer_types": ["linear_attention"] * 3 + ["dense"]}, "layer_types[3] = 'dense'"),
    ({"layer_types": ["linear_attention"] * 3}, "layer_types lists 3 layers, num_hidden_layers is 4"),
    ({"layer_types": "full_attention"}, "layer_types = 'full_attention'"),
    ({"max_position_embeddings": -5}, "max_position_embeddings = -5"),
    ({"eos_token_id": [1, -3]}, "eos_token_id[1] = -3"),
    ({"eos_token_id": 300}, "eos_token_id [300] outside the vocabulary"),
    ({"num_key_value_heads": 3}, "num_attention_heads must be a multiple of num_key_value_heads"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok must be in 1..num_experts"),
    ({"partial_rotary_factor": 0.3}, "head_dim * partial_rotary_factor = 4.8"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings = 'yes'"),
    ({"head_dim": [16]}, "head_dim = [16]: expected int, got array"),
]


@pytest.mark.parametrize(("change", "fragment"), BAD_CONFIGS, ids=[f for _, f in BAD_CONFIGS])
def test_bad_config_field_is_one_line_naming_it(change: dict[str, Any], fragment: str) -> None:
    with pytest.raises(FmoeError) as err:
        TextConfig.from_dict({**BASE, **change}, where="config.json")
    message = str(err.value)
    assert message.startswith("config.json: ") and "\n" not in message
    assert fragment in message, message


def test_nested_text_config_and_good_values_pass() -> None:
    cfg = TextConfig.from_dict({"model_type": "qwen3_5_moe", "text_config": BASE, "eos_token_id": 7})
    assert cfg.num_hidden_layers == 4 and cfg.eos_token_ids == (7,) and cfg.rotary_dim == 4
    with pytest.raises(FmoeError, match="eos_token_id = -1"):
        TextConfig.from_dict({"model_type": "qwen3_5_moe", "text_config": BASE, "eos_token_id": -1})
    with pytest.raises(FmoeError, match="text_config is not an object"):
        TextConfig.from_dict({"model_type": "qwen3_5_moe", "text_config": [1]})
    with pytest.raises(FmoeError, match="not a JSON object"):
        TextConfig.from_dict([1, 2])  # type: ignore[arg-type]


def test_huge_config_is_refused_before_any_allocation() -> None:
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(FmoeError, match="num_hidden_layers"):
        TextConfig.from_dict({**BASE, "num_hidden_layers": 10**9, "layer_types": None})
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1 << 20 and time.perf_counter() - t0 < 1


# ---- through the commands --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_packed(tmp_path_factory.mktemp("schema"), seed=5)


@pytest.mark.parametrize(("change", "fragment"), BAD_CONFIGS[:6], ids=[f for _, f in BAD_CONFIGS[:6]])
def test_extract_refuses_a_bad_source_config(built: tuple[Path, Path], tmp_path: Path, change, fragment) -> None:
    src = Path(shutil.copytree(built[0], tmp_path / "src"))
    cfg = json.loads((src / "config.json").read_text())
    cfg["text_config"].update(change)
    (src / "config.json").write_text(json.dumps(cfg))
    assert_cli_error(runner.invoke(app, ["extract", str(src), "--out", str(tmp_path / "out")]), "config.json", fragment)
    assert not (tmp_path / "out" / "model_weights.bin").exists()


def _edit(path: Path, edit: Any) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def _first_file(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["files"][sorted(doc["files"])[0]]


EXPERT_MANIFEST_EDITS = [
    (lambda d: d.update(group_size=0), "group_size = 0"),
    (lambda d: d.update(group_size=32), "component offsets/shapes or file_size differ"),
    (lambda d: d.update(bits="4"), "bits = '4'"),
    (lambda d: d.update(num_layers=10**7), "num_layers = 10000000"),
    (lambda d: d.update(file_size=-4096), "file_size = -4096"),
    (lambda d: _first_file(d).update(size=2**60), "size = 1152921504606846976"),
    (lambda d: _first_file(d).update(xxh3_128="not a hash"), "xxh3_128 = 'not a hash'"),
    (lambda d: d.update(files=[]), "files = []: expected object"),
    (lambda d: d["components"]["gate_proj.weight"].update(shape=[1, 2, 3]), "shape = [1, 2, 3]"),
]


@pytest.mark.parametrize(("edit", "fragment"), EXPERT_MANIFEST_EDITS, ids=[f for _, f in EXPERT_MANIFEST_EDITS])
def test_bad_expert_manifest_is_one_line_in_run_and_verify(built, tmp_path: Path, edit, fragment) -> None:
    packed = Path(shutil.copytree(built[1], tmp_path / "p"))
    _edit(packed / "experts-q4" / "manifest.json", edit)
    # --checks off: the manifest's own schema is checked whatever the checksum setting
    r = runner.invoke(app, ["run", str(packed), "-p", "hi", "--tokens", "1", "--checks", "off"])
    assert_cli_error(r, "experts-q4/manifest.json", fragment)
    v = runner.invoke(app, ["verify", str(packed), "--json"])
    assert v.exit_code == 1
    bad = [b["problem"] for b in json.loads(v.stdout)["bad"] if b["file"] == "experts-q4/manifest.json"]
    assert any(fragment in problem for problem in bad), bad


DENSE_MANIFEST_EDITS = [
    (lambda d: d["tensors"]["norm.weight"]["parts"]["data"].update(offset=-64), "offset = -64"),
    (lambda d: d["tensors"]["norm.weight"]["parts"]["data"].update(dtype="float64"), "dtype = 'float64'"),
    (lambda d: d["tensors"]["norm.weight"].update(kind="sparse"), "kind = 'sparse'"),
    (lambda d: d["tensors"]["norm.weight"].update(shape=[1, 1, 1, 1, 1]), "shape = [1, 1, 1, 1, 1]"),
    (lambda d: d.update(tensors=5), "tensors = 5"),
    (lambda d: d.update(file_size="big"), "file_size = 'big'"),
]


@pytest.mark.parametrize(("edit", "fragment"), DENSE_MANIFEST_EDITS, ids=[f for _, f in DENSE_MANIFEST_EDITS])
def test_bad_dense_manifest_is_one_line(built, tmp_path: Path, edit, fragment) -> None:
    packed = Path(shutil.copytree(built[1], tmp_path / "p"))
    _edit(packed / "model_weights.json", edit)
    r = runner.invoke(app, ["run", str(packed), "-p", "hi", "--tokens", "1", "--checks", "off"])
    assert_cli_error(r, "model_weights.json", fragment)


def test_sizes_a_manifest_claims_are_checked_against_the_file_before_allocating(built, tmp_path: Path) -> None:
    """A part claiming a terabyte inside a small file: refused before any array of that size exists."""
    packed = Path(shutil.copytree(built[1], tmp_path / "p"))

    def claim(doc: dict[str, Any]) -> None:
        spec = doc["tensors"]["layers.0.mlp.gate.weight"]
        spec["shape"] = [1 << 20, 1 << 20]
        spec["parts"]["data"].update(shape=[1 << 20, 1 << 20], size=1 << 42)

    _edit(packed / "model_weights.json", claim)
    from fmoe.formats.packed import read_identity
    from fmoe.runtime.dense import read_dense_weights

    _, cfg = read_identity(packed)
    tracemalloc.start()
    with pytest.raises(FmoeError, match=r"layers\.0\.mlp\.gate\.weight has shape"):
        read_dense_weights(packed, cfg, verify=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 64 << 20
    # the same claim with the config's shape but a size beyond the file
    doc = json.loads((built[1] / "model_weights.json").read_text())
    bad = copy.deepcopy(doc)
    bad["tensors"]["norm.weight"]["parts"]["data"]["offset"] = 1 << 40
    (packed / "model_weights.json").write_text(json.dumps(bad))
    with pytest.raises(FmoeError, match=r"norm\.weight part data .* does not fit"):
        read_dense_weights(packed, cfg, verify=False)
