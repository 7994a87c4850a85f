"""Report understanding: per-field accuracy of ``parse_report``.

``medvlm eval extraction`` (or ``python -m eval.extraction_eval``) measures two sets:

- **real wording** (``eval/data/real_reports/reports.jsonl``): 86 labelled reports written in the wording of
  public teaching cases and guideline examples (see that folder's README), split into a ``tune`` half (the only
  one looked at while writing parser rules) and a ``heldout`` half. Fields: subsite, laterality, T, N, M (each
  over the reports that state it; T and N compare the clinical and the pathological category), HPV and
  elective neck. With ``--pipeline RUN/zero_shot`` the zero-shot classifier's laterality and subsite accuracy
  on the same reports is printed next to it.
- **phantom** families (``--phantom N``): the project's own report templates, ``train`` and ``heldout``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from medvlm.text.deid import Deidentifier
from medvlm.text.parse import FIELDS, field_accuracy, parsed_from_record
from medvlm.text.prompts import process_report

REAL_REPORTS = Path(__file__).resolve().parent / "data" / "real_reports" / "reports.jsonl"
# field -> the ParsedReport attributes compared (all must match); a report counts for a field when its truth
# states any of them
REAL_FIELDS = {"subsite": ("subsite",), "laterality": ("laterality",), "T": ("ict", "pt"), "N": ("icn", "pn"),
               "M": ("icm",), "hpv": ("hpv",), "elective_neck": ("elective_neck",)}
ZERO_SHOT_SETS = {"laterality": ("left", "right", "midline"),
                  "subsite": ("oral tongue", "tonsil", "base of tongue", "larynx", "hypopharynx", "nasopharynx")}


def load_real_reports(path: str | Path = REAL_REPORTS, split: str | None = None) -> list[dict]:
    """The labelled real-wording reports (``split``: ``tune``, ``heldout`` or None for both)."""
    items = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [item for item in items if split is None or item["split"] == split]


def real_accuracy(items: list[dict], deidentify: bool = True) -> tuple[dict[str, tuple[float, int]], list[dict]]:
    """``({field: (accuracy over the reports stating it, how many)}, [mistakes])``; a field the truth leaves
    empty must also be empty in the parse for subsite and laterality (an invented side is a mistake), and
    counts for no other field."""
    deid = Deidentifier()
    hits: dict[str, list[bool]] = {name: [] for name in REAL_FIELDS}
    mistakes = []
    for item in items:
        parsed = process_report(item["text"], deidentifier=deid if deidentify else None).parsed
        truth = item["labels"]
        for name, attributes in REAL_FIELDS.items():
            stated = any(truth.get(a) for a in attributes)
            if not stated and name not in ("subsite", "laterality"):
                continue
            ok = all((truth.get(a) or None) == (getattr(parsed, a) or None) for a in attributes)
            hits[name].append(ok)
            if not ok:
                mistakes.append({"id": item["id"], "field": name, "truth": [truth.get(a) for a in attributes],
                                 "parsed": [getattr(parsed, a) for a in attributes]})
    return {name: (float(np.mean(v)) if v else float("nan"), len(v)) for name, v in hits.items()}, mistakes


def zero_shot_accuracy(pipeline: str | Path, items: list[dict]) -> dict[str, tuple[float, int]]:
    """Zero-shot accuracy of a ``ZeroShotClassificationPipeline`` on the reports that state each label set."""
    from pipelines import ZeroShotClassificationPipeline

    pipe = ZeroShotClassificationPipeline.from_pretrained(pipeline)
    out = pipe(reports=[item["text"] for item in items], labels=ZERO_SHOT_SETS)
    scores = {}
    for name, classes in ZERO_SHOT_SETS.items():
        probabilities = out.report_probabilities[name]
        keep = [k for k, item in enumerate(items) if item["labels"].get(name) in classes]
        correct = [classes[int(probabilities[k].argmax())] == items[k]["labels"][name] for k in keep]
        scores[name] = (float(np.mean(correct)) if correct else float("nan"), len(correct))
    return scores


def evaluate(n_reports: int = 400, seed: int = 0, family: str = "heldout", deidentify: bool = True) -> dict[str, float]:
    """Accuracy per field on ``n_reports`` phantom reports of ``family`` (parsed after de-identification)."""
    from medvlm.data.phantom import HNCPhantom

    phantom, deid = HNCPhantom(seed=seed), Deidentifier()
    truth, predicted = [], []
    for index in range(n_reports):
        record, report = phantom.record_and_report(index, report_family=family)
        truth.append(parsed_from_record(record))
        predicted.append(process_report(report.text, deidentifier=deid if deidentify else None).parsed)
    return field_accuracy(truth, predicted)


TARGETS = {"subsite": 0.95, "laterality": 0.95, "T": 0.90, "N": 0.90}


def real_table(results: dict, zero_shot: dict | None = None) -> str:
    lines = ["| field | tune | held-out | target (held-out) |" + (" zero-shot (held-out) |" if zero_shot else ""),
             "|---|---|---|---|" + ("---|" if zero_shot else "")]
    for name in REAL_FIELDS:
        cells = [f"{results[s][name][0]:.2f} ({results[s][name][1]})" for s in ("tune", "heldout")]
        target = f">= {TARGETS[name]:.2f}" if name in TARGETS else "-"
        row = f"| {name} | {cells[0]} | {cells[1]} | {target} |"
        if zero_shot:
            row += f" {zero_shot[name][0]:.2f} ({zero_shot[name][1]}) |" if name in zero_shot else " - |"
        lines.append(row)
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reports", default=str(REAL_REPORTS), help="labelled reports (JSON lines, see eval/data/real_reports)")
    parser.add_argument("--pipeline", default=None, help="ZeroShotClassificationPipeline folder: zero-shot accuracy next to it")
    parser.add_argument("--mistakes", action="store_true", help="list the tune half's mistakes (never the held-out half's)")
    parser.add_argument("--phantom", type=int, default=0, help="also N phantom reports per template family")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    results = {split: real_accuracy(load_real_reports(args.reports, split))[0] for split in ("tune", "heldout")}
    zero_shot = zero_shot_accuracy(args.pipeline, load_real_reports(args.reports, "heldout")) if args.pipeline else None
    print("### Report field extraction, real wording (accuracy (reports stating the field))")
    print()
    print(real_table(results, zero_shot))
    if args.mistakes:
        for mistake in real_accuracy(load_real_reports(args.reports, "tune"))[1]:
            print(f"  {mistake['id']} {mistake['field']}: truth {mistake['truth']} parsed {mistake['parsed']}")
    if args.phantom:
        phantom = {family: evaluate(args.phantom, args.seed, family) for family in ("train", "heldout")}
        print()
        print(f"### Report field extraction ({args.phantom} de-identified phantom reports per family)")
        print()
        print("| field | train family | held-out family |")
        print("|---|---|---|")
        for name in FIELDS:
            print(f"| {name} | {phantom['train'][name]:.3f} | {phantom['heldout'][name]:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
