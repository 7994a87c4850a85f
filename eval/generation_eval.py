"""Report-to-CT: is a generated CT faithful to its prompt, paired with its contours, realistic and diverse?

``medvlm eval generation --run RUN [--data DATA] [--n 16] [--stage-n 8] [--steps 25] [--scheduler NAME]``

Generated CTs are judged by a model that did not make them: the run's **image-only baseline** (a MONAI UNet
trained on real phantom CTs) contours each generated image. Every figure comes with its target
(:func:`generation_targets`):

1. **Autoencoder ceiling** (``--data``, validation split): the real CTs through the autoencoder alone (a paired
   autoencoder with their masks): mean absolute error inside the body, bone share, the GTVp's contrast to
   its surroundings, Frechet distance of the reconstructions against that of real CTs; and the judge's own
   organ-at-risk Dice on the real CTs and on their reconstructions, the bound of the pairing figure.
2. **Faithfulness**: left and right primaries (otherwise identical prompts), ``--n`` each: the side of the
   GTVp (or GTVn) by the baseline and by the paired masks. T stage: cT1 vs cT4 prompts from the same seeds,
   whose GTVp is larger; N stage: cN0 prompts without GTVn, cN2 prompts with one.
3. **Pairing**: paired masks against the baseline's contours of the same CTs (organ-at-risk Dice).
4. **Realism and diversity** (``--data``): the laterality samples against the held-out test CTs on the CT
   tower's grid: Frechet distance of contrastive embeddings (MONAI ``FIDMetric``) next to that of real
   validation CTs and of the autoencoder's reconstructions; per tissue the share of body voxels and the 1-D
   Wasserstein distance of HU values; mean pairwise MS-SSIM (MONAI ``MultiScaleSSIMMetric``) within a
   prompt, across prompts and between real patients.
"""
from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from medvlm.data.transforms import BODY_HU, body_midline
from medvlm.cli import claim_output
from medvlm.config import valid_prior_strength

# HU ranges of the tissues compared (inside the body, > BODY_HU); air and lung are left out because the
# ROI's amount of outside air depends on the crop, not on the generator
TISSUES = {"fat": (-150.0, -30.0), "soft tissue": (-30.0, 150.0), "bone": (300.0, 1500.0)}
# three MS-SSIM scales (the first three of MONAI's five default weights): five scales would need volumes
# larger than 160 voxels per side with the default 11-voxel kernel
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001)

# Judges of a generated CT's content, neither of which made it: the image-only baseline (a MONAI UNet trained
# on real phantom CTs, contouring the generated image) and, for the pairing, the pipeline's own paired masks
JUDGES = ("image-only baseline", "paired masks")
PROMPTS = {side: (f"{side.capitalize()} tonsil squamous cell carcinoma, cT2 N1 M0. "
                  f"Elective neck: ipsilateral ({side}) levels II-IV.") for side in ("left", "right")}
MIN_LESION_ML = 0.5  # a GTV smaller than this counts as absent (judging "no nodes" / "has nodes")


def centre_side(mask: np.ndarray, affine: np.ndarray, midline_x_mm: float) -> str:
    """"left" or "right": the side of the body midline holding the mask's centre; "none" for an empty mask."""
    index = np.argwhere(mask)
    if len(index) == 0:
        return "none"
    centre_x = float((index @ affine[0, :3] + affine[0, 3]).mean())
    return "right" if centre_x > midline_x_mm else "left"  # RAS: +x is the patient's right


def lesion_side(masks: np.ndarray, names: Sequence[str], affine: np.ndarray, midline_x_mm: float) -> str:
    """The side of the primary tumour (GTVp), or of the involved nodes (GTVn) when there is no GTVp."""
    for name in ("GTVp", "GTVn"):
        side = centre_side(np.asarray(masks[list(names).index(name)]), affine, midline_x_mm)
        if side != "none":
            return side
    return "none"


class BaselineJudge:
    """The run's image-only baseline (``RUN/baseline/final/baseline``) contouring CTs that are already on the
    model grid (generated volumes, in HU): MONAI sliding window, sigmoid, threshold 0.5."""

    def __init__(self, run: str | Path, preprocess):
        from medvlm.models.baseline import ImageOnlySegmenter

        folder = Path(run) / "baseline" / "final" / "baseline"
        if not folder.is_dir():
            raise ValueError(f"judging generated CTs needs the run's image-only baseline, not found at {folder}; "
                             "train it with `medvlm train baseline`")
        self.model = ImageOnlySegmenter.from_pretrained(folder).eval()
        self.preprocess = preprocess

    @torch.no_grad()
    def __call__(self, volume_hu: np.ndarray) -> np.ndarray:
        from monai.inferers import sliding_window_inference

        from medvlm.data.transforms import from_hu

        image = torch.from_numpy(from_hu(np.asarray(volume_hu, np.float32), self.preprocess))[None, None]
        probabilities = sliding_window_inference(image, roi_size=tuple(self.preprocess.roi_size), sw_batch_size=1,
                                                 predictor=lambda x: torch.sigmoid(self.model(x)), overlap=0.25,
                                                 mode="gaussian")
        return probabilities[0].numpy() >= 0.5


def _generator_pipe(run: Path, scheduler: str | None):
    from pipelines import ReportToCTPipeline

    pipe = ReportToCTPipeline.from_pretrained(run / "report_to_ct")
    pipe.set_progress_bar_config(disable=True)
    if scheduler is not None:
        import diffusers

        scheduler_class = getattr(diffusers, scheduler, None)
        if not (isinstance(scheduler_class, type) and issubclass(scheduler_class, diffusers.SchedulerMixin)):
            raise ValueError(f"{scheduler!r} is not a diffusers scheduler class")
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    if pipe.has_paired_masks is False and pipe.segmentation is None:
        raise ValueError(f"{run / 'report_to_ct'} gives no contours (no paired autoencoder, no segmentation decoder)")
    pipe.enable_channels_last()  # layout only: faster 3D convolutions on CPU
    pipe.enable_batch_slicing()  # a few volumes at a time: faster on CPU, the same samples to float rounding
    return pipe


def _oar_dice(first: np.ndarray, second: np.ndarray, names: Sequence[str]) -> float:
    """Mean Dice over the organs at risk between two (C, X, Y, Z) mask sets (MONAI ``compute_dice``)."""
    from monai.metrics import compute_dice

    from medvlm.vocabulary import OAR_NAMES

    channels = [list(names).index(n) for n in OAR_NAMES]
    a = torch.from_numpy(np.asarray(first)[channels].astype(np.float32))[None]
    b = torch.from_numpy(np.asarray(second)[channels].astype(np.float32))[None]
    return float(compute_dice(a, b, include_background=True, ignore_empty=False).nanmean())


def laterality_fidelity(run: str | Path, *, n_per_side: int = 16, steps: int = 25, guidance_scale: float = 3.0,
                        seed: int = 0, return_samples: bool = False, scheduler: str | None = None,
                        prior_strength: float | None = None) -> dict:
    """Fractions of generated CTs whose primary tumour (or nodes, without one) lies on the prompt's side, judged
    by the image-only baseline contouring the generated image and by the paired masks; ``pairing_oar_dice``:
    mean organ-at-risk Dice between the paired masks and the baseline's contours of the same CTs.
    ``scheduler``: a diffusers scheduler class name swapped in with ``from_config``; default the pipeline's own.
    ``prior_strength``: the pipeline's argument (default its config's; 1: no latent prior).
    ``return_samples``: also ``"samples"`` (HU volumes), ``"affine"`` and ``"groups"`` (sample indices per
    prompt), e.g. for :func:`realism_and_diversity`."""

    run = Path(run)
    pipe = _generator_pipe(run, scheduler)
    judge = BaselineJudge(run, pipe.preprocess_config)
    names = list(pipe.config.structure_names)
    judged = {name: [] for name in JUDGES}
    pairing, samples, groups = [], [], []
    for number, (side, prompt) in enumerate(PROMPTS.items()):
        generators = [torch.Generator().manual_seed(seed + 1000 * number + i) for i in range(n_per_side)]
        out = pipe(prompt, num_images_per_prompt=n_per_side, generator=generators, num_inference_steps=steps,
                   guidance_scale=guidance_scale, return_masks=True, prior_strength=prior_strength)
        groups.append(list(range(len(samples), len(samples) + n_per_side)))
        for i in range(n_per_side):
            volume, paired = np.asarray(out.ct[i]), np.asarray(out.masks[i])
            samples.append(volume)
            midline = body_midline(volume, out.affine)
            contours = judge(volume)
            judged[JUDGES[0]].append(lesion_side(contours, names, out.affine, midline) == side)
            judged[JUDGES[1]].append(lesion_side(paired, names, out.affine, midline) == side)
            pairing.append(_oar_dice(paired, contours, names))
    result = {name: float(np.mean(values)) for name, values in judged.items()} | {
        "pairing_oar_dice": float(np.mean(pairing)), "n": 2 * n_per_side, "steps": steps,
        "scheduler": type(pipe.scheduler).__name__,
        "prior_strength": float(pipe.config.prior_strength if prior_strength is None else prior_strength)}
    if return_samples:
        result |= {"samples": samples, "affine": out.affine, "groups": groups, "prompts": list(PROMPTS.values())}
    return result


# T and N stage contrasts, otherwise identical prompts
T_PROMPTS = ("Left tonsil squamous cell carcinoma, cT1 N1 M0. Elective neck: ipsilateral (left) levels II-IV.",
             "Left tonsil squamous cell carcinoma, cT4 N1 M0. Elective neck: ipsilateral (left) levels II-IV.")
N_PROMPTS = ("Left tonsil squamous cell carcinoma, cT2 N0 M0. Elective neck: ipsilateral (left) levels II-III.",
             "Left tonsil squamous cell carcinoma, cT2 N2 M0. Elective neck: ipsilateral (left) levels II-IV.")


def stage_fidelity(run: str | Path, *, n: int = 8, steps: int = 25, guidance_scale: float = 3.0, seed: int = 0,
                   scheduler: str | None = None, prior_strength: float | None = None) -> dict:
    """T stage: ``n`` seed pairs of a cT1 and a cT4 prompt (same seeds), the fraction whose cT4 sample has the
    larger GTVp. N stage: ``n`` samples each of a cN0 and a cN2 prompt, the fractions without (N0) and with (N2)
    a GTVn of at least :data:`MIN_LESION_ML`. Each judged by the baseline and by the paired masks."""
    run = Path(run)
    pipe = _generator_pipe(run, scheduler)
    judge = BaselineJudge(run, pipe.preprocess_config)
    names = list(pipe.config.structure_names)

    def volumes_ml(prompt: str, structure: str) -> dict[str, np.ndarray]:
        out = pipe(prompt, num_images_per_prompt=n, num_inference_steps=steps, guidance_scale=guidance_scale,
                   generator=[torch.Generator().manual_seed(seed + i) for i in range(n)], return_masks=True,
                   prior_strength=prior_strength)
        voxel_ml = abs(np.linalg.det(out.affine[:3, :3])) / 1000.0
        c = names.index(structure)
        return {JUDGES[0]: np.array([judge(np.asarray(v))[c].sum() * voxel_ml for v in out.ct]),
                JUDGES[1]: np.array([np.asarray(m[c]).sum() * voxel_ml for m in out.masks])}

    t_low, t_high = (volumes_ml(prompt, "GTVp") for prompt in T_PROMPTS)
    n_low, n_high = (volumes_ml(prompt, "GTVn") for prompt in N_PROMPTS)
    result = {"n": n, "steps": steps}
    for name in JUDGES:
        result[name] = {"T4 GTVp larger than T1": float(np.mean(t_high[name] > t_low[name])),
                        "T1 GTVp ml": float(t_low[name].mean()), "T4 GTVp ml": float(t_high[name].mean()),
                        "N0 without GTVn": float(np.mean(n_low[name] < MIN_LESION_ML)),
                        "N2 with GTVn": float(np.mean(n_high[name] >= MIN_LESION_ML))}
    return result


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
    pipe.enable_channels_last()
    pipe.enable_batch_slicing()
    prompts = [item["report"] for item in test[:n]] + [test[0]["report"]] * (samples_per_prompt - 1)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    out = pipe(prompts, generator=generators, num_inference_steps=steps, guidance_scale=guidance_scale, return_masks=False)
    groups = [[0, *range(n, len(prompts))], *[[i] for i in range(1, n)]]
    return {"samples": [np.asarray(v) for v in out.ct], "affine": out.affine, "groups": groups, "steps": steps,
            "scheduler": type(pipe.scheduler).__name__}


@torch.no_grad()
def realism_and_diversity(run: str | Path, data: str | Path, samples: Sequence[np.ndarray], affine: np.ndarray,
                          groups: Sequence[Sequence[int]], max_pairs: int | None = 32,
                          reconstructions: bool | Sequence[tuple] = True) -> dict:
    """Generated CTs (HU, with their affine; ``groups``: indices of samples from one prompt) against the
    held-out test CTs, all on the image tower's preprocessed grid: Frechet distance of contrastive
    embeddings with its real-vs-real floor (validation CTs, as many as samples), tissue statistics, MS-SSIM;
    with ``reconstructions``, the Frechet distance and tissue statistics of the VAE's reconstructions of those
    validation CTs (:func:`vae_reconstructions`), the ceiling of what generation through that VAE can reach;
    ``reconstructions`` may also be those already made, (HU, affine) or (input HU, HU, label, affine) per
    validation CT in datalist order.

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
        if reconstructions is not False:
            made = vae_reconstructions(run, chosen) if reconstructions is True else \
                [(item[1], item[3]) if len(item) == 4 else tuple(item) for item in list(reconstructions)[:len(chosen)]]
            if len(made) != len(chosen):
                raise ValueError(f"{len(made)} reconstructions given for {len(chosen)} validation CTs")
            rebuilt = torch.cat([embedder.prepare_volumes([hu], affine=affine_) for hu, affine_ in made])
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


def _prepared_items(config, items: Sequence[dict]):
    """Each datalist item's CT (and label, when it has one) through the preprocessing chain, centre-cropped to
    the ROI: (image (1, X, Y, Z) MetaTensor, label (C, X, Y, Z) or None)."""
    from monai.transforms import CenterSpatialCropd

    from medvlm.data.transforms import preprocessing_transforms

    crop = CenterSpatialCropd(keys=["image", "label"], roi_size=tuple(config.roi_size), allow_missing_keys=True)
    for item in items:
        keys = {k: item[k] for k in ("image", "label") if k in item}
        data = crop(preprocessing_transforms(config, label_keys=("label",) if "label" in keys else ())(keys))
        label = data.get("label")
        yield data["image"], ((label.as_tensor() > 0.5).float() if label is not None else None)


@torch.no_grad()
def vae_reconstructions(run: str | Path, items: Sequence[dict], *, with_inputs: bool = False) -> list[tuple]:
    """(HU volume, affine) of each datalist item's CT passed through the report-to-CT pipeline's autoencoder
    (posterior mean; a paired autoencoder with the item's masks): its own preprocessing, centre-cropped to the
    trained ROI, encoded, decoded, back in HU. ``with_inputs``: (input HU, reconstruction HU, label, affine)."""
    from pipelines import ReportToCTPipeline

    pipe = ReportToCTPipeline.from_pretrained(Path(run) / "report_to_ct")
    return reconstruct_items(pipe.vae, pipe.preprocess_config, items, with_inputs=with_inputs)


@torch.no_grad()
def reconstruct_items(vae, config, items: Sequence[dict], *, with_inputs: bool = False) -> list[tuple]:
    """:func:`vae_reconstructions` for an autoencoder ``vae`` and the preprocessing ``config`` it was trained on."""
    from medvlm.data.transforms import to_hu

    vae = vae.eval()
    if vae.config.mask_channels and any("label" not in item for item in items):
        raise ValueError("a paired autoencoder reconstructs CTs with their masks: every item needs a label")
    low, high = config.output_range
    out = []
    for image, label in _prepared_items(config, items):
        masks = label[None].to(vae.device, vae.dtype) if vae.config.mask_channels else None
        decoded = vae(image.as_tensor()[None].to(vae.device, vae.dtype), masks).sample.clamp(low, high)
        rebuilt = to_hu(decoded[0, 0].float().cpu().numpy(), config)
        affine = np.asarray(image.affine, dtype=np.float64)
        out.append((to_hu(image[0].numpy(), config), rebuilt, label, affine) if with_inputs else (rebuilt, affine))
    return out


def lesion_contrast_hu(volume_hu: np.ndarray, lesion: np.ndarray, reference_hu: np.ndarray | None = None,
                       shell_voxels: int = 2) -> float | None:
    """Mean HU inside ``lesion`` minus the mean over its surroundings: a shell of ``shell_voxels`` around it, kept
    to the voxels that are soft tissue (-30..150 HU) in ``reference_hu`` (the input CT; default ``volume_hu``), so
    the airway or bone next to a tumour does not count as its background. None for an empty lesion or shell."""
    from scipy.ndimage import binary_dilation

    lesion = np.asarray(lesion, bool)
    if not lesion.any():
        return None
    reference = volume_hu if reference_hu is None else reference_hu
    low, high = TISSUES["soft tissue"]
    shell = binary_dilation(lesion, iterations=shell_voxels) & ~lesion & (reference >= low) & (reference < high)
    return float(volume_hu[lesion].mean() - volume_hu[shell].mean()) if shell.any() else None


def autoencoder_ceiling(run: str | Path | None, items: Sequence[dict], *, vae=None, config=None,
                        reconstructions: Sequence[tuple] | None = None) -> dict:
    """The autoencoder (the run's, or ``vae`` with its preprocessing ``config``) alone on real CTs (``items``, e.g.
    the validation split): mean absolute error inside the body (HU), bone share (> 300 HU) of the reconstructions
    against the inputs', and the GTVp's contrast to its surroundings (inputs vs reconstructions, mean and median
    over cases with a GTVp, and the share of those cases whose reconstruction keeps the contrast's sign; the same
    surroundings for both).

    With the run's image-only baseline (``run`` given and it has one): ``judge_oar_dice_input`` /
    ``judge_oar_dice_reconstruction``, the baseline's mean organ-at-risk Dice against the items' contours on the
    CTs and on their reconstructions. The second bounds the pairing figure: a generated CT is judged by that
    baseline, and it can look no more real than a reconstruction.

    ``reconstructions``: those of ``items`` already made (:func:`vae_reconstructions` with ``with_inputs``)."""
    from medvlm.vocabulary import STRUCTURE_NAMES

    errors, bone_in, bone_out, contrast_in, contrast_out = [], 0, 0, [], []
    judged_in, judged_out = [], []
    body_voxels = 0
    if (vae is None and reconstructions is None) or config is None:
        if run is None:
            raise ValueError("autoencoder_ceiling needs a run folder or an autoencoder (`vae` with its `config`)")
        from pipelines import ReportToCTPipeline

        pipe = ReportToCTPipeline.from_pretrained(Path(run) / "report_to_ct")
        vae, config = (pipe.vae if vae is None else vae), pipe.preprocess_config
    judge = BaselineJudge(run, config) if run is not None and (Path(run) / "baseline" / "final" / "baseline").is_dir() \
        else None
    made = list(reconstructions) if reconstructions is not None else reconstruct_items(vae, config, items, with_inputs=True)
    if len(made) != len(items) or any(len(m) != 4 for m in made):
        raise ValueError(f"reconstructions: expected (input HU, HU, label, affine) for each of the {len(items)} items")
    for hu_in, hu_out, label, _ in made:
        if judge is not None and label is not None:
            truth = label.numpy() > 0.5
            judged_in.append(_oar_dice(judge(hu_in), truth, STRUCTURE_NAMES))
            judged_out.append(_oar_dice(judge(hu_out), truth, STRUCTURE_NAMES))
        body = hu_in > BODY_HU
        errors.append(float(np.abs(hu_out - hu_in)[body].mean()))
        body_voxels += int(body.sum())
        bone_in += int((hu_in[body] > TISSUES["bone"][0]).sum())
        bone_out += int((hu_out[body] > TISSUES["bone"][0]).sum())
        if label is not None:
            gtvp = label[STRUCTURE_NAMES.index("GTVp")].numpy() > 0.5
            a, b = lesion_contrast_hu(hu_in, gtvp), lesion_contrast_hu(hu_out, gtvp, reference_hu=hu_in)
            if a is not None and b is not None:
                contrast_in.append(a)
                contrast_out.append(b)
    return {"n": len(errors), "mae_body_hu": float(np.mean(errors)), "bone_share_input": bone_in / max(body_voxels, 1),
            "bone_share_reconstruction": bone_out / max(body_voxels, 1),
            "gtvp_contrast_input_hu": float(np.mean(contrast_in)) if contrast_in else float("nan"),
            "gtvp_contrast_reconstruction_hu": float(np.mean(contrast_out)) if contrast_out else float("nan"),
            # per case: a few small tumours drawn as the airway beside them dominate the mean
            "gtvp_contrast_input_median_hu": float(np.median(contrast_in)) if contrast_in else float("nan"),
            "gtvp_contrast_reconstruction_median_hu": float(np.median(contrast_out)) if contrast_out else float("nan"),
            "gtvp_contrast_sign_kept": float(np.mean([np.sign(a) == np.sign(b) for a, b in zip(contrast_in, contrast_out)]))
            if contrast_in else float("nan"),
            "n_gtvp": len(contrast_in)} | ({"judge_oar_dice_input": float(np.mean(judged_in)),
                                           "judge_oar_dice_reconstruction": float(np.mean(judged_out))}
                                          if judged_in else {})


def _target(measure: str, value: float, target: str, met: bool) -> dict:
    return {"measure": measure, "value": float(value), "target": target, "met": bool(met)}


def generation_targets(ceiling: dict | None, fidelity: dict | None, stages: dict | None, realism: dict | None) -> list[dict]:
    """Each generation figure with its target and whether it is met (issue 24's targets 1-4; any part None
    is left out): ``{"measure", "value", "target", "met"}``."""
    rows = []
    if ceiling:
        ratio = ceiling["bone_share_reconstruction"] / max(ceiling["bone_share_input"], 1e-9)
        kept = ceiling["gtvp_contrast_reconstruction_hu"] / ceiling["gtvp_contrast_input_hu"] \
            if ceiling["gtvp_contrast_input_hu"] else float("nan")
        rows += [_target("autoencoder: mean absolute error in the body (HU)", ceiling["mae_body_hu"], "<= 40",
                         ceiling["mae_body_hu"] <= 40),
                 _target("autoencoder: bone share / input's", ratio, "0.80..1.20", 0.8 <= ratio <= 1.2),
                 _target(f"autoencoder: GTVp contrast kept ({ceiling['gtvp_contrast_reconstruction_hu']:+.0f} of "
                         f"{ceiling['gtvp_contrast_input_hu']:+.0f} HU)", kept, ">= 0.50", kept >= 0.5)]
    if realism and "frechet_reconstructed_vs_test" in realism:
        ratio = realism["frechet_reconstructed_vs_test"] / max(realism["frechet_validation_vs_test"], 1e-9)
        rows.append(_target("autoencoder: Frechet distance / real validation CTs'", ratio, "<= 2.0", ratio <= 2.0))
    if fidelity:
        for judge in JUDGES:
            value = fidelity[judge]
            rows.append(_target(f"laterality of generated CTs, by the {judge} ({fidelity['n']} samples)", value,
                                ">= 0.85", value >= 0.85))
    if stages:
        for judge in JUDGES:
            row = stages[judge]
            rows += [_target(f"cT4 GTVp larger than cT1, same seed, by the {judge} ({stages['n']} pairs)",
                             row["T4 GTVp larger than T1"], ">= 0.80", row["T4 GTVp larger than T1"] >= 0.8),
                     _target(f"cN0 prompts without GTVn, by the {judge}", row["N0 without GTVn"], ">= 0.80",
                             row["N0 without GTVn"] >= 0.8),
                     _target(f"cN2 prompts with GTVn, by the {judge}", row["N2 with GTVn"], ">= 0.80",
                             row["N2 with GTVn"] >= 0.8)]
    if fidelity:
        bound = ""
        if ceiling and "judge_oar_dice_reconstruction" in ceiling:  # what the judge itself finds: the bound
            bound = (f" (the baseline against the contours of real CTs: {ceiling['judge_oar_dice_input']:.2f}, of "
                     f"their reconstructions: {ceiling['judge_oar_dice_reconstruction']:.2f})")
        rows.append(_target(f"pairing: paired masks vs baseline contours, OAR Dice{bound}", fidelity["pairing_oar_dice"],
                            ">= 0.80", fidelity["pairing_oar_dice"] >= 0.8))
    if realism:
        if "frechet_reconstructed_vs_test" in realism:
            ratio = realism["frechet_generated_vs_test"] / max(realism["frechet_reconstructed_vs_test"], 1e-9)
            rows.append(_target("generated: Frechet distance / autoencoder reconstructions'", ratio, "<= 1.5", ratio <= 1.5))
        bone = realism["tissues"]["bone"]
        ratio = bone["share_generated"] / max(bone["share_real"], 1e-9)
        rows.append(_target("generated: bone share / real", ratio, "0.75..1.25", 0.75 <= ratio <= 1.25))
        gap = realism["ms_ssim"]["generated, same prompt"] - realism["ms_ssim"]["real, different patients"]
        rows.append(_target("generated: MS-SSIM within a prompt minus between real patients", gap, "<= 0.05", gap <= 0.05))
    return rows


def targets_table(rows: Sequence[dict]) -> str:
    """Markdown for :func:`generation_targets` (or any rows of the same form)."""
    lines = ["| measure | measured | target | |", "|---|---|---|---|"]
    lines += [f"| {r['measure']} | {r['value']:.3f} | {r['target']} | {'met' if r['met'] else 'not met'} |" for r in rows]
    return "\n".join(lines)


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


def evaluate(run: str | Path, data: str | Path | None = None, *, n_per_side: int = 16, stage_n: int = 8,
             steps: int = 25, guidance_scale: float = 3.0, scheduler: str | None = None, seed: int = 0,
             prior_strength: float | None = None) -> dict:
    """Everything above in one call: laterality and pairing (``2 * n_per_side`` samples), T/N stage
    (``stage_n`` per prompt), and with ``data`` the autoencoder ceiling on its validation split and realism and
    diversity of the laterality samples against its test split; ``"targets"``: :func:`generation_targets`."""
    from medvlm.data.datalist import load_datalist

    fidelity = laterality_fidelity(run, n_per_side=n_per_side, steps=steps, guidance_scale=guidance_scale, seed=seed,
                                   scheduler=scheduler, return_samples=data is not None, prior_strength=prior_strength)
    stages = stage_fidelity(run, n=stage_n, steps=steps, guidance_scale=guidance_scale, seed=seed, scheduler=scheduler,
                            prior_strength=prior_strength) if stage_n else None
    ceiling = realism = None
    prompts = fidelity.pop("prompts", None)
    if data is not None:
        validation = load_datalist(data).get("validation", [])
        # the validation CTs through the autoencoder once: the ceiling's and the realism's reference
        ceiling = made = None
        if validation:
            from pipelines import ReportToCTPipeline

            pipe = ReportToCTPipeline.from_pretrained(Path(run) / "report_to_ct")
            made = reconstruct_items(pipe.vae, pipe.preprocess_config, validation, with_inputs=True)
            ceiling = autoencoder_ceiling(run, validation, vae=pipe.vae, config=pipe.preprocess_config,
                                          reconstructions=made)
        realism = realism_and_diversity(run, data, fidelity.pop("samples"), fidelity.pop("affine"), fidelity.pop("groups"),
                                        reconstructions=made if made is not None else True)
    return {"fidelity": fidelity, "stages": stages, "ceiling": ceiling, "realism": realism, "prompts": prompts,
            "targets": generation_targets(ceiling, fidelity, stages, realism)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="training run folder (report_to_ct/, zero_shot/, baseline/)")
    parser.add_argument("--data", default=None, help="dataset folder (datalist.json): adds the autoencoder ceiling "
                                                     "(validation split) and realism and diversity (test split)")
    parser.add_argument("--n", type=int, default=16, help="volumes per side for laterality and pairing")
    parser.add_argument("--stage-n", type=int, default=8, help="samples per T/N stage prompt (0: skip)")
    parser.add_argument("--steps", type=int, default=25, help="sampling steps")
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--scheduler", default=None, help="a diffusers scheduler class name (default: the pipeline's)")
    parser.add_argument("--prior-strength", type=float, default=None,
                        help="share of the steps in which the anatomy is free of the UNet's latent prior "
                             "(default: the pipeline's; 1: no prior)")
    parser.add_argument("--out", default=None, help="also write generation.json and generation.md into this folder")
    parser.add_argument("--overwrite", action="store_true", help="write into an --out that holds other files")
    args = parser.parse_args(argv)
    if args.n < 1 or args.stage_n < 0 or args.steps < 1:
        parser.error("--n and --steps must be >= 1, --stage-n >= 0")
    if args.prior_strength is not None and not valid_prior_strength(args.prior_strength):
        parser.error(f"--prior-strength must be in (0, 1], got {args.prior_strength:g}")
    if args.out:
        claim_output(args, "eval generation")
    result = evaluate(args.run, args.data, n_per_side=args.n, stage_n=args.stage_n, steps=args.steps,
                      guidance_scale=args.guidance_scale, scheduler=args.scheduler, prior_strength=args.prior_strength)
    fidelity = result["fidelity"]
    text = [f"Generated CTs: {fidelity['scheduler']}, {fidelity['steps']} steps, guidance {args.guidance_scale:g}, "
            f"latent prior strength {fidelity['prior_strength']:g} (1: none).", "",
            targets_table(result["targets"])]
    if result["realism"] is not None:
        text += ["", realism_table(result["realism"])]
    print("\n".join(text))
    if args.out:
        import json

        from medvlm.data.io import atomic_write_text

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "generation.md", "\n".join(text) + "\n")
        atomic_write_text(out / "generation.json", json.dumps(result, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
