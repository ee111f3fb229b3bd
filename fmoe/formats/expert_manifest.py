"""The expert manifest (``experts-q{bits}/manifest.json``): the one reader that `fmoe verify`,
`fmoe repack` (reading finished experts back) and the runtime's expert store all use.

A manifest is trusted only when it matches its declared schema (fmoe/formats/schemas.py: every
field's type and range), describes this directory's model at this bit width, its layout equals the
one the config gives, and it lists every expert file exactly once with its size and xxh3_128.
``check`` collects every problem (for verify's report); ``read`` raises the first one.
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
    manifest_digest_problem,
)
from fmoe.formats.schemas import ExpertManifestSchema, schema_problem
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
    def read(cls, packed_dir: Path | str, cfg: TextConfig, bits: int, *, digest: bool = True) -> ExpertManifest:
        """The ``bits``-bit manifest of ``packed_dir``; FmoeError naming it and its first problem.
        With ``digest``, the file must also be the one whose xxh3_128 fmoe.json recorded."""
        relpath = f"{experts_dirname(bits)}/{EXPERT_MANIFEST}"
        path = Path(packed_dir) / relpath
        doc = read_json(path, f"no {bits}-bit experts: run `fmoe repack SOURCE --bits {bits} --out {packed_dir}`")
        manifest, problems = cls.check(path, doc, cfg, bits)
        if manifest is None:
            raise FmoeError(f"{path}: {problems[0]}; re-run `fmoe repack --bits {bits}`")
        problem = manifest_digest_problem(Path(packed_dir), relpath, path.read_bytes()) if digest else None
        if problem is not None:
            raise FmoeError(f"{path}: {problem}")
        return manifest

    @classmethod
    def check(cls, path: Path, doc: Any, cfg: TextConfig, bits: int) -> tuple[ExpertManifest | None, list[str]]:
        """(the manifest, []) when ``doc`` can be trusted, else (None, every problem found)."""
        problem = schema_problem(doc, ExpertManifestSchema)
        if problem is not None:
            return None, [problem]
        problems = header_problems(doc, "experts", cfg.fingerprint())
        if doc["bits"] != bits:
            problems.append(f"holds {doc['bits']}-bit experts, expected {bits}")
        for key, want in (("num_layers", cfg.num_hidden_layers), ("num_experts", cfg.num_experts)):
            if doc[key] != want:
                problems.append(f"{key} {doc[key]}, the config gives {want}")
        layout = _layout(doc, cfg, bits, problems)
        files = doc["files"]
        if layout is not None and not problems:
            problems += _file_problems(files, cfg, layout.file_size)
        if problems or layout is None:
            return None, problems
        return cls(Path(path), bits, layout, files, doc), []

    def entry(self, layer: int, expert: int) -> Mapping[str, Any]:
        return self.files[expert_relpath(layer, expert)]


def _layout(doc: Mapping[str, Any], cfg: TextConfig, bits: int, problems: list[str]) -> ExpertLayout | None:
    group = doc["group_size"]
    try:
        layout = ExpertLayout.for_config(cfg, bits, group)
    except FmoeError as exc:
        problems.append(f"group_size {group}: {exc}")
        return None
    if doc["file_size"] != layout.file_size or doc["components"] != layout.to_dict()["components"]:
        problems.append(
            f"component offsets/shapes or file_size differ from the layout the config gives for group_size "
            f"{group} (file_size {layout.file_size})"
        )
    return layout


def _file_problems(files: Mapping[str, Any], cfg: TextConfig, size: int) -> list[str]:
    problems = []
    expected = {expert_relpath(L, E) for L in range(cfg.num_hidden_layers) for E in range(cfg.num_experts)}
    missing, extra = expected - files.keys(), files.keys() - expected
    if missing:
        problems.append(f"lists {len(files)} files, {len(missing)} expected ones absent (e.g. {min(missing)})")
    if extra:
        problems.append(f"lists {len(extra)} files this model does not have (e.g. {min(extra)})")
    wrong = [f for f in expected & files.keys() if files[f]["size"] != size]
    if wrong:
        problems.append(f"{len(wrong)} file entries do not have the layout's size {size} (e.g. {min(wrong)})")
    return problems
