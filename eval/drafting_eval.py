"""Report drafting: agreement of the fields extracted from drafted reports with the clinical record.

``medvlm eval drafting --pipeline RUN/report_generation --data DATA [--split test]``: each CT of the split
is drafted (greedy), the draft goes through the same rule-based parser as real reports, and each field
(subsite, laterality, cT, cN, cM, elective neck) is compared with the record. A field the draft does not
state counts as disagreement; the table also says how often it was stated at all.
"""
from __future__ import annotations

import argparse
from pathlib import Path

FIELDS = ("subsite", "laterality", "ict", "icn", "icm", "elective_neck")


def agreement(pipeline: str | Path, data: str | Path, split: str = "test") -> dict[str, dict[str, float]]:
    from medvlm.data.datalist import load_datalist
    from medvlm.text.parse import parse_report
    from pipelines import ReportGenerationPipeline

    pipe = ReportGenerationPipeline.from_pretrained(pipeline)
    pipe.set_progress_bar_config(disable=True)
    items = [i for i in load_datalist(data)[split] if i.get("record") is not None and not isinstance(i["record"], dict)]
    drafts = pipe([i["image"] for i in items]).reports if items else []
    result = {}
    for field in FIELDS:
        stated = agree = 0
        for item, draft in zip(items, drafts):
            value = getattr(parse_report(draft), field) if draft.strip() else None
            truth = str(getattr(item["record"], field, ""))
            stated += value is not None
            agree += value is not None and (value == truth or truth.startswith(str(value)))
        result[field] = {"agreement": agree / max(len(items), 1), "stated": stated / max(len(items), 1), "n": len(items)}
    return result


def table(result: dict) -> str:
    lines = ["| field | agreement with the record | stated in the draft | cases |", "|---|---|---|---|"]
    for field, r in result.items():
        lines.append(f"| {field} | {r['agreement']:.2f} | {r['stated']:.2f} | {r['n']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True, help="ReportGenerationPipeline folder (RUN/report_generation)")
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="test")
    args = parser.parse_args(argv)
    print(table(agreement(args.pipeline, args.data, args.split)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
