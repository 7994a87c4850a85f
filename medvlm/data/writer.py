"""Write a phantom dataset folder: images, labels, reports, records, datalist with splits, previews.

The folder is built under a temporary name and renamed into place when complete, so an interrupted
run never leaves a half-written dataset; an existing folder from other settings is never overwritten
unless asked.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

import medvlm
from medvlm.config import PhantomDataConfig, config_to_dict
from medvlm.data.clinical import write_records_csv
from medvlm.data.io import atomic_write_text, save_labels, save_nifti
from medvlm.data.phantom import HNCPhantom, PhantomConfig
from medvlm.data.preview import save_preview
from medvlm.vocabulary import STRUCTURE_NAMES
from medvlm.errors import InputError

logger = logging.getLogger(__name__)
MANIFEST = "phantom.json"


@dataclass
class WriteStats:
    """What a dataset write did and how fast: generation alone and generation plus writing."""

    out_dir: Path
    n_cases: int
    generate_seconds: float
    total_seconds: float
    reused: bool = False

    @property
    def cases_per_second_generate(self) -> float:
        return self.n_cases / max(self.generate_seconds, 1e-9)

    @property
    def cases_per_second_total(self) -> float:
        return self.n_cases / max(self.total_seconds, 1e-9)


def split_indices(n: int, seed: int, validation_fraction: float, test_fraction: float) -> dict[str, list[int]]:
    """Deterministic, seeded train/validation/test split of case indices ``0..n-1``."""
    if not 0 <= validation_fraction < 1 or not 0 <= test_fraction < 1 or validation_fraction + test_fraction >= 1:
        raise InputError(f"split fractions must be in [0, 1) and sum below 1, got validation={validation_fraction}, test={test_fraction}")
    order = np.random.default_rng([seed, 7919]).permutation(n)
    n_test = int(round(n * test_fraction))
    n_val = int(round(n * validation_fraction))
    return {
        "test": sorted(int(i) for i in order[:n_test]),
        "validation": sorted(int(i) for i in order[n_test:n_test + n_val]),
        "training": sorted(int(i) for i in order[n_test + n_val:]),
    }


def _manifest(config: PhantomDataConfig) -> dict:
    return {"generator": "medvlm.data.phantom.HNCPhantom", "medvlm_version": medvlm.__version__, "config": config_to_dict(config)}


def write_phantom_dataset(out_dir: str | Path, config: PhantomDataConfig, *, overwrite: bool = False,
                          progress: Callable[[int, int], None] | None = None) -> WriteStats:
    """Generate ``config.n_cases`` cases into ``out_dir``; reuse it when it already holds the same dataset."""
    out_dir = Path(out_dir)
    if config.n_cases < 1:
        raise InputError(f"n_cases must be at least 1, got {config.n_cases}")
    manifest = _manifest(config)
    if out_dir.exists() and any(out_dir.iterdir()):
        existing = out_dir / MANIFEST
        same = existing.is_file() and json.loads(existing.read_text()).get("config") == manifest["config"]
        if same and not overwrite:
            logger.info("reusing the phantom dataset in %s (same settings)", out_dir)
            return WriteStats(out_dir, config.n_cases, 0.0, 0.0, reused=True)
        if not overwrite:
            raise InputError(f"{out_dir} already holds other data (a different dataset or unrelated files); "
                             "choose another --out or pass --overwrite to replace it")
    phantom = HNCPhantom(PhantomConfig(shape=config.shape, spacing_mm=config.spacing_mm), seed=config.seed)
    splits = split_indices(config.n_cases, config.seed, config.validation_fraction, config.test_fraction)
    split_of = {i: name for name, indices in splits.items() for i in indices}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        for sub in ("images", "labels", "reports", "previews", "annotations"):
            (staging / sub).mkdir()
        records, phi_lines = [], []
        items: dict[str, list[dict]] = {"training": [], "validation": [], "test": []}
        generate_seconds = 0.0
        start = time.perf_counter()
        preview_budget = config.previews
        for index in range(config.n_cases):
            split = split_of[index]
            t0 = time.perf_counter()
            case = phantom.case(index, report_family="heldout" if split == "test" else "train")
            generate_seconds += time.perf_counter() - t0
            cid = case.case_id
            save_nifti(staging / "images" / f"{cid}.nii.gz", case.image_hu, case.affine, description="medvlm phantom CT (HU)")
            save_labels(staging / "labels" / f"{cid}.nii.gz", case.labels, case.affine, case.label_names)
            atomic_write_text(staging / "reports" / f"{cid}.txt", case.report.text)
            records.append(case.record)
            phi_lines.append(json.dumps({"id": cid, "report": f"reports/{cid}.txt", "family": case.report.family,
                                         "spans": [[s.start, s.end, s.type] for s in case.report.phi_spans]}))
            items[split].append({
                "id": cid, "image": f"images/{cid}.nii.gz", "label": f"labels/{cid}.nii.gz",
                "report": f"reports/{cid}.txt", "record": case.record.number, "report_family": case.report.family,
            })
            if preview_budget > 0:
                r = case.record
                title = f"{cid}: {r.laterality} {r.subsite}, c{r.ict} c{r.icn} c{r.icm}, elective neck {r.elective_neck}"
                save_preview(staging / "previews" / f"{cid}.png", case.image_hu, case.labels, case.label_names,
                             case.spacing_mm, title=title)
                preview_budget -= 1
            if progress is not None:
                progress(index + 1, config.n_cases)
        write_records_csv(records, staging / "records.csv")
        atomic_write_text(staging / "annotations" / "phi_spans.jsonl", "\n".join(phi_lines) + "\n")
        datalist = {
            "description": "medvlm synthetic head-and-neck CT phantom (synthetic identifiers by design)",
            "labels": list(STRUCTURE_NAMES),
            "spacing_mm": list(config.spacing_mm), "shape": list(config.shape), "records": "records.csv",
            **items,
        }
        atomic_write_text(staging / "datalist.json", json.dumps(datalist, indent=1))
        atomic_write_text(staging / MANIFEST, json.dumps(manifest, indent=1))
        total_seconds = time.perf_counter() - start
        if out_dir.exists():
            shutil.rmtree(out_dir)  # only reached with overwrite=True
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return WriteStats(out_dir, config.n_cases, generate_seconds, total_seconds)
