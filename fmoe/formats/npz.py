"""fmoe's own ``.npz`` files (saved references, routing traces): a JSON ``meta`` string beside plain
arrays, read without pickle; anything else is a one-line error naming the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fmoe.errors import FmoeError


def read_npz(
    path: Path, where: str, what: str, fmt: str, arrays: tuple[str, ...]
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(meta, {name: array})`` of an archive whose ``meta["format"]`` is ``fmt``. ``where`` names the
    file in errors, ``what`` says what it should have been."""
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError("an .npy array, not an .npz archive")
        with z:
            meta = json.loads(str(z["meta"]))
            if not isinstance(meta, dict) or meta.get("format") != fmt:
                raise ValueError(f"its format is not {fmt}")
            return meta, {name: z[name] for name in arrays}
    except FileNotFoundError:
        raise FmoeError(f"{where}: no such file") from None
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        why = "not an .npz archive" if "pickle" in str(exc) else str(exc)
        raise FmoeError(f"{where}: not {what} ({why})") from None
