"""Model presets and hub aliases, read from the data in manifests/."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from fmoe.errors import FmoeError


def _data(name: str) -> Any:
    return json.loads(resources.files("fmoe.manifests").joinpath(name).read_text(encoding="utf-8"))


def preset_names() -> list[str]:
    folder = resources.files("fmoe.manifests").joinpath("presets")
    return sorted(p.name.removesuffix(".json") for p in folder.iterdir() if p.name.endswith(".json"))


def load_preset(name: str) -> dict[str, Any]:
    """The preset document: ``{name, description, repo, text_config}``."""
    if name not in preset_names():
        raise FmoeError(f"unknown preset {name!r}; choose one of: {', '.join(preset_names())}")
    return _data(f"presets/{name}.json")


def repo_aliases() -> dict[str, dict[str, Any]]:
    """Alias -> ``{repo, layout, description}`` for `fmoe download`."""
    return _data("repos.json")["aliases"]


# Repository-name suffixes of releases that share their model's preset (quantised copies).
RELEASE_SUFFIXES = ("-FP8", "-4bit", "-8bit")


def preset_for_alias(alias: str) -> str | None:
    """The preset whose model an alias's repo holds (its BF16, FP8 or MLX release), or None."""
    repo = repo_aliases()[alias]["repo"]
    base = repo.rsplit("/", 1)[-1]
    for suffix in RELEASE_SUFFIXES:
        base = base.removesuffix(suffix)
    for name in preset_names():
        preset_repo = load_preset(name).get("repo")
        if isinstance(preset_repo, str) and preset_repo.rsplit("/", 1)[-1] == base:
            return name
    return None
