"""Data augmentation with report-to-CT: synthetic CT + contour cases added to a segmentation training set.

``augment_dataset(pipe, data, out)`` (``medvlm augment``) writes ``out/datalist.json``: the source datalist's
cases as they were (paths made absolute, reports and records referenced as before) and, in ``training``,
synthetic cases prompted by the training cases' own reports in turn, written under ``out/synthetic_NNN/``:

- ``rendered`` (default): a real training case whose tumour and nodes (GTVp, GTVn) are sampled anew for its
  report as in ``lesions`` (until the lesions present are those the case has), fitted to the case
  (:func:`fit_lesions`: each new node outside its elective neck moved into it, the new primary centred on its own,
  neither in its bone, cord, brainstem or mandible) and drawn into its real CT by :func:`render_lesions`: the old
  lesions removed, the new ones soft-tissue masses of the case's own lesions' appearance; everything else is the
  real case's. Image and contours agree by construction; a lesion the report states that no try drew stays the
  real case's (:func:`unlike_source`).
- ``lesions``: the same masks with the image decoded by the generator: the CT latent, the other structures and
  the CT outside the old and new lesions stay the real case's (``ReportToCTPipeline(image=..., masks=...,
  keep_structures=[...])``); inside, the decoded CT seldom shows the new lesion and still shows the old one.
- ``primary``: ``lesions`` with the primary tumour (GTVp) alone regenerated; the nodes stay the real case's.
- ``rendered-primary``: ``rendered`` with the GTVp alone regenerated; the nodes (image and contours) stay real.
- ``text``: a whole case (CT and paired contours) generated from the report alone.

Where the nodes are regenerated and the elective nodal target (CTVn) is kept, the kept CTVn is grown to hold
the new nodes with a 5 mm margin in soft tissue (:func:`hold_nodes`), as an elective target holds involved nodes;
otherwise a synthetic case would teach a decoder nodes outside the target that contains them in every real case.

Which helps a segmentation decoder is measured by ``medvlm eval augmentation`` (docs/evaluation.md), which
calls :func:`synthesise` as this module's command does.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from medvlm.vocabulary import NODE_MARGIN_MM

# the first is the default (chosen on eval augmentation's decision split)
SYNTHESES = ("rendered", "rendered-primary", "lesions", "primary", "text")
LESIONS = ("GTVp", "GTVn")  # what ``lesions`` regenerates; every other structure is the real case's
# the editing syntheses, what each regenerates; and those whose lesions are drawn into the real CT (:func:`render_lesions`)
REGENERATED = {"lesions": LESIONS, "primary": ("GTVp",), "rendered": LESIONS, "rendered-primary": ("GTVp",)}
RENDERED = ("rendered", "rendered-primary")
PRESENCE_TRIES = 4  # generator seeds a rendered case may take until its lesions are those its report states
PRIMARY_VOLUME_RATIO = 1.5  # a new primary's volume kept within this factor of the real case's (same report, same T)
NODES_INSIDE = 0.5  # share of a new node's voxels inside the case's elective neck (CTVn) under which it is moved
TARGET_TISSUE_HU = (-500.0, 300.0)  # where that margin may grow: not air (airway, outside), not bone
# structures a drawn lesion never enters: no GTV of the head and neck (nor of the phantom) lies in the central
# nervous system, and a soft-tissue mass drawn over the mandible cannot show bone invasion; either would leave the
# structure's contour on tumour
NO_LESION_STRUCTURES = ("SpinalCord", "Brainstem", "Bone_Mandible")
DEFAULT_CONTRAST_HU = 20.0  # a new lesion's contrast where the case has none to copy (enhancing tumour against muscle)
SOFT_TISSUE_HU = (-150.0, 150.0)  # what a removed lesion's place is filled from: fat to enhancing tissue


def source_case(pipe, item: dict, regenerated: Sequence[str] = LESIONS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A labelled datalist item as an edit source of ``pipe``: (CT in HU (X, Y, Z), masks (K, X, Y, Z) in the
    pipeline's structure order, affine) on the pipeline's grid. A case already there (RAS, the preprocessing's
    spacing and ROI shape) is used as it is; any other goes through the training preprocessing (RAS, spacing,
    body crop, padding) and is centre-cropped to the ROI."""
    import nibabel as nib

    from medvlm.data.io import load_labels, load_nifti, spacing_from_affine
    from medvlm.errors import InputError

    names = list(pipe.config.structure_names)
    if "label" not in item:
        raise InputError(f"case {item.get('id', item['image'])}: lesion synthesis edits a labelled case; it has no 'label'")
    ct, affine = load_nifti(item["image"])
    labels, label_affine, stored = load_labels(item["label"], names)
    missing = [n for n in names if n not in stored]
    if missing:
        raise InputError(f"{item['label']}: no channel for {missing}; lesion synthesis keeps every structure but "
                         f"{list(regenerated)}, so the labels need all of {names}")
    labels = labels[[stored.index(n) for n in names]]
    if labels.shape[1:] != ct.shape or not np.allclose(label_affine, affine, atol=1e-3):
        raise InputError(f"{item['label']}: labels of shape {labels.shape[1:]} are not on the CT's grid {ct.shape}")
    config = pipe.preprocess_config
    on_grid = (tuple(ct.shape) == tuple(config.roi_size) and nib.aff2axcodes(affine) == ("R", "A", "S")
               and np.allclose(spacing_from_affine(affine), config.spacing_mm, atol=1e-3))
    if on_grid:
        return ct, labels.astype(bool), np.asarray(affine, dtype=np.float64)
    from monai.data import MetaTensor
    from monai.transforms import CenterSpatialCropd

    from medvlm.data.transforms import as_metatensor, preprocessing_transforms, to_hu

    chain = preprocessing_transforms(config, label_keys=("label",), load=False)
    data = chain({"image": as_metatensor(ct, affine), "label": MetaTensor(labels.astype(np.float32), affine=affine)})
    data = CenterSpatialCropd(keys=["image", "label"], roi_size=tuple(config.roi_size))(data)
    image = data["image"]
    return (to_hu(image[0].numpy(), config), data["label"].numpy() > 0.5, image.affine.numpy().astype(np.float64))


def lesion_appearance(ct: np.ndarray, mask: np.ndarray) -> tuple[float, float] | None:
    """A lesion's mean HU and standard deviation in ``ct``; None for an empty mask."""
    m = np.asarray(mask, dtype=bool)
    if not m.any():
        return None
    inside = np.asarray(ct, dtype=np.float32)[m]
    return float(inside.mean()), float(inside.std())


def render_lesions(ct: np.ndarray, source: np.ndarray, lesions: np.ndarray, *, seed: int = 0,
                   appearances: Sequence[tuple[float, float] | None] | None = None, margin: int = 1,
                   soft_tissue: tuple[float, float] = SOFT_TISSUE_HU, keep: np.ndarray | None = None) -> np.ndarray:
    """The real CT (HU, (X, Y, Z)) with its lesions ``source`` (L, X, Y, Z) removed and ``lesions`` (L, X, Y, Z)
    drawn in: the ``rendered`` synthesis. Where the old lesions were (``margin`` voxels wider), the CT becomes
    the soft tissue nearest to it outside (MONAI's Euclidean distance transform), smoothed and given the texture
    (standard deviation) of the soft tissue around; each new lesion is a soft-tissue mass of the appearance
    (mean HU, standard deviation) in ``appearances`` (one per lesion channel; default the source's own lesion of
    that channel, else another of its lesions, else the surrounding soft tissue + ``DEFAULT_CONTRAST_HU``),
    blended over a voxel at its edge (partial volume). A new lesion replaces what lay there, as a tumour fills
    the airway or fat it grows into. Outside both, and in ``keep`` (X, Y, Z; e.g. the real nodes when only the
    primary is regenerated), the CT is the source's to the voxel.

    Written here because the generated CT latent does not draw a lesion where its generated mask lies (its
    contrast against the surroundings ranged from -780 to +115 HU where the real ones hold +6 to +31) and keeps
    the replaced lesions visible (nodes at a median +26 to +31 HU without a contour): an intensity model
    calibrated on the case, as procedural tumour synthesis does, makes image and contours agree. MONAI has no
    lesion inpainting."""
    import torch
    from monai.transforms import GaussianSmooth
    from monai.transforms.utils import distance_transform_edt

    values = np.asarray(ct, dtype=np.float32)
    old, new = np.asarray(source, dtype=bool), np.asarray(lesions, dtype=bool)
    if old.shape != new.shape or old.shape[1:] != values.shape:
        raise ValueError(f"source and new lesions must be (L, {', '.join(map(str, values.shape))}) each, got "
                         f"{old.shape} and {new.shape}")

    def dilated(mask: np.ndarray, by: int) -> np.ndarray:
        if not by:
            return mask
        t = torch.as_tensor(mask)[None, None].float()
        return (torch.nn.functional.max_pool3d(t, 2 * by + 1, stride=1, padding=by)[0, 0] > 0).numpy()

    hole = dilated(old.any(0) | new.any(0), margin)
    if not hole.any():
        return values.copy()
    tissue = (values > soft_tissue[0]) & (values < soft_tissue[1])
    # what the hole is filled from: soft tissue outside it; with none left (lesions over the whole neck, as an
    # untrained generator draws them) any voxel outside; with nothing outside, the volume as it is
    donors = next(m for m in (tissue & ~hole, ~hole, np.ones_like(hole)) if m.any())
    around = dilated(hole, 2) & donors & ~hole
    level = float(values[around].mean()) if around.any() else float(values[donors].mean())
    texture = float(values[around].std()) if around.sum() > 10 else 0.0
    measured = [lesion_appearance(values, m) for m in old]
    fallback = next((a for a in measured if a is not None), (level + DEFAULT_CONTRAST_HU, texture))
    given = list(appearances) if appearances is not None else [None] * len(old)
    if len(given) != len(old):
        raise ValueError(f"appearances needs one (mean HU, standard deviation) or None per lesion channel ({len(old)}), "
                         f"got {len(given)}")
    appearances = [g if g is not None else (m if m is not None else fallback) for g, m in zip(given, measured)]
    _, nearest = distance_transform_edt((~donors)[None].astype(np.float32), return_distances=True, return_indices=True)
    filled = values[tuple(np.asarray(nearest)[0])]  # every voxel from its nearest donor voxel
    filled = np.asarray(GaussianSmooth(sigma=1.5)(filled[None]))[0]
    rng = np.random.default_rng(seed)

    def noise(std: float) -> np.ndarray:  # texture: white noise smoothed over half a voxel, scaled to ``std``
        field = np.asarray(GaussianSmooth(sigma=0.5)(rng.normal(0.0, 1.0, values.shape).astype(np.float32)[None]))[0]
        return field * (std / max(float(field.std()), 1e-6))

    out = np.where(hole, filled + noise(texture), values)
    soft = GaussianSmooth(sigma=0.6)
    for mask, appearance in zip(new, appearances):
        if mask.any():
            weight = np.clip(np.asarray(soft(mask[None].astype(np.float32)))[0] * 1.5, 0.0, 1.0) * hole
            weight[mask] = 1.0
            out = (1.0 - weight) * out + weight * (float(appearance[0]) + noise(float(appearance[1])))
    if keep is not None:
        out = np.where(np.asarray(keep, dtype=bool), values, out)
    return out.astype(np.float32)


def synthesise(pipe, items: Sequence[dict], count: int, out: str | Path, *, synthesis: str = SYNTHESES[0],
               steps: int = 25, guidance_scale: float = 3.0, seed: int = 0,
               progress: Callable[[str], None] | None = None) -> list[dict]:
    """``count`` synthetic cases under ``out/synthetic_NNN/`` (``ct.nii.gz``, ``labels.nii.gz``), prompted by
    ``items``' reports in turn (a case known only by its record: its structured prompt); the generator of case
    ``n`` is seeded ``seed + n`` (a rendered case whose lesions are not those of its source retries with
    ``+ count`` per try, up to ``PRESENCE_TRIES`` seeds; the seed used is kept in ``seed.txt``), so a finished
    case is reused and an interrupted run continues. Returns
    datalist items (absolute paths; ``synthetic``: the synthesis, the source case, the seed and, for a rendered
    case, the lesions it keeps from its source where no try matched the report, ``real_lesions``). ``progress``
    receives a line per case generated (e.g. ``print``)."""
    import torch

    from medvlm.data.io import atomic_write_text, save_labels, save_nifti, spacing_from_affine
    from medvlm.errors import InputError
    from medvlm.text.prompts import process_record

    if synthesis not in SYNTHESES:
        raise ValueError(f"synthesis must be one of {SYNTHESES}, got {synthesis!r}")
    if not items or count < 1:
        raise InputError(f"need at least one source case and one synthetic case, got {len(items)} and {count}")
    if not pipe.has_paired_masks and pipe.segmentation is None:
        raise InputError("this report-to-CT pipeline gives no contours (no paired autoencoder, no segmentation "
                         "decoder): synthetic training cases need them")
    if synthesis in REGENERATED and not pipe.has_paired_masks:
        raise InputError("lesion synthesis keeps a real case's structures: it needs a paired autoencoder")
    names = list(pipe.config.structure_names)
    regenerated = REGENERATED.get(synthesis, ())
    channels = [names.index(n) for n in regenerated]  # drawn anew (rendered syntheses)
    kept = [names.index(n) for n in LESIONS if n not in regenerated]  # real lesions that stay in image and contours
    out = Path(out)
    written = []
    for number in range(count):
        source = items[number % len(items)]
        report = source.get("report")
        if not report:
            if "record" not in source:
                raise InputError(f"case {source.get('id', source['image'])} has neither a report nor a record to prompt with")
            report = process_record(source["record"]).text
        case_dir = out / f"synthetic_{number:03d}"
        ct_path, label_path = case_dir / "ct.nii.gz", case_dir / "labels.nii.gz"
        # the generator seed a case was made with, then the lesions it keeps from the real case (one line each)
        seed_path, used, real_kept = case_dir / "seed.txt", seed + number, []
        if ct_path.is_file() and label_path.is_file():  # a finished case is reused
            if seed_path.is_file():
                fields = seed_path.read_text().split()
                if not fields or not fields[0].lstrip("-").isdigit() or any(f not in regenerated for f in fields[1:]):
                    raise InputError(f"{seed_path}: expected the case's generator seed, then the lesions it keeps "
                                     f"from its source case ({', '.join(regenerated) or 'none'}), one per line; "
                                     f"remove {case_dir} to make the case anew")
                used, real_kept = int(fields[0]), fields[1:]
        else:
            if progress is not None:
                progress(f"synthetic case {number + 1}/{count} ({synthesis})")
            edit: dict[str, Any] = {}
            if synthesis in REGENERATED:
                ct, masks, affine = source_case(pipe, source, regenerated)
                edit = {"image": ct, "masks": masks, "keep_structures": [n for n in names if n not in regenerated]}
            for attempt in range(PRESENCE_TRIES if synthesis in RENDERED else 1):
                used = seed + number + attempt * count
                result = pipe(report, num_inference_steps=steps, guidance_scale=guidance_scale,
                              generator=torch.Generator().manual_seed(used), **edit)
                if synthesis not in RENDERED or not unlike_source(result.masks[0], masks, channels):
                    break
            affine = affine if synthesis in REGENERATED else result.affine
            image, labels = result.ct[0], np.asarray(result.masks[0]).astype(bool)
            if synthesis in RENDERED:  # lesions fitted to this real case, then drawn into its CT where they lie
                labels = fit_lesions(labels, masks, names, regenerated, ct, spacing_from_affine(affine))
                stays = unlike_source(labels, masks, channels)  # the report's lesion no try drew: the real one stays
                labels[stays] = masks[stays]
                drawn, real_kept = [k for k in channels if k not in stays], [names[k] for k in stays]
                image = render_lesions(ct, masks[drawn], labels[drawn], seed=used,
                                       keep=masks[kept + stays].any(0) if kept + stays else None)
            if "GTVn" in regenerated and "GTVn" not in real_kept and "CTVn" in names:  # grown to hold the new nodes
                labels[names.index("CTVn")] = hold_nodes(labels[names.index("CTVn")], labels[names.index("GTVn")],
                                                         image, spacing_from_affine(affine))
            # seed and labels first: a case counts as finished only once its CT is written too
            case_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(seed_path, "".join(f"{line}\n" for line in [used, *real_kept]))
            save_labels(label_path, labels.astype(np.uint8), affine, result.structure_names)
            save_nifti(ct_path, image, affine)
        written.append({"image": str(ct_path.resolve()), "label": str(label_path.resolve()), "report": report,
                        "id": f"synthetic_{number:03d}",
                        "synthetic": {"synthesis": synthesis, "source": source.get("id", Path(source["image"]).name),
                                      "seed": used, **({"real_lesions": real_kept} if real_kept else {})}})
    return written


def fit_lesions(sample: np.ndarray, source: np.ndarray, names: Sequence[str], regenerated: Sequence[str],
                ct: np.ndarray, spacing_mm: Sequence[float]) -> np.ndarray:
    """A rendered sample's structures (K, X, Y, Z bool, in the order of ``names``) with its ``regenerated``
    lesions fitted to the real case it edits (``source`` masks, ``ct`` in HU, grid ``spacing_mm``), whose report
    prompted it: new nodes in its elective neck (:func:`place_nodes`), the new primary centred on its own
    (:func:`place_primary`), neither in its bone, cord, brainstem or mandible (:func:`lesion_room`)."""
    labels = np.array(sample, dtype=bool)
    if "GTVn" in regenerated and "CTVn" in names:
        k = list(names).index("GTVn")
        labels[k] = place_nodes(labels[k], labels[list(names).index("CTVn")], spacing_mm)
    if "GTVp" in regenerated:
        k = list(names).index("GTVp")
        labels[k] = place_primary(labels[k], np.asarray(source[k], dtype=bool))
    channels = [list(names).index(n) for n in regenerated]
    labels[channels] &= lesion_room(ct, source, names)[None]
    return labels


def lesion_room(ct: np.ndarray, masks: np.ndarray, names: Sequence[str], *,
                bone_hu: float = TARGET_TISSUE_HU[1], excluded: Sequence[str] = NO_LESION_STRUCTURES) -> np.ndarray:
    """Where a rendered lesion may lie in a real case: (X, Y, Z) bool, False in its bone (CT above ``bone_hu``)
    and in its ``excluded`` structures of ``masks`` (K, X, Y, Z, in the order of ``names``; default the cord, the
    brainstem and the mandible). Air stays allowed: a tumour fills the airway it grows into.

    Written here because the generator places lesions by the report, not by the real case's anatomy: in the demo's
    augmentation 20 of 40 rendered cases drew a lesion over the mandible and 5 into the spinal cord (1 and 0 of the
    20 real cases), painting soft tissue under a bone or cord contour."""
    values = np.asarray(ct)
    masks = np.asarray(masks)
    if masks.shape[1:] != values.shape or masks.shape[0] != len(names):
        raise ValueError(f"masks must be ({len(names)}, {', '.join(map(str, values.shape))}), got {masks.shape}")
    room = values <= bone_hu
    for name in excluded:
        if name in names:
            room &= ~np.asarray(masks[list(names).index(name)], dtype=bool)
    return room


def place_primary(primary: np.ndarray, source: np.ndarray, *, volume_ratio: float = PRIMARY_VOLUME_RATIO) -> np.ndarray:
    """A new primary tumour ``primary`` (X, Y, Z bool) placed where the real case's primary ``source`` lies: its
    shape scaled about its centre to a volume within ``volume_ratio`` times the source's (unchanged inside that
    range) and moved, by whole voxels, so that its centre is the source's. Unchanged when either is empty.

    A rendered case is prompted by its source case's own report, so the new primary has the source's subsite,
    side and T stage; the generator gives its shape. Written here because the generator places a primary by the
    report, not by this case's anatomy: on the demo's 10-case augmentation (seed 0) its centre lay 7-53 mm (median
    31) from the real primary of the same report, its volume 0.04-3.7 times the real one's. Nearest-neighbour index
    arithmetic about the lesion's own centre (MONAI's Affine scales about the image centre)."""
    primary, source = np.asarray(primary, dtype=bool), np.asarray(source, dtype=bool)
    if primary.shape != source.shape:
        raise ValueError(f"primary and source must share one grid, got {primary.shape} and {source.shape}")
    if not volume_ratio >= 1.0:
        raise ValueError(f"volume_ratio must be >= 1, got {volume_ratio}")
    if not primary.any() or not source.any():
        return primary.copy()
    voxels = np.argwhere(primary)
    kept = float(np.clip(len(voxels), source.sum() / volume_ratio, source.sum() * volume_ratio))
    scale = (kept / len(voxels)) ** (1.0 / 3.0)  # the linear factor giving the kept volume
    centre = voxels.mean(0)
    target = centre + np.rint(np.argwhere(source).mean(0) - centre)  # a whole-voxel move: an unscaled shape stays exact
    # every voxel of a box around the target centre, pulled back to the generated shape
    reach = np.ceil((voxels.max(0) - voxels.min(0) + 1) * scale / 2.0 + 1.0).astype(int)
    low = np.maximum(np.floor(target).astype(int) - reach, 0)
    high = np.minimum(np.ceil(target).astype(int) + reach + 1, np.asarray(primary.shape))
    grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(low, high)], indexing="ij"), -1).reshape(-1, 3)
    back = np.rint(centre + (grid - target) / scale).astype(int)
    valid = ((back >= 0) & (back < np.asarray(primary.shape))).all(1)
    hit = np.zeros(len(grid), dtype=bool)
    hit[valid] = primary[tuple(back[valid].T)]
    placed = np.zeros_like(primary)
    placed[tuple(grid[hit].T)] = True
    return placed


def nodes_inside(masks: np.ndarray, names: Sequence[str]) -> float:
    """The share of the nodes' (GTVn) voxels inside the elective nodal target (CTVn) of ``masks`` (K, X, Y, Z) in
    the order of ``names``; 1.0 without nodes, or without either structure."""
    if "GTVn" not in names or "CTVn" not in names:
        return 1.0
    nodes = np.asarray(masks[list(names).index("GTVn")], dtype=bool)
    if not nodes.any():
        return 1.0
    return float((nodes & np.asarray(masks[list(names).index("CTVn")], dtype=bool)).sum() / nodes.sum())


def place_nodes(nodes: np.ndarray, target: np.ndarray, spacing_mm: Sequence[float] = (1.0, 1.0, 1.0), *,
                inside: float = NODES_INSIDE) -> np.ndarray:
    """``nodes`` (X, Y, Z bool) with each node (connected component) that has less than ``inside`` of its voxels
    in the elective nodal target ``target`` moved, whole, to the nearest place in the target deep enough for it:
    its centre to the nearest target voxel at least its equivalent-sphere radius from the target's edge (the
    deepest ones if none is that deep), distances in millimetres of the grid's ``spacing_mm``. Unchanged without a
    target.

    Written here because a generated node's place follows the generator, which puts most of them outside the kept
    elective neck (29 % of their voxels inside on the demo's training cases) where every real node lies; scipy
    labels the components and MONAI's distance transform finds the place (MONAI has no lesion placement)."""
    from monai.transforms.utils import distance_transform_edt
    from scipy.ndimage import label

    nodes, target = np.asarray(nodes, dtype=bool), np.asarray(target, dtype=bool)
    if nodes.shape != target.shape:
        raise ValueError(f"nodes and target must share one grid, got {nodes.shape} and {target.shape}")
    if not nodes.any() or not target.any():
        return nodes.copy()
    sampling = [float(v) for v in spacing_mm]
    depth = np.asarray(distance_transform_edt(target[None].astype(np.float32), sampling=sampling))[0]  # mm to the edge
    components, count = label(nodes)
    placed = np.zeros_like(nodes)
    for number in range(1, count + 1):
        voxels = np.argwhere(components == number)
        if target[tuple(voxels.T)].mean() >= inside:
            placed[tuple(voxels.T)] = True
            continue
        radius = (3.0 * len(voxels) * float(np.prod(sampling)) / (4.0 * np.pi)) ** (1.0 / 3.0)
        room = depth >= min(radius, float(depth.max()))
        centre = np.round(voxels.mean(0)).astype(int)
        _, nearest = distance_transform_edt((~room)[None].astype(np.float32), sampling=sampling,
                                            return_distances=True, return_indices=True)
        shift = np.asarray(nearest)[0][(slice(None), *centre)] - centre
        moved = voxels + shift
        moved = moved[((moved >= 0) & (moved < np.asarray(nodes.shape))).all(1)]
        placed[tuple(moved.T)] = True
    return placed


def hold_nodes(target: np.ndarray, nodes: np.ndarray, ct: np.ndarray, spacing_mm: Sequence[float], *,
               margin_mm: float = NODE_MARGIN_MM, tissue_hu: tuple[float, float] = TARGET_TISSUE_HU) -> np.ndarray:
    """An elective nodal target (X, Y, Z bool) grown to hold ``nodes``: the target, the nodes, and the voxels
    within ``margin_mm`` of a node (in the grid's ``spacing_mm``) whose HU in ``ct`` lies in ``tissue_hu`` (a
    margin stops at air and bone). Unchanged without nodes."""
    from monai.transforms.utils import distance_transform_edt

    target, nodes = np.asarray(target, dtype=bool), np.asarray(nodes, dtype=bool)
    values = np.asarray(ct, dtype=np.float32)
    if not (target.shape == nodes.shape == values.shape):
        raise ValueError(f"target, nodes and CT must share one grid, got {target.shape}, {nodes.shape}, {values.shape}")
    if not nodes.any():
        return target.copy()
    distance = np.asarray(distance_transform_edt((~nodes)[None].astype(np.float32),
                                                 sampling=[float(s) for s in spacing_mm]))[0]
    margin = (distance <= margin_mm) & (values > tissue_hu[0]) & (values < tissue_hu[1])
    return target | nodes | margin


def unlike_source(sample: np.ndarray, source: np.ndarray, channels: Sequence[int]) -> list[int]:
    """The lesion channels (of ``channels``) where a rendered sample (K, X, Y, Z) disagrees with the real case
    ``source`` whose report prompted it: a lesion the report states that no try drew (or that fitting left no
    room for), or one drawn that it does not state. A rendered case retries the generator until there are none
    (:data:`PRESENCE_TRIES`); after that the synthesis keeps the real case's lesion in those channels,
    image and contour: a case whose report states a primary with none drawn (or the old one removed) would teach
    a decoder to leave stated tumours out (4 of the 20 rendered cases of the demo's 10-case augmentation, seed 0,
    had no GTVp for a report stating one)."""
    return [k for k in channels if bool(np.asarray(sample[k]).any()) != bool(np.asarray(source[k]).any())]


def _absolute(raw: dict, base: Path) -> dict:
    """A raw datalist item with its file paths (image, label, a report file) made absolute."""
    item = dict(raw)
    for key in ("image", "label", "report"):
        value = item.get(key)
        if isinstance(value, str) and (key != "report" or value.endswith(".txt")) and not Path(value).is_absolute():
            item[key] = str((base / value).resolve())
    return item


def augment_dataset(pipe, data: str | Path, out: str | Path, *, per_case: float = 2.0, synthesis: str = SYNTHESES[0],
                    cases: int | None = None, steps: int = 25, guidance_scale: float = 3.0, seed: int = 0,
                    progress: Callable[[str], None] | None = None) -> Path:
    """Write ``out/datalist.json``: ``data``'s datalist (every section; paths absolute, records referenced as
    before) with ``round(per_case * n)`` synthetic cases added to ``training``, prompted by the first ``cases``
    training cases (default: all ``n``). Returns the datalist's path."""
    from medvlm.data.datalist import load_datalist
    from medvlm.data.io import atomic_write_text
    from medvlm.errors import InputError

    if not per_case > 0:
        raise InputError(f"per_case must be > 0, got {per_case}")
    path = Path(data) / "datalist.json" if Path(data).is_dir() else Path(data)
    datalist = load_datalist(path)  # validated (files, reports, records) before anything is generated
    training = datalist["training"][:cases] if cases is not None else datalist["training"]
    if not training:
        raise InputError(f"{path}: no training case to augment")
    count = max(1, round(per_case * len(training)))
    generated = synthesise(pipe, training, count, out, synthesis=synthesis, steps=steps,
                           guidance_scale=guidance_scale, seed=seed, progress=progress)
    payload = json.loads(path.read_text(encoding="utf-8"))
    base = path.parent
    content = {key: value for key, value in payload.items() if key not in ("training", "validation", "test")}
    if isinstance(content.get("records"), str) and not Path(content["records"]).is_absolute():
        content["records"] = str((base / content["records"]).resolve())
    for section in ("training", "validation", "test"):
        if section in payload:
            content[section] = [_absolute(item, base) for item in payload[section]]
    content["training"] = content.get("training", []) + generated
    target = Path(out) / "datalist.json"
    atomic_write_text(target, json.dumps(content, indent=1) + "\n")
    return target
