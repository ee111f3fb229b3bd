"""The expert manifest (``experts-q{bits}/manifest.json``): the one reader that `fmoe verify`,
`fmoe repack` (reading finished experts back) and the runtime's expert store all use.

A manifest is trusted only when it describes this directory's model at this bit width, its layout
equals the one the config gives, and it lists every expert file exactly once with its size and
xxh3_128. ``check`` collects every problem (for verify's report); ``read`` raises the first one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fmoe.config import TextConfig
from fmoe.errors import FmoeError
from fmoe.formats.packed import (
    EXPERT_MANIFEST,
    FORMAT_VERSION,
    ExpertLayout,
    expert_relpath,
    experts_dirname,
)
from fmoe.fsutil import read_json


def header_problems(doc: Mapping[str, Any], kind: str, fingerprint: str) -> list[str]:
    """A manifest's format, version and model: ``kind`` is ``dense`` or ``experts``."""
    problems = []
    if doc.get("format") != f"fmoe-{kind}" or doc.get("version") != FORMAT_VERSION:
        problems.append(f"not an fmoe {kind} manifest of format version {FORMAT_VERSION}")
    if doc.get("model_fingerprint") != fingerprint:
        problems.append(
            f"model_fingerprint {doc.get('model_fingerprint')!r} differs from fmoe.json's {fingerprint!r} "
            "(manifest of another model)"
        )
    return problems


@dataclass(frozen=True)
class ExpertManifest:
    """A checked expert manifest: the layout of every file and each file's size and xxh3_128."""

    path: Path
    bits: int
    layout: ExpertLayout
    files: Mapping[str, Mapping[str, Any]]  # "layer_LLL/expert_EEEE.bin" -> {"size", "xxh3_128"}
    document: Mapping[str, Any]  # the whole JSON document (quantisation report, source, ...)

    @classmethod
    def read(cls, packed_dir: Path | str, cfg: TextConfig, bits: int) -> ExpertManifest:
        """The ``bits``-bit manifest of ``packed_dir``; FmoeError naming it and its first problem."""
        path = Path(packed_dir) / experts_dirname(bits) / EXPERT_MANIFEST
        doc = read_json(path, f"no {bits}-bit experts: run `fmoe repack SOURCE --bits {bits} --out {packed_dir}`")
        manifest, problems = cls.check(path, doc, cfg, bits)
        if manifest is None:
            raise FmoeError(f"{path}: {problems[0]}; re-run `fmoe repack --bits {bits}`")
        return manifest

    @classmethod
    def check(cls, path: Path, doc: Any, cfg: TextConfig, bits: int) -> tuple[ExpertManifest | None, list[str]]:
        """(the manifest, []) when ``doc`` can be trusted, else (None, every problem found)."""
        if not isinstance(doc, dict):
            return None, ["is not a JSON object"]
        problems = header_problems(doc, "experts", cfg.fingerprint())
        if doc.get("bits") != bits:
            problems.append(f"holds {doc.get('bits')!r}-bit experts, expected {bits}")
        for key, want in (("num_layers", cfg.num_hidden_layers), ("num_experts", cfg.num_experts)):
            if doc.get(key) != want:
                problems.append(f"{key} {doc.get(key)!r}, the config gives {want}")
        layout = _layout(doc, cfg, bits, problems)
        files = doc.get("files")
        if not isinstance(files, dict):
            problems.append("has no 'files' object")
        elif layout is not None and not problems:
            problems += _file_problems(files, cfg, layout.file_size)
        if problems or layout is None or not isinstance(files, dict):
            return None, problems
        return cls(Path(path), bits, layout, files, doc), []

    def entry(self, layer: int, expert: int) -> Mapping[str, Any]:
        return self.files[expert_relpath(layer, expert)]


def _layout(doc: Mapping[str, Any], cfg: TextConfig, bits: int, problems: list[str]) -> ExpertLayout | None:
    group = doc.get("group_size")
    if not isinstance(group, int) or isinstance(group, bool) or group <= 0:
        problems.append(f"group_size {group!r} is not valid for this model")
        return None
    try:
        layout = ExpertLayout.for_config(cfg, bits, group)
    except FmoeError as exc:
        problems.append(f"group_size {group}: {exc}")
        return None
    if doc.get("file_size") != layout.file_size:
        problems.append(f"file_size {doc.get('file_size')!r}, the config gives {layout.file_size}")
    if doc.get("components") != layout.to_dict()["components"]:
        problems.append("component offsets/shapes differ from the layout the config gives")
    return layout


def _file_problems(files: Mapping[str, Any], cfg: TextConfig, size: int) -> list[str]:
    problems = []
    expected = {expert_relpath(L, E) for L in range(cfg.num_hidden_layers) for E in range(cfg.num_experts)}
    missing, extra = expected - files.keys(), files.keys() - expected
    if missing:
        problems.append(f"lists {len(files)} files, {len(missing)} expected ones absent (e.g. {min(missing)})")
    if extra:
        problems.append(f"lists {len(extra)} files this model does not have (e.g. {min(extra)})")
    wrong = [f for f in expected & files.keys() if not _entry_ok(files[f], size)]
    if wrong:
        problems.append(f"{len(wrong)} file entries lack the right size/xxh3_128 (e.g. {min(wrong)})")
    return problems


def _entry_ok(entry: Any, size: int) -> bool:
    return isinstance(entry, dict) and entry.get("size") == size and isinstance(entry.get("xxh3_128"), str)
