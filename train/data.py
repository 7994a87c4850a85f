"""Training data: preprocessed cases from a datalist, deterministic batches, seeded augmentation.

Batches and augmentations are functions of (seed, step) and (seed, epoch, case) only, so a resumed run
sees exactly the batches an uninterrupted one would, and two processes split each global batch.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from monai.transforms import (BorderPadd, Compose, RandAffined, RandGaussianNoised, RandGaussianSmoothd,
                              RandScaleIntensityd, RandSimulateLowResolutiond, RandSpatialCropd)

from medvlm.config import MedVLMConfig
from medvlm.data.datalist import load_datalist
from medvlm.data.laterality import (mirrored_channels, mirrored_label_index, other_side, side_of_labels,
                                    swap_side_words)
from medvlm.data.transforms import preprocessing_transforms
from medvlm.vocabulary import STRUCTURE_NAMES
from medvlm.errors import DatalistError
from medvlm.models.windows import coordinate_channels, midline_distance
from medvlm.text.prompts import process_record, process_report
from medvlm.text.parse import LABEL_NAMES

logger = logging.getLogger(__name__)


@dataclass
class Case:
    image: torch.Tensor  # (1, X, Y, Z) in the preprocessed range
    label: torch.Tensor | None  # (C, X, Y, Z) float {0, 1}
    prompt: str  # structured prompt of the de-identified report
    report: str  # de-identified report
    labels: np.ndarray  # label vector for semantic matching
    case_id: str
    synthetic: bool = False  # made by ``medvlm augment`` (the datalist item has a ``synthetic`` entry)


def fraction_of(items: list, fraction: float, seed: int = 0) -> list:
    """The fixed, seeded subset of ``items`` that ``train_fraction`` selects (in datalist order)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"train_fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return list(items)
    keep = max(1, int(round(len(items) * fraction)))
    order = np.random.default_rng([seed, 104729]).permutation(len(items))[:keep]
    return [items[i] for i in sorted(order)]


_SHARED_CASES: dict | None = None  # while shared_cases() is active: preprocessed cases by (data, settings)


@contextlib.contextmanager
def shared_cases():
    """Within the block, :func:`load_cases` preprocesses each (datalist, section, settings) once and hands
    every later caller the same cases (``train all``: six stages read the same 84 training cases; on the demo
    the preprocessing took about 3 s a stage). Callers treat the cases as read-only, as they always have.
    Written here: MONAI's ``CacheDataset`` caches inside one dataset object, not across the stages' loaders.
    """
    global _SHARED_CASES
    outer, _SHARED_CASES = _SHARED_CASES, ({} if _SHARED_CASES is None else _SHARED_CASES)
    try:
        yield
    finally:
        _SHARED_CASES = outer


def load_cases(data_dir: str | Path, config: MedVLMConfig, section: str = "training", *,
               train_fraction: float = 1.0, seed: int = 0, synthetic: bool = True) -> list[Case]:
    """Preprocess every case of a datalist section (reports de-identified on the way in). ``synthetic=False``
    leaves out the cases ``medvlm augment`` generated (items with a ``synthetic`` entry): the generative,
    contrastive and report-drafting stages learn from real CTs only, not from their own samples."""
    data_dir = Path(data_dir)
    if not (data_dir / "datalist.json").is_file() and not data_dir.is_file():
        raise DatalistError(f"{data_dir} has no datalist.json; write one (medvlm data phantom --out {data_dir}) or pass its path")
    if _SHARED_CASES is None:
        return _load_cases(data_dir, config, section, train_fraction, seed, synthetic)
    listing = data_dir / "datalist.json" if data_dir.is_dir() else data_dir
    stat = listing.stat()
    key = (str(listing.resolve()), stat.st_mtime_ns, stat.st_size, repr(config.data.preprocess), section, train_fraction, seed,
           synthetic)
    if key not in _SHARED_CASES:
        _SHARED_CASES[key] = _load_cases(data_dir, config, section, train_fraction, seed, synthetic)
    return list(_SHARED_CASES[key])


def _load_cases(data_dir: Path, config: MedVLMConfig, section: str, train_fraction: float, seed: int,
                synthetic: bool = True) -> list[Case]:
    items = load_datalist(data_dir)[section]
    items = fraction_of(items if synthetic else [i for i in items if "synthetic" not in i], train_fraction, seed)
    chain = preprocessing_transforms(config.data.preprocess, label_keys=("label",))
    cases = []
    for item in items:
        data = chain({k: item[k] for k in ("image", "label") if k in item})
        report = item.get("report") or ""
        if report.strip():
            processed = process_report(report, deidentifier=None)  # de-identified on loading
        elif item.get("record"):  # no report: the case's clinical record read as one
            processed = process_record(item["record"])
            report = processed.text
        else:
            processed = None
        label = data.get("label")
        cases.append(Case(
            image=data["image"].as_tensor().float(),
            label=(label.as_tensor() > 0.5).float() if label is not None else None,
            prompt=processed.prompt if processed else "", report=report,
            # no report: every field unknown (all-zero groups), the same length as a parsed report's vector so
            # that cases with and without a report share a batch
            labels=processed.fields if processed else np.zeros(len(LABEL_NAMES), np.float32),
            case_id=item.get("id", Path(item["image"]).name), synthetic="synthetic" in item,
        ))
    if not cases:
        raise DatalistError(f"{data_dir}: section {section!r} has no cases" + ("" if synthetic else " that are not synthetic"))
    return cases


def augmentation(config: MedVLMConfig, *, with_label: bool, patch_size: Sequence[int] = (),
                 with_side: bool = False, with_coordinates: bool = False) -> Compose:
    """MONAI random transforms; no left-right flips (laterality is part of the report).

    ``with_side``: the samples also carry ``side`` (the whole volume's midline distance), cropped and moved
    with the image so that a patch keeps the distances of the volume it came from; ``with_coordinates``
    likewise ``coordinates``, the whole volume's voxel coordinates.
    """
    extra = (["side"] if with_side else []) + (["coordinates"] if with_coordinates else [])
    keys = ["image"] + extra + (["label"] if with_label else [])
    modes = ["bilinear"] * (1 + len(extra)) + (["nearest"] if with_label else [])
    transforms = []
    if patch_size:
        transforms.append(RandSpatialCropd(keys=keys, roi_size=tuple(patch_size), random_size=False))
    if config.training.augment:
        transforms += [
            RandAffined(keys=keys, prob=0.5, rotate_range=(0.0, 0.0, 0.08), scale_range=(0.05, 0.05, 0.05),
                        mode=modes, padding_mode="border"),
            RandScaleIntensityd(keys="image", factors=0.05, prob=0.3),
            RandGaussianNoised(keys="image", prob=0.3, std=0.02),
        ]
    return Compose(transforms)


class ImageQuality:
    """Image-quality augmentation of a batch of training CTs (``training.segmentation.blur_prob``, ``blur_sigma``,
    ``low_resolution_prob``): MONAI's ``RandGaussianSmoothd`` and ``RandSimulateLowResolutiond`` on the image
    alone, after cropping, so it also reaches the image of a cached-features batch. Each sample's draw is a
    function of (seed, step, case), like every other augmentation here.

    MONAI's Gaussian filter pads with zeros, which would brighten every patch's border (a band of air or tissue
    drawn towards the middle of the HU window); the image is padded by replication first (``BorderPadd``) and
    cropped back, so only the blur itself changes it."""

    def __init__(self, stage_config):
        low, high = stage_config.blur_sigma
        self.margin = int(math.ceil(3.0 * high))
        self.transform = Compose([
            BorderPadd(keys="image", spatial_border=self.margin, mode="replicate"),
            RandGaussianSmoothd(keys="image", sigma_x=(low, high), sigma_y=(low, high), sigma_z=(low, high),
                                prob=stage_config.blur_prob),
            RandSimulateLowResolutiond(keys="image", prob=stage_config.low_resolution_prob, zoom_range=(0.5, 1.0)),
        ])
        self.active = bool(stage_config.blur_prob or stage_config.low_resolution_prob)

    def __call__(self, images: torch.Tensor, seed: int, step: int, cases: Sequence[int]) -> torch.Tensor:
        """``images`` (B, C, X, Y, Z), one row per training case index in ``cases``; returned as a new tensor."""
        if not self.active:
            return images
        out = []
        for image, case in zip(images, cases):
            # the trailing 7 keeps this stream apart from the other draws seeded by (seed, step, case)
            self.transform.set_random_state(seed=int(np.random.default_rng([seed, step, case, 7]).integers(2**31)))
            result = self.transform({"image": image})["image"]
            result = result.as_tensor() if hasattr(result, "as_tensor") else torch.as_tensor(result)
            inside = (slice(None), *(slice(self.margin, self.margin + n) for n in image.shape[1:]))
            out.append(result[inside].to(images.dtype))
        return torch.stack(out)


class DeterministicBatches:
    """Global batch ``step`` -> case indices: reshuffled each epoch from (seed, epoch); with several
    processes each takes its contiguous share of the global batch.

    Written here rather than a MONAI ``DataLoader`` prepared by accelerate with ``skip_first_batches``: the batch
    (and, through :func:`collate`, its augmentation) of a step is a pure function of (seed, step), so a resumed
    run continues bit-identically at any step without replaying the loader's sampler and random transforms, and
    a run on 1 or N processes draws the same global batches."""

    def __init__(self, num_cases: int, batch_size: int, seed: int, *, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must be divisible by the number of processes {world_size}")
        self.num_cases, self.batch_size, self.seed = num_cases, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = max(1, num_cases // batch_size)

    def order(self, epoch: int) -> np.ndarray:
        """The case indices of one epoch, in the order they are drawn."""
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_cases)

    def indices(self, step: int) -> list[int]:
        epoch, offset = divmod(step, self.batches_per_epoch)
        order = self.order(epoch)
        if len(order) < self.batch_size:  # tiny datasets: repeat cases to fill the batch
            order = np.resize(order, self.batch_size)
        global_batch = order[offset * self.batch_size:(offset + 1) * self.batch_size]
        share = self.batch_size // self.world_size
        return [int(i) for i in global_batch[self.rank * share:(self.rank + 1) * share]]

    def epoch(self, step: int) -> int:
        return step // self.batches_per_epoch


class MixedBatches(DeterministicBatches):
    """:class:`DeterministicBatches` over real and synthetic cases with a fixed ``share`` of synthetic draws:
    each epoch draws every real case once and ``round(real * share / (1 - share))`` synthetic ones, which
    go through the synthetic cases in a fresh seeded order each round, so that all of them are drawn equally
    often however many there are. ``synthetic``: one flag per case. A data set without real or without
    synthetic cases is drawn as :class:`DeterministicBatches` draws it.

    Written here because the draws must stay a pure function of (seed, step), as in the parent class; torch's
    ``WeightedRandomSampler`` draws with replacement from a stateful generator."""

    def __init__(self, synthetic: Sequence[bool], share: float, batch_size: int, seed: int, *, rank: int = 0,
                 world_size: int = 1):
        if not 0.0 <= share < 1.0:
            raise ValueError(f"the synthetic share must be in [0, 1), got {share}")
        flags = np.asarray(synthetic, dtype=bool)
        super().__init__(len(flags), batch_size, seed, rank=rank, world_size=world_size)
        self.real, self.synthetic = np.flatnonzero(~flags), np.flatnonzero(flags)
        self.mixed = len(self.real) > 0 and len(self.synthetic) > 0
        if self.mixed:
            self.drawn = int(round(len(self.real) * share / (1.0 - share)))  # synthetic draws per epoch
            self.batches_per_epoch = max(1, (len(self.real) + self.drawn) // batch_size)

    def order(self, epoch: int) -> np.ndarray:
        if not self.mixed:
            return super().order(epoch)
        count = len(self.synthetic)
        draws = np.arange(epoch * self.drawn, (epoch + 1) * self.drawn)  # this epoch's synthetic draws, numbered
        rounds = {r: np.random.default_rng([self.seed, r, 7919]).permutation(count) for r in np.unique(draws // count)}
        chosen = np.array([self.synthetic[rounds[d // count][d % count]] for d in draws], dtype=int)
        cases = np.concatenate([self.real, chosen])
        return cases[np.random.default_rng([self.seed, epoch]).permutation(len(cases))]


def mirror_case(case: Case) -> Case:
    """The patient's mirror image: CT flipped left-right (RAS axis 0), left/right swapped in the prompt,
    report, label vector and paired structures (Parotid_L <-> Parotid_R).

    A laterality-aware augmentation: a plain left-right flip would teach that the report's side does not
    matter; this one doubles the examples of each side and keeps every pair consistent. Written here
    because MONAI's ``Flipd`` flips arrays but knows nothing of text or paired structure names.
    """
    label = None
    if case.label is not None:
        label = case.label.flip(1)
        if label.shape[0] == len(STRUCTURE_NAMES):
            label = label[mirrored_channels()]
    order = mirrored_label_index()
    labels = case.labels[order] if case.labels.shape[0] == len(order) else case.labels  # another vector length: kept
    return replace(case, image=case.image.flip(1), label=label, prompt=swap_side_words(case.prompt),
                   report=swap_side_words(case.report), labels=labels)


def canonical_case(case: Case, side: str) -> Case:
    """``case`` in the canonical ``side``: mirrored when its report puts the primary on the other side; a
    midline primary or an unread side stays as it is."""
    return mirror_case(case) if side_of_labels(case.labels)[0] == other_side(side) else case


def has_side(case: Case) -> bool:
    """Whether the case's report puts the primary on the left or the right."""
    return side_of_labels(case.labels)[0] is not None


def is_mirrored(case: Case, mirror_prob: float, seed: int, epoch: int, index: int, keep_side: bool = False) -> bool:
    """Whether case ``index`` is mirrored in ``epoch``: drawn from (seed, epoch, case) only; ``keep_side``: a case
    whose report has a side is never mirrored (training in a canonical side)."""
    drawn = mirror_prob > 0 and np.random.default_rng([seed, epoch, index, 17]).random() < mirror_prob
    return drawn and not (keep_side and has_side(case))


def mirrored(case: Case, mirror_prob: float, seed: int, epoch: int, index: int, keep_side: bool = False) -> Case:
    """``case`` or its mirror image (:func:`is_mirrored`), like every other augmentation."""
    return mirror_case(case) if is_mirrored(case, mirror_prob, seed, epoch, index, keep_side) else case


def collate(cases: list[Case], indices: list[int], transform: Compose | None, seed: int, epoch: int,
            mirror_prob: float = 0.0, side_margin: float | None = None, config: MedVLMConfig | None = None,
            coordinates: bool = False, keep_side: bool = False) -> dict:
    """Stack the cases of one batch, augmenting each with a state derived from (seed, epoch, case).

    ``mirror_prob``: probability of the laterality-aware mirror image (:func:`mirror_case`); with ``keep_side``
    only of cases whose report has no side (a midline primary).
    ``side_margin`` (needs ``config`` and a ``transform`` built ``with_side``): adds ``side_map``, the whole
    volume's midline distance of each (cropped, augmented) sample.
    ``coordinates`` (needs a ``transform`` built ``with_coordinates``): adds ``coordinates``, the whole volume's
    voxel coordinates (:func:`medvlm.models.windows.coordinate_channels`) of each sample.
    """
    images, labels, sides, grids = [], [], [], []
    chosen = [mirrored(cases[i], mirror_prob, seed, epoch, i, keep_side) for i in indices]
    for index, case in zip(indices, chosen):
        sample = {"image": case.image}
        side = None
        if side_margin is not None:
            side = case_side_map(case.image, config)
            sample["side"] = side
        if coordinates:
            sample["coordinates"] = coordinate_channels(case.image[None])[0]
        if case.label is not None:
            sample["label"] = case.label
        if transform is not None and len(transform.transforms):
            transform.set_random_state(seed=int(np.random.default_rng([seed, epoch, index]).integers(2**31)))
            sample = transform(sample)
        images.append(torch.as_tensor(sample["image"]).float())
        if side is not None:
            sides.append(torch.as_tensor(sample["side"]).float())
        if coordinates:
            grids.append(torch.as_tensor(sample["coordinates"]).float())
        if "label" in sample:
            labels.append(torch.as_tensor(sample["label"]).float())
    return {
        "image": torch.stack(images),
        "label": torch.stack(labels) if labels else None,
        "prompt": [case.prompt for case in chosen],
        "report": [case.report for case in chosen],
        "labels": torch.as_tensor(np.stack([case.labels for case in chosen])),
        "side_map": torch.stack(sides) if sides else None,
        "coordinates": torch.stack(grids) if grids else None,
        "index": indices,
    }


def case_side_map(image: torch.Tensor, config: MedVLMConfig) -> torch.Tensor:
    """(1, X, Y, Z) midline distance of one whole preprocessed case (:func:`medvlm.models.windows.midline_distance`)."""
    preprocess = config.data.preprocess
    return midline_distance(image[None], preprocess.hu_window, preprocess.output_range)[0]


def structure_presence(label: torch.Tensor, side_map: torch.Tensor | None = None, margin: float = 0.0) -> torch.Tensor:
    """The presence head's targets from (C, X, Y, Z) masks: (C,) 1.0 where the structure has any voxel.

    With ``side_map`` (1, X, Y, Z; :func:`medvlm.models.windows.midline_distance`): (C, 3), whether it has
    voxels anywhere, left of the band of ``margin`` voxels around the midline, right of it.
    """
    inside = label.flatten(1) > 0
    anywhere = inside.any(1)
    if side_map is None:
        return anywhere.float()
    distance = side_map.reshape(1, -1)
    left, right = (inside & (distance < -margin)).any(1), (inside & (distance > margin)).any(1)
    return torch.stack([anywhere, left, right], dim=1).float()


def report_fields(labels: torch.Tensor, size: int) -> torch.Tensor | None:
    """The decoder's ``report_fields`` from a batch of case label vectors; rows without a parsed report
    (vectors not ``size`` long) become all-zero ("nothing parsed"). ``None`` when the decoder reads no fields."""
    if not size:
        return None
    labels = torch.as_tensor(labels, dtype=torch.float32)
    if labels.shape[-1] != size:
        return torch.zeros(labels.shape[0], size)
    return labels


def aligned_corner(shape: Sequence[int], patch: Sequence[int], factor: int, case_seed: Sequence[int],
                   label: torch.Tensor | None = None, foreground: float = 0.0) -> list[int]:
    """Corner of a random patch on a grid aligned to ``factor`` voxels, drawn from (seed, step, case).

    With probability ``foreground`` (and a ``label`` (C, X, Y, Z) holding any structure) the patch is
    centred, to the grid, on a voxel of one structure drawn uniformly among those the case has (nnU-Net's
    foreground oversampling; MONAI's class-balanced crop centres), for ROIs so much larger than the patch
    that uniform corners rarely hold a small structure. Otherwise the corner is uniform.

    Written here because MONAI's random crops act on one grid, while the cached decoder inputs live on
    several (full, 1/2, ..., latent); one corner on the coarsest grid cuts all of them consistently. The
    image-only baseline draws the same corners, so both see the same patches.
    """
    rng = np.random.default_rng(list(case_seed))
    generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
    if label is not None and foreground > 0.0 and rng.random() < foreground:
        from monai.transforms.utils import generate_label_classes_crop_centers, map_classes_to_indices

        indices = [i for i in map_classes_to_indices(label > 0.5) if len(i)]
        if indices:
            centre = generate_label_classes_crop_centers(
                patch, 1, shape, indices, rand_state=np.random.RandomState(int(rng.integers(2**31))), warn=False)[0]
            return [min(max(int(c) - p // 2, 0) // factor * factor, (n - p) // factor * factor)
                    for c, p, n in zip(centre, patch, shape)]
    return [int(torch.randint(0, (n - p) // factor + 1, (1,), generator=generator)) * factor for n, p in zip(shape, patch)]


def cut_patch(volume: torch.Tensor, corner: Sequence[int], patch: Sequence[int], full_size: int) -> torch.Tensor:
    """The patch at ``corner``/``patch`` (full-resolution voxels) of a (C, X, Y, Z) map of any coarser scale."""
    scale = full_size // volume.shape[1]
    return volume[(slice(None), *(slice(c // scale, (c + p) // scale) for c, p in zip(corner, patch)))]
