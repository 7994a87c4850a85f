"""Report-to-CT: conditioning fidelity, realism and diversity of generated CTs.

``medvlm eval generation --run RUN [--data DATA]``

* **Fidelity**: for a left and a right primary (otherwise identical prompts), generate N volumes each and
  judge every one twice, from the image alone: by the zero-shot classifier (CT tower, left vs right) and by
  the segmentation decoder contouring the volume with the null report (which side of the body midline holds
  the centre of its GTVp). The pipeline's paired CTVn is not a judge: a decoder whose presence head reads
  the side from the report (``side_structures``) puts it on the prompt's side whatever the image shows.
  With ``--stages``, T and N stage too: cT1 vs cT4 and cN0 vs cN2 prompts from the same seeds, judged by
  whether the paired GTVp (GTVn) volume is larger for the higher stage.
* **Realism** (with ``--data``): one CT per held-out test report against the held-out CTs, on the image
  tower's preprocessed grid: Frechet distance of contrastive image embeddings (MONAI ``FIDMetric``) next
  to the same distance between two real sets of the same sizes (validation vs test: the floor that sample
  size alone gives), and per tissue (HU ranges inside the body) the share of body voxels and the 1-D
  Wasserstein distance of the HU values. The same two measures for the VAE's reconstructions of those
  validation CTs: generation can be no more realistic than its VAE reconstructs, so this row tells the
  VAE's share of the gap from the diffusion model's.
* **Diversity** (with ``--data``): mean pairwise MS-SSIM (MONAI ``MultiScaleSSIMMetric``) between samples
  of one prompt, between samples of different prompts, and between real patients. Near 1 within a prompt
  would mean the sampler ignores its noise.
"""
from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

# HU ranges of the tissues compared (inside the body, > BODY_HU); air and lung are left out because the
# ROI's amount of outside air depends on the crop, not on the generator
BODY_HU = -500.0
TISSUES = {"fat": (-150.0, -30.0), "soft tissue": (-30.0, 150.0), "bone": (300.0, 1500.0)}
# three MS-SSIM scales (the first three of MONAI's five default weights): five scales would need volumes
# larger than 160 voxels per side with the default 11-voxel kernel
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001)

JUDGES = ("zero-shot classifier", "segmentation decoder, null report (GTVp side)")
PROMPTS = {side: (f"{side.capitalize()} tonsil squamous cell carcinoma, cT2 N1 M0. "
                  f"Elective neck: ipsilateral ({side}) levels II-IV.") for side in ("left", "right")}


def centre_side(mask: np.ndarray, affine: np.ndarray, midline_x_mm: float) -> str:
    """"left" or "right": the side of the body midline holding the mask's centre; "none" for an empty mask."""
    index = np.argwhere(mask)
    if len(index) == 0:
        return "none"
    centre_x = float((index @ affine[0, :3] + affine[0, 3]).mean())
    return "right" if centre_x > midline_x_mm else "left"  # RAS: +x is the patient's right


def laterality_fidelity(run: str | Path, *, n_per_side: int = 4, steps: int = 25, guidance_scale: float = 3.0,
                        seed: int = 0, return_samples: bool = False, scheduler: str | None = None) -> dict:
    """Fractions of samples judged to carry the prompt's side. ``scheduler``: a diffusers scheduler class
    name (``"DDPMScheduler"``, ``"DPMSolverMultistepScheduler"``...) swapped in with ``from_config``; default
    the pipeline's own. ``return_samples``: also ``"samples"`` (HU volumes), ``"affine"`` and ``"groups"``
    (sample indices per prompt), e.g. for :func:`realism_and_diversity`."""
    from eval.segmentation import body_midline_mm
    from pipelines import ContourPipeline, ReportToCTPipeline, ZeroShotClassificationPipeline

    run = Path(run)
    generator_pipe = ReportToCTPipeline.from_pretrained(run / "report_to_ct")
    generator_pipe.set_progress_bar_config(disable=True)
    if scheduler is not None:
        import diffusers

        scheduler_class = getattr(diffusers, scheduler, None)
        if not (isinstance(scheduler_class, type) and issubclass(scheduler_class, diffusers.SchedulerMixin)):
            raise ValueError(f"{scheduler!r} is not a diffusers scheduler class")
        generator_pipe.scheduler = scheduler_class.from_config(generator_pipe.scheduler.config)
    classifier = ZeroShotClassificationPipeline.from_pretrained(run / "zero_shot")
    contour = ContourPipeline.from_pretrained(run / "contour")
    contour.set_progress_bar_config(disable=True)
    for pipe in (generator_pipe, classifier, contour):
        pipe.enable_channels_last()  # layout only: faster 3D convolutions on CPU
    judged = {judge: [] for judge in JUDGES}
    samples, groups = [], []
    for number, (side, prompt) in enumerate(PROMPTS.items()):
        generators = [torch.Generator().manual_seed(seed + 1000 * number + i) for i in range(n_per_side)]
        out = generator_pipe(prompt, num_images_per_prompt=n_per_side, generator=generators, num_inference_steps=steps,
                             guidance_scale=guidance_scale, return_masks=False)
        volumes = [np.asarray(out.ct[i]) for i in range(n_per_side)]
        groups.append(list(range(len(samples), len(samples) + n_per_side)))
        samples += volumes
        probabilities = classifier(ct=volumes, affine=out.affine, labels={"laterality": ["left", "right"]}).ct_probabilities
        for row in probabilities["laterality"]:
            judged[JUDGES[0]].append(["left", "right"][int(np.argmax(row))] == side)
        for volume in volumes:
            masks = contour(volume, affine=out.affine, draft_missing_reports=False).masks[0]
            judged[JUDGES[1]].append(centre_side(masks["GTVp"], out.affine, body_midline_mm(volume, out.affine)) == side)
    result = {judge: float(np.mean(values)) for judge, values in judged.items()} | {
        "n": 2 * n_per_side, "steps": steps, "scheduler": type(generator_pipe.scheduler).__name__}
    if return_samples:
        result |= {"samples": samples, "affine": out.affine, "groups": groups, "prompts": list(PROMPTS.values())}
    return result


# T and N stage contrasts, otherwise identical prompts: the paired contours should grow with the stage
STAGE_PROMPTS = {
    "T stage (GTVp volume, cT4 > cT1)": ("GTVp", "Left tonsil squamous cell carcinoma, cT1 N1 M0. Elective neck: ipsilateral (left) levels II-IV.",
                                         "Left tonsil squamous cell carcinoma, cT4 N1 M0. Elective neck: ipsilateral (left) levels II-IV."),
    "N stage (GTVn volume, cN2 > cN0)": ("GTVn", "Left tonsil squamous cell carcinoma, cT2 N0 M0. Elective neck: ipsilateral (left) levels II-III.",
                                         "Left tonsil squamous cell carcinoma, cT2 N2 M0. Elective neck: ipsilateral (left) levels II-IV."),
}


def stage_fidelity(run: str | Path, *, n: int = 4, steps: int = 25, guidance_scale: float = 3.0, seed: int = 0) -> dict:
    """For each contrast of :data:`STAGE_PROMPTS`: ``n`` samples of the lower and of the higher stage, the
    same seeds for both, and the fraction of seed pairs whose higher-stage sample has the larger structure
    (by the paired contours of the segmentation decoder), with the mean volumes in ml."""
    from pipelines import ReportToCTPipeline

    pipe = ReportToCTPipeline.from_pretrained(Path(run) / "report_to_ct")
    pipe.set_progress_bar_config(disable=True)
    if pipe.segmentation is None:
        raise ValueError("stage fidelity needs the pipeline's segmentation decoder (paired contours)")
    names = list(pipe.config.structure_names)
    results = {}
    for contrast, (structure, low, high) in STAGE_PROMPTS.items():
        volumes = []
        for prompt in (low, high):
            out = pipe(prompt, num_images_per_prompt=n, num_inference_steps=steps, guidance_scale=guidance_scale,
                       generator=[torch.Generator().manual_seed(seed + i) for i in range(n)])
            voxel_ml = abs(np.linalg.det(out.affine[:3, :3])) / 1000.0
            volumes.append(np.array([np.asarray(out.masks[i][names.index(structure)]).sum() * voxel_ml for i in range(n)]))
        results[contrast] = {"fraction": float(np.mean(volumes[1] > volumes[0])), "low_ml": float(volumes[0].mean()),
                             "high_ml": float(volumes[1].mean()), "n": n}
    return results


def tissue_statistics(real_hu: np.ndarray, generated_hu: np.ndarray) -> dict[str, dict[str, float]]:
    """Per tissue of :data:`TISSUES`: share of body voxels (real, generated) and the 1-D Wasserstein distance
    (HU) between the two sets' values in that tissue's range (scipy; MONAI has no histogram distance)."""
    from scipy.stats import wasserstein_distance

    real = np.asarray(real_hu, np.float64).ravel()
    generated = np.asarray(generated_hu, np.float64).ravel()
    real, generated = real[real > BODY_HU], generated[generated > BODY_HU]
    if not len(real) or not len(generated):
        raise ValueError(f"no voxels above {BODY_HU:g} HU in the {'real' if not len(real) else 'generated'} volumes")
    out = {}
    for name, (low, high) in TISSUES.items():
        a, b = real[(real >= low) & (real < high)], generated[(generated >= low) & (generated < high)]
        out[name] = {"share_real": len(a) / len(real), "share_generated": len(b) / len(generated),
                     "wasserstein_hu": float(wasserstein_distance(a, b)) if len(a) and len(b) else float("nan")}
    return out


def spread_pairs(pairs: Sequence[tuple[int, int]], max_pairs: int | None) -> list[tuple[int, int]]:
    """At most ``max_pairs`` of ``pairs``, evenly spaced through the list (deterministic; all when None)."""
    pairs = list(pairs)
    if max_pairs is None or len(pairs) <= max_pairs:
        return pairs
    if max_pairs < 1:
        raise ValueError(f"max_pairs must be >= 1, got {max_pairs}")
    return [pairs[int(i)] for i in np.unique(np.linspace(0, len(pairs) - 1, max_pairs).round().astype(int))]


def mean_pairwise_ms_ssim(volumes: torch.Tensor, data_range: float, pairs: Sequence[tuple[int, int]] | None = None,
                          max_pairs: int | None = None) -> float:
    """Mean MS-SSIM over ``pairs`` (default all i < j) of volumes (N, 1, X, Y, Z); ``max_pairs``: estimate
    the mean from that many pairs spread evenly through them (:func:`spread_pairs`)."""
    from monai.metrics import MultiScaleSSIMMetric

    if pairs is None:
        pairs = list(itertools.combinations(range(len(volumes)), 2))
    pairs = spread_pairs(pairs, max_pairs)
    if not pairs:
        raise ValueError("MS-SSIM diversity needs at least two volumes")
    # MONAI needs each side // 4 (three scales) above kernel_size - 1: the standard 11 voxels where it fits
    # (64^3 ROIs), the largest odd size that fits below that (7 for 32^3)
    fits = (min(volumes.shape[2:]) // (len(MS_SSIM_WEIGHTS) - 1) ** 2 - 1) // 2 * 2 + 1
    if fits < 3:
        raise ValueError(f"volumes {tuple(volumes.shape[2:])} are too small for {len(MS_SSIM_WEIGHTS)}-scale MS-SSIM")
    metric = MultiScaleSSIMMetric(spatial_dims=3, data_range=data_range, weights=MS_SSIM_WEIGHTS, kernel_size=min(11, fits))
    first = torch.stack([volumes[i] for i, _ in pairs]).float()
    second = torch.stack([volumes[j] for _, j in pairs]).float()
    return float(metric(first, second).mean())


def _frechet(first: np.ndarray, second: np.ndarray) -> float:
    from monai.metrics import FIDMetric

    return float(FIDMetric()(torch.from_numpy(first).double(), torch.from_numpy(second).double()))


def generate_from_test_reports(run: str | Path, data: str | Path, *, n: int = 8, samples_per_prompt: int = 4,
                                steps: int = 25, guidance_scale: float = 3.0, seed: int = 0) -> dict:
    """One CT per held-out test report (first ``n``), plus ``samples_per_prompt - 1`` more of the first:
    ``{"samples", "affine", "groups", "steps", "scheduler"}`` for :func:`realism_and_diversity`."""
    from medvlm.data.datalist import load_datalist
    from pipelines import ReportToCTPipeline

    test = load_datalist(data)["test"]
    if n < 2 or samples_per_prompt < 2 or len(test) < 2:
        raise ValueError(f"realism needs n >= 2, samples_per_prompt >= 2 and >= 2 test cases (got n={n}, "
                         f"samples_per_prompt={samples_per_prompt}, {len(test)} test cases)")
    n = min(n, len(test))
    pipe = ReportToCTPipeline.from_pretrained(Path(run) / "report_to_ct")
    pipe.set_progress_bar_config(disable=True)
    prompts = [item["report"] for item in test[:n]] + [test[0]["report"]] * (samples_per_prompt - 1)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    out = pipe(prompts, generator=generators, num_inference_steps=steps, guidance_scale=guidance_scale, return_masks=False)
    groups = [[0, *range(n, len(prompts))], *[[i] for i in range(1, n)]]
    return {"samples": [np.asarray(v) for v in out.ct], "affine": out.affine, "groups": groups, "steps": steps,
            "scheduler": type(pipe.scheduler).__name__}


@torch.no_grad()
def realism_and_diversity(run: str | Path, data: str | Path, samples: Sequence[np.ndarray], affine: np.ndarray,
                          groups: Sequence[Sequence[int]], max_pairs: int | None = 32, reconstructions: bool = True) -> dict:
    """Generated CTs (HU, with their affine; ``groups``: indices of samples from one prompt) against the
    held-out test CTs, all on the image tower's preprocessed grid: Frechet distance of contrastive
    embeddings with its real-vs-real floor (validation CTs, as many as samples), tissue statistics, MS-SSIM;
    with ``reconstructions``, the Frechet distance and tissue statistics of the VAE's reconstructions of those
    validation CTs (:func:`vae_reconstructions`), the ceiling of what generation through that VAE can reach.

    ``max_pairs``: MS-SSIM means over at most this many pairs per row (None: every pair). 3D MS-SSIM costs
    about a third of a second a pair on 2 CPU cores and 16 samples make 240 pairs in the three rows; of the
    demo's 16 real test (validation) CTs, 32 of the 120 pairs gave 0.778 (0.790) against 0.774 (0.780) from
    all of them, in 10 s instead of 36 s."""
    from medvlm.config import preprocess_from_dict
    from medvlm.data.datalist import load_datalist
    from medvlm.data.transforms import to_hu
    from pipelines import ZeroShotClassificationPipeline

    datalist = load_datalist(data)
    test, reference = datalist["test"], datalist.get("validation", [])
    within = [pair for group in groups for pair in itertools.combinations(group, 2)]
    across = [(i, j) for a, b in itertools.combinations(groups, 2) for i in a for j in b]
    if len(samples) < 2 or len(test) < 2 or not within or not across:
        raise ValueError("realism needs >= 2 test CTs and samples from >= 2 prompts, one of them sampled at least twice")
    embedder = ZeroShotClassificationPipeline.from_pretrained(Path(run) / "zero_shot")
    config = preprocess_from_dict(embedder.config.preprocess)
    generated = embedder.prepare_volumes(list(samples), affine=affine)
    real = embedder.prepare_volumes([item["image"] for item in test])
    embed = embedder.embed_volumes
    real_embeds = embed(real)
    real_hu = to_hu(real.numpy(), config)
    result = {"n_generated": len(samples), "n_real": len(test),
              "frechet_generated_vs_test": _frechet(embed(generated), real_embeds),
              "tissues": tissue_statistics(real_hu, to_hu(generated.numpy(), config))}
    if len(reference) >= 2:
        chosen = reference[:len(samples)]
        result["frechet_validation_vs_test"] = _frechet(embedder.embed_ct([i["image"] for i in chosen]), real_embeds)
        result["n_reference"] = len(chosen)
        if reconstructions:
            rebuilt = torch.cat([embedder.prepare_volumes([hu], affine=affine_) for hu, affine_ in vae_reconstructions(run, chosen)])
            result["frechet_reconstructed_vs_test"] = _frechet(embed(rebuilt), real_embeds)
            result["tissues_reconstructed"] = tissue_statistics(real_hu, to_hu(rebuilt.numpy(), config))
    data_range = float(config.output_range[1] - config.output_range[0])
    real_pairs = list(itertools.combinations(range(min(len(real), len(samples))), 2))
    rows = {"generated, same prompt": (generated, spread_pairs(within, max_pairs)),
            "generated, different prompts": (generated, spread_pairs(across, max_pairs)),
            "real, different patients": (real, spread_pairs(real_pairs, max_pairs))}
    result["ms_ssim"] = {name: mean_pairwise_ms_ssim(volumes, data_range, pairs) for name, (volumes, pairs) in rows.items()}
    result["ms_ssim_pairs"] = {name: len(pairs) for name, (_, pairs) in rows.items()}
    return result


@torch.no_grad()
def vae_reconstructions(run: str | Path, items: Sequence[dict]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(HU volume, affine) of each datalist item's CT passed through the report-to-CT pipeline's VAE (posterior
    mode): its own preprocessing, centre-cropped to the trained ROI, encoded, decoded, back in HU."""
    from monai.transforms import CenterSpatialCrop

    from medvlm.data.inputs import prepare_ct
    from medvlm.data.transforms import to_hu
    from pipelines import ReportToCTPipeline

    pipe = ReportToCTPipeline.from_pretrained(Path(run) / "report_to_ct")
    config, vae = pipe.preprocess_config, pipe.vae.eval()
    crop = CenterSpatialCrop(tuple(config.roi_size))
    low, high = config.output_range
    out = []
    for i, item in enumerate(items):
        image = crop(prepare_ct(item["image"], config, what=f"reconstructed ct[{i}]").image)
        decoded = vae(image.as_tensor()[None].to(vae.device, vae.dtype)).sample.clamp(low, high)
        out.append((to_hu(decoded[0, 0].float().cpu().numpy(), config), np.asarray(image.affine, dtype=np.float64)))
    return out


def _hu(value: float) -> str:
    """A Wasserstein distance for the tables; NaN (one set has no voxel in the tissue's range) as a dash."""
    return "- (no voxels)" if np.isnan(value) else f"{value:.1f}"


def realism_table(result: dict) -> str:
    """Markdown for :func:`realism_and_diversity`."""
    lines = [f"Frechet distance of contrastive CT embeddings to the {result['n_real']} held-out CTs: generated "
             f"({result['n_generated']}) **{result['frechet_generated_vs_test']:.3f}**"]
    if "frechet_validation_vs_test" in result:
        lines[0] += (f"; real validation CTs ({result['n_reference']}), the floor for this sample size, "
                     f"**{result['frechet_validation_vs_test']:.3f}**.")
    rebuilt = result.get("tissues_reconstructed")
    if "frechet_reconstructed_vs_test" in result:
        lines += ["", f"The same validation CTs through the VAE (encoded and decoded, no diffusion): Frechet distance "
                      f"**{result['frechet_reconstructed_vs_test']:.3f}**. Generation cannot be more realistic than its VAE."]
    header = "| tissue (HU range, body > -500 HU) | share of body, real | share of body, generated | Wasserstein distance (HU) |"
    rule = "|---|---|---|---|"
    if rebuilt:
        header += " share of body, VAE reconstructions | Wasserstein distance, reconstructions (HU) |"
        rule += "---|---|"
    lines += ["", header, rule]
    for name, (low, high) in TISSUES.items():
        row = result["tissues"][name]
        line = (f"| {name} ({low:g}..{high:g}) | {row['share_real']:.3f} | {row['share_generated']:.3f} | "
                f"{_hu(row['wasserstein_hu'])} |")
        if rebuilt:
            line += f" {rebuilt[name]['share_generated']:.3f} | {_hu(rebuilt[name]['wasserstein_hu'])} |"
        lines.append(line)
    counts = result.get("ms_ssim_pairs", {})
    lines += ["", "| MS-SSIM (mean over pairs; lower = more diverse) | | pairs |", "|---|---|---|"]
    lines += [f"| {name} | {value:.3f} | {counts.get(name, '')} |" for name, value in result["ms_ssim"].items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="training run folder with report_to_ct/ and zero_shot/")
    parser.add_argument("--n", type=int, default=4, help="volumes per side")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--data", default=None, help="dataset folder (datalist.json): adds realism and diversity on its test split")
    parser.add_argument("--realism-n", type=int, default=8, help="generated CTs for realism (one per test report)")
    parser.add_argument("--stages", action="store_true", help="also T- and N-stage fidelity (GTVp/GTVn volumes, --n pairs)")
    args = parser.parse_args(argv)
    result = laterality_fidelity(args.run, n_per_side=args.n, steps=args.steps, guidance_scale=args.guidance_scale)
    print(f"generated CTs ({result['n']}, {result['scheduler']} {result['steps']} steps) carrying the prompt's laterality:")
    for judge in JUDGES:
        print(f"  judged by the {judge}: {result[judge]:.2f}")
    if args.stages:
        for contrast, row in stage_fidelity(args.run, n=args.n, steps=args.steps, guidance_scale=args.guidance_scale).items():
            print(f"  {contrast}: {row['fraction']:.2f} of {row['n']} seed pairs "
                  f"(mean {row['low_ml']:.1f} ml -> {row['high_ml']:.1f} ml)")
    if args.data is not None:
        made = generate_from_test_reports(args.run, args.data, n=args.realism_n, steps=args.steps,
                                          guidance_scale=args.guidance_scale)
        print(f"realism and diversity: one CT per test report ({made['scheduler']}, {made['steps']} steps)")
        print(realism_table(realism_and_diversity(args.run, args.data, made["samples"], made["affine"], made["groups"])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
