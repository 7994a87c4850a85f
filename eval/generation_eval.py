"""Conditioning fidelity of report-to-CT: does a generated CT carry the prompt's laterality?

``medvlm eval generation --run RUN``: for a left and a right primary (otherwise identical prompts),
generate N volumes each and judge every one twice: by the zero-shot classifier (CT tower, left vs right)
and by the segmentation decoder's paired CTVn (which side of the body midline holds it, for an
ipsilateral elective neck). Reports the fraction of samples whose judged side is the prompt's.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

PROMPTS = {side: (f"{side.capitalize()} tonsil squamous cell carcinoma, cT2 N1 M0. "
                  f"Elective neck: ipsilateral ({side}) levels II-IV.") for side in ("left", "right")}


def laterality_fidelity(run: str | Path, *, n_per_side: int = 4, steps: int = 25, guidance_scale: float = 3.0,
                        seed: int = 0) -> dict:
    from eval.segmentation import body_midline_mm, predicted_sides
    from pipelines import ReportToCTPipeline, ZeroShotClassificationPipeline

    run = Path(run)
    generator_pipe = ReportToCTPipeline.from_pretrained(run / "report_to_ct")
    generator_pipe.set_progress_bar_config(disable=True)
    classifier = ZeroShotClassificationPipeline.from_pretrained(run / "zero_shot")
    names = list(generator_pipe.config.structure_names)
    judged = {"zero-shot classifier": [], "segmentation decoder (CTVn side)": []}
    for number, (side, prompt) in enumerate(PROMPTS.items()):
        generators = [torch.Generator().manual_seed(seed + 1000 * number + i) for i in range(n_per_side)]
        out = generator_pipe(prompt, num_images_per_prompt=n_per_side, generator=generators, num_inference_steps=steps,
                             guidance_scale=guidance_scale, return_masks=True)
        volumes = [np.asarray(out.ct[i]) for i in range(n_per_side)]
        probabilities = classifier(ct=volumes, affine=out.affine, labels={"laterality": ["left", "right"]}).ct_probabilities
        for row in probabilities["laterality"]:
            judged["zero-shot classifier"].append(["left", "right"][int(np.argmax(row))] == side)
        for i, volume in enumerate(volumes):
            midline = body_midline_mm(volume, out.affine)
            ctvn = np.asarray(out.masks[i][names.index("CTVn")]) if out.masks is not None else np.zeros(volume.shape, bool)
            judged["segmentation decoder (CTVn side)"].append(predicted_sides(ctvn, out.affine, midline) == side)
    return {judge: float(np.mean(values)) for judge, values in judged.items()} | {
        "n": 2 * n_per_side, "steps": steps, "scheduler": type(generator_pipe.scheduler).__name__}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="training run folder with report_to_ct/ and zero_shot/")
    parser.add_argument("--n", type=int, default=4, help="volumes per side")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    args = parser.parse_args(argv)
    result = laterality_fidelity(args.run, n_per_side=args.n, steps=args.steps, guidance_scale=args.guidance_scale)
    print(f"generated CTs ({result['n']}, {result['scheduler']} {result['steps']} steps) carrying the prompt's laterality:")
    for judge in ("zero-shot classifier", "segmentation decoder (CTVn side)"):
        print(f"  judged by the {judge}: {result[judge]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
