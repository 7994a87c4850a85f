"""One results page over every evaluation task.

``medvlm eval report --run RUN --data DATA [--out results] [--config demo]``

Runs what ``medvlm demo`` evaluates (targets; segmentation with report ablations and the image-only baseline;
zero-shot and linear probe; report-to-CT fidelity, realism and diversity; drafting; de-identification;
training; pipeline examples) into ``OUT/README.md``, then appends the robustness, data-efficiency and
augmentation-utility sweeps found under ``OUT/robustness``, ``OUT/data_efficiency`` and ``OUT/augmentation``
(each takes minutes to half an hour, so they are run on their own first, e.g. ``medvlm eval robustness ...
--out OUT/robustness``). A sweep that is missing is named, with its command.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from medvlm.cli import claim_output

SWEEPS = (
    ("Robustness", "robustness", "robustness.md", "robustness.png",
     "medvlm eval robustness --pipeline RUN/contour --baseline RUN/baseline/final/baseline --data DATA --out OUT/robustness"),
    ("Data efficiency", "data_efficiency", "data_efficiency.md", "data_efficiency.png",
     "medvlm eval data-efficiency --run RUN --data DATA --config CONFIG --out OUT/data_efficiency"),
    ("Augmentation utility", "augmentation", "augmentation.md", None,
     "medvlm eval augmentation --run RUN --data DATA --config CONFIG --out OUT/augmentation"),
)


def sweep_sections(out: Path) -> str:
    """Markdown for the sweeps under ``out`` (their tables and plots, or how to produce them)."""
    parts = []
    for title, folder, table, figure, command in SWEEPS:
        parts.append(f"## {title}")
        table_path = out / folder / table
        if table_path.is_file():
            parts.append(table_path.read_text().strip())
            if figure is not None and (out / folder / figure).is_file():
                parts.append(f"![{title.lower()}]({folder}/{figure})")
        else:
            parts.append(f"Not run yet: `{command}`, then `medvlm eval report` again.")
    return "\n\n".join(parts) + "\n"


def assemble(run: str | Path, data: str | Path, out: str | Path, config_name: str = "demo", progress: bool = True) -> Path:
    """Write ``out/README.md`` (see the module docstring) and return its path."""
    from eval.demo_report import write_results
    from medvlm.data.io import atomic_write_text

    out = Path(out)
    write_results(Path(run), Path(data), out, config_name, progress=progress,
                  command=f"`medvlm eval report --run {run} --data {data} --out {out} --config {config_name}`")
    readme = out / "README.md"
    atomic_write_text(readme, readme.read_text().rstrip("\n") + "\n\n" + sweep_sections(out))
    return readme


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a training run folder (medvlm train all)")
    parser.add_argument("--data", required=True, help="dataset folder with datalist.json")
    parser.add_argument("--out", default="results", help="results folder (README.md, tables, plots, examples)")
    parser.add_argument("--config", default="demo", help="the run's configuration name, quoted on the page")
    parser.add_argument("--overwrite", action="store_true", help="write into an --out that holds other files")
    args = parser.parse_args(argv)
    claim_output(args, "eval report")
    print(f"written: {assemble(args.run, args.data, args.out, args.config)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
