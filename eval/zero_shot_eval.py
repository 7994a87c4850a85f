"""Zero-shot classification of reports and CT volumes per label set, next to a supervised linear probe.

``medvlm eval zero-shot --pipeline RUN/zero_shot --data DATA``: for subsite, laterality, T stage, N
stage and elective neck, accuracy, balanced accuracy and macro AUROC (MONAI ``compute_roc_auc``, over the
classes present in the split) of the zero-shot classifier on reports and on CT, on the validation split
(report templates seen in training) and the test split (held-out templates); and of a logistic-regression
probe trained on the training split's embeddings (same encoder, same features). Truth comes from the
clinical records, not from the reports.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from medvlm.errors import InputError

LABEL_SETS = {  # label set -> (record attribute, classes)
    "subsite": ("subsite", ("oral tongue", "tonsil", "base of tongue", "larynx", "hypopharynx", "nasopharynx")),
    "laterality": ("laterality", ("left", "right", "midline")),
    "t_stage": ("ict", ("T1", "T2", "T3", "T4")),
    "n_stage": ("icn", ("N0", "N1", "N2", "N3")),
    "elective_neck": ("elective_neck", ("ipsilateral", "bilateral")),
}


def _truth(items, attribute: str, classes) -> np.ndarray:
    values = [str(getattr(i.get("record"), attribute, "")) for i in items]
    # records may carry sub-stages ("T4a", "N2b"): the label set's class is the prefix
    return np.asarray([next((k for k, c in enumerate(classes) if v == c or v.startswith(c)), -1) for v in values])


def scores(truth: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy (mean recall over classes present) and macro AUROC over classes present."""
    from monai.metrics import compute_roc_auc

    keep = truth >= 0
    truth, probabilities = truth[keep], probabilities[keep]
    predicted = probabilities.argmax(1)
    present = sorted(set(truth.tolist()))
    recalls = [float((predicted[truth == c] == c).mean()) for c in present]
    auroc = float("nan")
    if len(present) >= 2:
        onehot = np.eye(probabilities.shape[1])[truth][:, present]
        auroc = float(compute_roc_auc(torch.as_tensor(probabilities[:, present]), torch.as_tensor(onehot), average="macro"))
    return {"n": int(len(truth)), "accuracy": float((predicted == truth).mean()) if len(truth) else float("nan"),
            "balanced_accuracy": float(np.mean(recalls)) if recalls else float("nan"), "macro_auroc": auroc}


def _probe(train_x: torch.Tensor, train_y: np.ndarray, n_classes: int, steps: int = 300):
    """Multinomial logistic regression (L2 1e-3) on standardised frozen embeddings, fitted with L-BFGS.

    Written with torch because scikit-learn is not a dependency; returns a function of embeddings.
    """
    keep = torch.as_tensor(train_y >= 0)
    mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    x, y = (train_x[keep] - mean) / std, torch.as_tensor(train_y)[keep]
    probe = torch.nn.Linear(x.shape[1], n_classes)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=steps)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(probe(x), y) + 1e-3 * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return lambda embeddings: probe((embeddings - mean) / std)


@torch.no_grad()
def evaluate(pipeline: str | Path, data: str | Path) -> dict:
    """``{(modality, split, method): {label set: scores}}`` for reports and CT, validation and test."""
    from medvlm.data.datalist import load_datalist
    from medvlm.models.zero_shot import ZeroShotClassifier
    from pipelines import ZeroShotClassificationPipeline

    pipe = ZeroShotClassificationPipeline.from_pretrained(pipeline)
    model = pipe.contrastive.eval()
    classifier = ZeroShotClassifier(model, pipe.tokenizer, max_length=pipe.config.max_report_tokens,
                                    report_format=getattr(pipe.config, "report_format", "structured"))
    datalist = load_datalist(data)
    splits = {"training": datalist["training"], "validation (seen templates)": datalist.get("validation", []),
              "test (held-out templates)": datalist["test"]}
    embeddings = {}
    for split, items in splits.items():
        texts = [i["report"] for i in items]
        report_embeds = torch.cat([classifier.encode_reports(texts[k:k + 16]) for k in range(0, len(texts), 16)])
        ct_embeds = torch.from_numpy(pipe.embed_ct([i["image"] for i in items]))
        embeddings[split] = {"reports": report_embeds.float(), "ct": ct_embeds.float()}
    results: dict = {}
    for name, (attribute, classes) in LABEL_SETS.items():
        _, class_embeds = classifier.class_embeddings(list(classes), name)
        scale = model.logit_scale.exp().clamp(max=100.0)
        for modality in ("reports", "ct"):
            probe = _probe(embeddings["training"][modality], _truth(splits["training"], attribute, classes), len(classes))
            for split in list(splits)[1:]:
                items = splits[split]
                if not items:
                    continue
                truth = _truth(items, attribute, classes)
                x = embeddings[split][modality]
                zero_shot = (scale * x @ class_embeds.T.float()).softmax(-1).numpy()
                results.setdefault((modality, split, "zero-shot"), {})[name] = scores(truth, zero_shot)
                results.setdefault((modality, split, "linear probe"), {})[name] = scores(truth, probe(x).softmax(-1).numpy())
    return results


def table(results: dict) -> str:
    lines = ["| input | split | method | " + " | ".join(LABEL_SETS) + " |", "|---|---|---|" + "---|" * len(LABEL_SETS)]
    for (modality, split, method), per_set in results.items():
        cells = [f"{per_set[n]['accuracy']:.2f} / {per_set[n]['balanced_accuracy']:.2f} / {per_set[n]['macro_auroc']:.2f}"
                 for n in LABEL_SETS]
        lines.append(f"| {modality} | {split} | {method} | " + " | ".join(cells) + " |")
    return "Cells: accuracy / balanced accuracy / macro AUROC (classes present).\n\n" + "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True, help="ZeroShotClassificationPipeline folder (RUN/zero_shot)")
    parser.add_argument("--data", required=True, help="dataset folder (datalist.json with records)")
    parser.add_argument("--out", default=None, help="write the table as Markdown here")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = parser.parse_args(argv)
    if args.out and Path(args.out).exists() and not args.overwrite:
        raise InputError(f"--out {args.out} already exists; choose another file or pass --overwrite")
    text = table(evaluate(args.pipeline, args.data))
    print(text)
    if args.out:
        from medvlm.data.io import atomic_write_text

        atomic_write_text(Path(args.out), text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
