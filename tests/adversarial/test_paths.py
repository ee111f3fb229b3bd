"""Hostile and broken paths: every name read from a file (the shard index) or a server (the hub's
listing, a downloaded index) stays inside its directory, and special files (FIFOs, devices,
directories where a file belongs, symlinks resolving outside) are refused by name, never opened
for a blocking read. Anything that could block runs under :func:`no_hang`, so CI never hangs."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save
from support import assert_cli_error
from typer.testing import CliRunner

from fmoe.cli import app
from fmoe.convert.download import download
from fmoe.convert.source import DOWNLOAD_RECORD, SourceCheckpoint
from fmoe.convert.synth import synthesize
from fmoe.errors import FmoeError
from fmoe.formats.safetensors_io import INDEX_FILE, MAX_INDEX, SafetensorsFile
from fmoe.fsutil import check_regular_file, confined, is_plain_name, open_regular

HANG_S = 15.0  # far above any honest run of these tests (each well under a second)
CLEAN_ENV = {"HF_TOKEN": None, "HF_ENDPOINT": None, "HF_HUB_OFFLINE": None}
REPO = "org/hostile"


def _load_fakehub() -> Any:
    """tests/fakehub.py, loaded by path (tests/ is not a package) and shared with test_download.py."""
    if "fakehub" not in sys.modules:
        spec = importlib.util.spec_from_file_location("fakehub", Path(__file__).parents[1] / "fakehub.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["fakehub"] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["fakehub"]


fake_hub = _load_fakehub().fake_hub

# Names that must never be joined to a directory: upwards, anchored (POSIX and Windows), odd.
HOSTILE_NAMES = [
    "../elsewhere/model.safetensors",
    "sub/../../elsewhere/model.safetensors",
    "..\\elsewhere\\model.safetensors",
    "/tmp/model.safetensors",
    "C:model.safetensors",
    "\\\\host\\share\\model.safetensors",
    "./model.safetensors",
    "a//model.safetensors",
    "",
]


def no_hang(fn: Callable[[], Any], fifos: Sequence[Path] = ()) -> Any:
    """``fn()`` in a thread; if it is still running after HANG_S (blocked opening a FIFO), the FIFOs
    are opened for writing (which releases a blocked reader) and the test fails instead of hanging."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(HANG_S)
    if thread.is_alive():
        for fifo in fifos:
            with contextlib.suppress(OSError):  # no reader waiting: nothing to release
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(5)
        pytest.fail(f"blocked for {HANG_S} s (opened a FIFO for reading?)")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def open_error(path: Path, *fragments: str) -> str:
    """SourceCheckpoint.open fails with one line holding every fragment (and never blocks)."""
    with pytest.raises(FmoeError) as err:
        no_hang(lambda: SourceCheckpoint.open(path), list(path.rglob("*")))
    msg = str(err.value)
    assert "\n" not in msg, msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)
    return msg


def extract_cli(src: Path, out: Path, fifos: Sequence[Path] = ()) -> Any:
    return no_hang(lambda: CliRunner().invoke(app, ["extract", str(src), "--out", str(out)]), fifos)


# ---- source checkpoints -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("paths")
    out = {"sharded": root / "sharded", "single": root / "single"}
    synthesize(out["sharded"], preset="tiny", layers=2, experts=4, seed=11, shard_size="150KB")
    synthesize(out["single"], preset="tiny", layers=2, experts=4, seed=11)
    return out


def copy_of(built: dict[str, Path], kind: str, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(built[kind], dst)
    return dst


def weight_map(src: Path) -> dict[str, str]:
    return json.loads((src / INDEX_FILE).read_text())["weight_map"]


def rewrite_index(src: Path, mapping: dict[str, str]) -> None:
    (src / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": mapping}))


@pytest.mark.parametrize("hostile", HOSTILE_NAMES)
def test_index_names_outside_are_refused(
    built: dict[str, Path], tmp_path: Path, rng: np.random.Generator, hostile: str
) -> None:
    src = copy_of(built, "sharded", tmp_path)
    mapping = weight_map(src)
    tensor = sorted(mapping)[int(rng.integers(len(mapping)))]
    if ".." in hostile:  # a valid shard waits where the name leads: without the check it would be read
        target = (src / hostile.replace("\\", "/")).resolve()
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / mapping[tensor], target)
    mapping[tensor] = hostile
    rewrite_index(src, mapping)
    msg = open_error(src, INDEX_FILE, tensor, "not a plain relative file name")
    assert repr(hostile) in msg


def test_index_name_outside_is_refused_even_for_an_unread_shard(built: dict[str, Path], tmp_path: Path) -> None:
    """A vision/MTP-only shard is never read, but its name is still confined (its size was statted)."""
    src = copy_of(built, "sharded", tmp_path)
    mapping = weight_map(src)
    mapping["model.visual.blocks.0.attn.qkv.weight"] = "../../../etc/hostname"
    rewrite_index(src, mapping)
    open_error(src, "weight_map['model.visual.blocks.0.attn.qkv.weight']", "../../../etc/hostname")


@pytest.mark.parametrize("bad", [7, None, ["model.safetensors"], {"a": 1}])
def test_index_names_that_are_not_strings(built: dict[str, Path], tmp_path: Path, bad: Any) -> None:
    src = copy_of(built, "sharded", tmp_path)
    mapping: dict[str, Any] = dict(weight_map(src))
    tensor = next(iter(mapping))
    mapping[tensor] = bad
    rewrite_index(src, mapping)
    open_error(src, tensor, "not a plain relative file name")


def test_oversized_index_is_refused_by_its_size(built: dict[str, Path], tmp_path: Path) -> None:
    src = copy_of(built, "sharded", tmp_path)
    with open(src / INDEX_FILE, "r+b") as f:
        f.truncate(MAX_INDEX + 1)  # sparse: costs no disk, and must cost no memory either
    open_error(src, INDEX_FILE, str(MAX_INDEX + 1), "MiB")


def test_extract_cli_refuses_an_escaping_index(built: dict[str, Path], tmp_path: Path) -> None:
    src = copy_of(built, "sharded", tmp_path)
    mapping = weight_map(src)
    tensor = "model.language_model.embed_tokens.weight"
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(src / mapping[tensor], tmp_path / "elsewhere" / "stolen.safetensors")
    mapping[tensor] = "../elsewhere/stolen.safetensors"
    rewrite_index(src, mapping)
    result = extract_cli(src, tmp_path / "out")
    assert_cli_error(result, INDEX_FILE, tensor, "../elsewhere/stolen.safetensors")
    assert not (tmp_path / "out").exists()


def test_symlink_inside_is_fine_outside_is_refused(built: dict[str, Path], tmp_path: Path) -> None:
    src = copy_of(built, "sharded", tmp_path)
    shard = sorted(set(weight_map(src).values()))[0]
    # inside: the shard moved to a sub-folder, its name a relative symlink to it -> read as before
    (src / "real").mkdir()
    (src / shard).rename(src / "real" / shard)
    (src / shard).symlink_to(Path("real") / shard)
    with SourceCheckpoint.open(src) as ckpt, SourceCheckpoint.open(built["sharded"]) as original:
        name = ckpt.dense_names()[0]
        np.testing.assert_array_equal(ckpt.read_dense(name), original.read_dense(name))
    # outside: the same bytes, but the link leaves the checkpoint
    outside = tmp_path / "outside.safetensors"
    shutil.move(src / "real" / shard, outside)
    (src / shard).unlink()
    (src / shard).symlink_to(outside)
    open_error(src, shard, "outside")


def test_symlinked_config_outside_is_refused(built: dict[str, Path], tmp_path: Path) -> None:
    src = copy_of(built, "single", tmp_path)
    outside = tmp_path / "config.json"
    shutil.move(src / "config.json", outside)
    (src / "config.json").symlink_to(outside)
    open_error(src, "config.json", "outside")
    result = extract_cli(src, tmp_path / "out")
    assert_cli_error(result, "config.json", "outside")


def test_huggingface_cache_snapshot_is_accepted(built: dict[str, Path], tmp_path: Path) -> None:
    """The one exception: snapshots/<rev>/ files are symlinks into the repo's blobs/ folder."""
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / ("ab" * 20)
    snap.mkdir(parents=True)
    for f in built["sharded"].iterdir():
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(Path("../..") / "blobs" / blob.name)
    with SourceCheckpoint.open(snap) as ckpt:
        assert ckpt.layout == "official" and len(ckpt.shards()) > 2
    # ...and only there: the same links from a folder that is not a cache snapshot are refused
    other = tmp_path / "plain" / "ckpt"
    other.mkdir(parents=True)
    for f in snap.iterdir():
        (other / f.name).symlink_to(f.resolve())
    open_error(other, "outside")


@pytest.mark.parametrize("kind", ["fifo", "directory", "dangling"])
def test_special_shard_is_refused_by_name(
    built: dict[str, Path], tmp_path: Path, rng: np.random.Generator, kind: str
) -> None:
    layout = str(rng.choice(["sharded", "single"]))
    src = copy_of(built, layout, tmp_path)
    shard = sorted(set(weight_map(src).values()))[int(rng.integers(2))] if layout == "sharded" else "model.safetensors"
    (src / shard).unlink()
    expected = {"fifo": "is a FIFO", "directory": "is a directory", "dangling": "missing"}[kind]
    if kind == "fifo":
        os.mkfifo(src / shard)
    elif kind == "directory":
        (src / shard).mkdir()
    else:
        (src / shard).symlink_to("gone.safetensors")
    open_error(src, shard, expected)


def test_fifo_config_and_index_are_refused(built: dict[str, Path], tmp_path: Path) -> None:
    src = copy_of(built, "sharded", tmp_path)
    (src / INDEX_FILE).unlink()
    os.mkfifo(src / INDEX_FILE)  # was: silently ignored, every *.safetensors read instead
    open_error(src, INDEX_FILE, "is a FIFO")
    (src / INDEX_FILE).unlink()
    (src / "config.json").unlink()
    os.mkfifo(src / "config.json")
    open_error(src, "config.json", "is a FIFO")
    result = extract_cli(src, tmp_path / "out", [src / "config.json"])
    assert_cli_error(result, "config.json", "is a FIFO")


def test_fifo_shard_cli(built: dict[str, Path], tmp_path: Path) -> None:
    src = copy_of(built, "single", tmp_path)
    (src / "model.safetensors").unlink()
    os.mkfifo(src / "model.safetensors")
    result = extract_cli(src, tmp_path / "out", [src / "model.safetensors"])
    assert_cli_error(result, "model.safetensors", "is a FIFO", "not a regular file")


# ---- the helpers themselves ---------------------------------------------------------------------------
def test_plain_names() -> None:
    for good in ("config.json", "model-00001-of-00002.safetensors", "sub/dir/x.bin", "a..b", ".hidden", "x y"):
        assert is_plain_name(good), good
    for bad in [*HOSTILE_NAMES, "a/", "a/./b", "a\0b", "D:\\x", "..", ".", 3, None]:
        assert not is_plain_name(bad), bad


def test_confined_and_regular_checks(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    (root / "f").write_bytes(b"x")
    (root / "link").symlink_to("f")
    (root / "up").symlink_to("..")
    (root / "loop").symlink_to("loop")
    assert confined(root, "link") == root / "link"
    assert confined(root, "d/new.bin") == root / "d" / "new.bin"  # a plain name, not yet existing
    for name, fragment in [("up/x", "outside"), ("../root/f", "plain relative"), ("loop", "resolve")]:
        with pytest.raises(FmoeError, match=fragment):
            confined(root, name, "a test")
    assert check_regular_file(root / "link").st_size == 1
    os.mkfifo(root / "fifo")
    for path, fragment in [(root / "d", "a directory"), (root / "fifo", "a FIFO"), (root / "nope", "missing")]:
        with pytest.raises(FmoeError, match=fragment):
            no_hang(lambda p=path: open_regular(p), [root / "fifo"])
    if os.path.exists("/dev/null"):
        with pytest.raises(FmoeError, match="a character device"):
            check_regular_file(Path("/dev/null"))
    with pytest.raises(FmoeError, match="a FIFO"):
        no_hang(lambda: SafetensorsFile(root / "fifo"), [root / "fifo"])


# ---- the hub: listings and downloaded names ---------------------------------------------------------------
def make_repo(rng: np.random.Generator) -> dict[str, bytes]:
    """A small sharded repo: config, tokenizer, index and two shards of random tensors."""
    shards = {
        f"model-0000{i}-of-00002.safetensors": {
            f"model.language_model.layers.{i}.mlp.gate.weight": rng.standard_normal((4, 8)).astype(np.float32)
        }
        for i in (1, 2)
    }
    files = {name: save(t) for name, t in shards.items()}
    wmap = {k: name for name, t in shards.items() for k in t}
    files[INDEX_FILE] = json.dumps({"metadata": {}, "weight_map": wmap}).encode()
    files["config.json"] = json.dumps({"model_type": "qwen3_5_moe", "seed": int(rng.integers(1 << 30))}).encode()
    files["tokenizer.json"] = b'{"model": {"vocab": {"a": 0}}}'
    return files


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def download_cli(hub: Any, target: Path) -> Any:
    return no_hang(
        lambda: CliRunner().invoke(app, ["download", REPO, "--endpoint", hub.url, "--dir", str(target)], env=CLEAN_ENV),
        [p for p in target.rglob("*")] if target.exists() else [],
    )


@pytest.mark.parametrize(
    "hostile", ["../escaped.safetensors", "sub/../../escaped.safetensors", "ABSOLUTE", "..\\escaped.safetensors"]
)
def test_hostile_listing_is_refused_before_any_file_get(
    fake_hub: Any, tmp_path: Path, rng: np.random.Generator, hostile: str
) -> None:
    """The listing and the index both name a shard outside --dir (the real attack: without the
    check it would be fetched and written there)."""
    hostile = str(tmp_path / "abs-escaped.safetensors") if hostile == "ABSOLUTE" else hostile
    files = make_repo(rng)
    index = json.loads(files[INDEX_FILE])
    tensor, shard = next(iter(index["weight_map"].items()))
    files[hostile] = files.pop(shard)
    index["weight_map"][tensor] = hostile
    files[INDEX_FILE] = json.dumps(index).encode()
    fake_hub.add_repo(REPO, files)
    target = tmp_path / "work" / "d"
    before = snapshot(tmp_path)
    result = download_cli(fake_hub, target)
    assert_cli_error(result, REPO, "file listing", repr(hostile))
    assert fake_hub.requests("GET", "resolve") == []  # nothing fetched, nothing written
    assert snapshot(tmp_path) - before <= {"work", "work/d", f"work/d/{DOWNLOAD_RECORD}"}


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda e: {**e, "size": -5}, "not a byte count"),
        (lambda e: {**e, "size": "12"}, "not a byte count"),
        (lambda e: {k: v for k, v in e.items() if k != "oid"}, "malformed"),
        (lambda e: {**e, "lfs": {**e["lfs"], "oid": "../../x"}} if "lfs" in e else e, "no valid git oid or sha256"),
    ],
)
def test_broken_listing_entries_are_one_line_errors(
    fake_hub: Any, tmp_path: Path, rng: np.random.Generator, edit: Callable[[dict], dict], fragment: str
) -> None:
    fake_hub.add_repo(REPO, make_repo(rng))
    fake_hub.listing_hook = lambda entries: [edit(e) if e["type"] == "file" else e for e in entries]
    with pytest.raises(FmoeError, match=fragment) as err:
        no_hang(lambda: download(REPO, target=tmp_path / "d", endpoint=fake_hub.url))
    assert "\n" not in str(err.value)


def test_oversized_listed_index_is_not_fetched(fake_hub: Any, tmp_path: Path, rng: np.random.Generator) -> None:
    fake_hub.add_repo(REPO, make_repo(rng))
    fake_hub.listing_hook = lambda entries: [
        {**e, "size": MAX_INDEX + 1} if e["path"] == INDEX_FILE else e for e in entries
    ]
    result = download_cli(fake_hub, tmp_path / "d")
    assert_cli_error(result, INDEX_FILE, str(MAX_INDEX + 1))
    assert not [r for r in fake_hub.requests("GET", "resolve") if r.path.endswith(INDEX_FILE)]


@pytest.mark.parametrize("hostile", ["../escaped.safetensors", "/etc/hostname", "sub/../../x.safetensors"])
def test_downloaded_index_naming_outside_is_refused(
    fake_hub: Any, tmp_path: Path, rng: np.random.Generator, hostile: str
) -> None:
    files = make_repo(rng)
    index = json.loads(files[INDEX_FILE])
    tensor = next(iter(index["weight_map"]))
    index["weight_map"][tensor] = hostile
    files[INDEX_FILE] = json.dumps(index).encode()
    fake_hub.add_repo(REPO, files)
    target = tmp_path / "d"
    result = download_cli(fake_hub, target)
    assert_cli_error(result, INDEX_FILE, tensor, repr(hostile))
    assert not any("safetensors" in p for p in snapshot(tmp_path) if not p.startswith("d/"))
    assert not [r for r in fake_hub.requests("GET", "resolve") if r.path.endswith(".safetensors")]


def test_symlinked_folder_in_dir_is_not_written_through(
    fake_hub: Any, tmp_path: Path, rng: np.random.Generator
) -> None:
    """A shard in a sub-folder whose local folder is a symlink out of --dir: refused, nothing written."""
    files = make_repo(rng)
    index = json.loads(files[INDEX_FILE])
    name = next(iter(index["weight_map"].values()))
    files[f"sub/{name}"] = files.pop(name)
    index["weight_map"] = {k: (f"sub/{v}" if v == name else v) for k, v in index["weight_map"].items()}
    files[INDEX_FILE] = json.dumps(index).encode()
    fake_hub.add_repo(REPO, files)
    target, elsewhere = tmp_path / "d", tmp_path / "elsewhere"
    target.mkdir()
    elsewhere.mkdir()
    (target / "sub").symlink_to(elsewhere)
    result = download_cli(fake_hub, target)
    assert_cli_error(result, f"sub/{name}", "outside")
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("kind", ["fifo", "directory", "part-symlink"])
def test_special_files_in_dir_are_refused(fake_hub: Any, tmp_path: Path, rng: np.random.Generator, kind: str) -> None:
    files = make_repo(rng)
    fake_hub.add_repo(REPO, files)
    target = tmp_path / "d"
    target.mkdir()
    shard = sorted(n for n in files if n.endswith(".safetensors"))[int(rng.integers(2))]
    outside = tmp_path / "victim.bin"
    outside.write_bytes(b"keep me")
    if kind == "fifo":
        os.mkfifo(target / shard)
    elif kind == "directory":
        (target / shard).mkdir()
    else:  # a planted .part symlink: the download must not write through it
        (target / (shard + ".part")).symlink_to(outside)
    result = download_cli(fake_hub, target)
    fragment = {"fifo": "is a FIFO", "directory": "is a directory", "part-symlink": "cannot be written"}[kind]
    assert_cli_error(result, shard, fragment)
    assert outside.read_bytes() == b"keep me"


def test_edited_download_record_with_escaping_names_is_refused(
    fake_hub: Any, tmp_path: Path, rng: np.random.Generator
) -> None:
    fake_hub.add_repo(REPO, make_repo(rng))
    target = tmp_path / "d"
    assert download_cli(fake_hub, target).exit_code == 0
    pin = json.loads((target / DOWNLOAD_RECORD).read_text())
    entry = next(iter(pin["files"].values()))
    pin["files"]["../../outside.json"] = entry
    (target / DOWNLOAD_RECORD).write_text(json.dumps(pin))
    assert_cli_error(download_cli(fake_hub, target), DOWNLOAD_RECORD, "not a valid fmoe download record")


def test_tokenizer_files_linked_outside_the_checkpoint_are_refused(tmp_path: Path) -> None:
    """extract copies the tokenizer files into the packed directory: a link to a file outside the
    source (a private file, say) is refused by name, never copied."""
    from fmoe.convert.synth import synthesize

    src = tmp_path / "src"
    synthesize(src, preset="tiny", layers=2, experts=4, seed=3)
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    (src / "generation_config.json").unlink()
    (src / "generation_config.json").symlink_to(secret)
    out = tmp_path / "out"
    assert_cli_error(
        CliRunner().invoke(app, ["extract", str(src), "--out", str(out)]), "generation_config.json", "outside"
    )
    assert not (out / "generation_config.json").exists()
