"""ContourPipeline: CT (+ report) -> tumour, elective nodal target and organ-at-risk masks in the CT's grid."""

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from diffusers.utils import BaseOutput
from monai.inferers import sliding_window_inference

from medvlm.config import PreprocessConfig, preprocess_from_dict, preprocess_to_dict
from medvlm.data.inputs import PreparedCT, as_list, prepare_ct
from medvlm.data.transforms import BODY_HU, body_midline, map_intensity
from medvlm.vocabulary import STRUCTURE_NAMES
from medvlm.models import CTAutoencoderKL, FusedSegmentationDecoder, ReportConditionedUNet3D
from medvlm.models.segmentation import fused_features
from medvlm.text.prompts import ProcessedReport
from pipelines.base import MedVLMPipeline

logger = logging.getLogger(__name__)


CONTOUR_OUTPUT_TYPES = ("np", "pt", "nifti")


@dataclass
class ContourPipelineOutput(BaseOutput):
    """Per input CT: masks by structure (bool arrays in the input grid), probabilities (optional),
    the affine, the de-identified report used, where it came from and warnings."""

    masks: list[dict[str, np.ndarray]]
    structure_names: tuple[str, ...]
    affines: list[np.ndarray]
    reports: list[str | None]
    report_sources: list[str]  # "given", "drafted" or "none"
    warnings: list[list[str]] = field(default_factory=list)
    probabilities: list[np.ndarray] | None = None
    dicom_series: list | None = None  # the DicomSeries of each input that came from DICOM, else None

    def save(self, directory: str | Path, format: str = "nifti") -> list[Path]:
        """Write the masks, the report used and warnings; one folder per case when there are several.

        ``format``: ``"nifti"`` (one file per structure), ``"rtstruct"`` (one RT Structure Set) or ``"seg"``
        (one binary DICOM-SEG); the DICOM formats reference the input series, so they need a DICOM input.
        Every file is written atomically.
        """
        from medvlm.data.io import atomic_write_text, save_nifti

        formats = ("nifti", "rtstruct", "seg")
        if format not in formats:
            raise ValueError(f"format must be one of {formats}, got {format!r}")
        series = self.dicom_series or [None] * len(self.masks)
        if format != "nifti" and any(s is None for s in series):
            raise ValueError(f"format {format!r} writes contours that reference the input DICOM series; the input was "
                             "not a DICOM folder (use format='nifti')")
        directory = Path(directory)
        written = []
        for i, masks in enumerate(self.masks):
            masks = {name: _as_bool_array(mask) for name, mask in masks.items()}  # any output_type
            folder = directory if len(self.masks) == 1 else directory / f"case_{i:03d}"
            if format == "rtstruct":
                from medvlm.data.dicom import write_rtstruct

                written.append(write_rtstruct(masks, series[i], folder / "RTSTRUCT_medvlm.dcm"))
            elif format == "seg":
                from medvlm.data.dicom import write_seg

                written.append(write_seg(masks, series[i], folder / "SEG_medvlm.dcm"))
            else:
                for name, mask in masks.items():
                    written.append(save_nifti(folder / f"{name}.nii.gz", mask.astype(np.uint8), self.affines[i],
                                              dtype=np.uint8, description=f"medvlm {name}"))
            if self.reports[i] is not None:
                atomic_write_text(folder / "report_used.txt", f"[{self.report_sources[i]}]\n{self.reports[i]}\n")
            if self.warnings and self.warnings[i]:
                atomic_write_text(folder / "warnings.txt", "\n".join(self.warnings[i]) + "\n")
        return written


def _flat_body(image: torch.Tensor, config: PreprocessConfig, tolerance_hu: float = 10.0) -> bool:
    """Whether the voxels above the foreground threshold vary by less than ``tolerance_hu`` (standard deviation)."""
    from medvlm.data.transforms import from_hu, to_hu

    body = image[image > float(from_hu(np.float32(config.foreground_threshold_hu), config))]
    if body.numel() < 2:
        return True
    return float(to_hu(body, config).std()) < tolerance_hu


def _as_bool_array(mask) -> np.ndarray:
    """A mask of any ``output_type`` (numpy, torch, nibabel) as a bool array."""
    if hasattr(mask, "get_fdata"):
        return np.asarray(mask.dataobj) > 0
    if isinstance(mask, torch.Tensor):
        return mask.cpu().numpy().astype(bool)
    return np.asarray(mask, dtype=bool)


class ContourPipeline(MedVLMPipeline):
    r"""Contour a CT with the report-conditioned segmentation head.

    Components:
        vae ([`CTAutoencoderKL`]): encodes CT patches to latents and multi-scale features.
        unet ([`ReportConditionedUNet3D`]): fuses latents with the report (cross-attention); its last
            decoder map is the fused latent.
        segmentation ([`FusedSegmentationDecoder`]): fused latent + VAE skips + report tokens -> logits.
        text_encoder ([`~transformers.PreTrainedModel`]) and tokenizer: report token states.
        scheduler (optional, a diffusers scheduler): only used when ``noise_timestep > 0``.
        report_generator / report_processor (optional, PaliGemma2): draft a report when none is given.

    Config (saved in ``model_index.json``): ``preprocess`` (the MONAI chain's settings), ``structure_names``,
    ``thresholds`` (per structure), ``report_format`` (``"structured"``: the parsed report as the standard
    prompt, as in training; ``"raw"``: the de-identified text), ``max_report_tokens`` and ``max_new_tokens``
    (length limit of a drafted report).
    """

    model_cpu_offload_seq = "text_encoder->vae->unet->segmentation"
    _optional_components = ["scheduler", "report_generator", "report_processor"]
    _config_names = ("preprocess", "structure_names", "thresholds", "max_report_tokens", "report_format", "max_new_tokens")

    def __init__(self, vae: CTAutoencoderKL, unet: ReportConditionedUNet3D, segmentation: FusedSegmentationDecoder,
                 text_encoder, tokenizer, scheduler=None, report_generator=None, report_processor=None,
                 preprocess: dict | None = None, structure_names: list | tuple = STRUCTURE_NAMES,
                 thresholds: list | tuple | None = None, max_report_tokens: int = 128,
                 report_format: str = "structured", max_new_tokens: int = 160):
        super().__init__()
        self.register_modules(vae=vae, unet=unet, segmentation=segmentation, text_encoder=text_encoder,
                              tokenizer=tokenizer, scheduler=scheduler, report_generator=report_generator,
                              report_processor=report_processor)
        preprocess = dict(preprocess or preprocess_to_dict())
        thresholds = list(thresholds) if thresholds is not None else [0.5] * len(structure_names)
        self.register_to_config(preprocess=preprocess, structure_names=list(structure_names), thresholds=thresholds,
                                max_report_tokens=max_report_tokens, report_format=report_format,
                                max_new_tokens=max_new_tokens)

    @property
    def preprocess_config(self) -> PreprocessConfig:
        return preprocess_from_dict(self.config.preprocess)

    def check_inputs(self, cts: list, reports: list | None, overlap: float, sw_batch_size: int, noise_timestep: int,
                     thresholds: Sequence[float] | None) -> None:
        if not cts:
            raise ValueError("`ct` is empty: pass a NIfTI path, an array, a MetaTensor or a list of them")
        if reports is not None and len(reports) != len(cts):
            raise ValueError(f"`report` has {len(reports)} entries but `ct` has {len(cts)}; pass one report per CT (or None)")
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"`overlap` must be in [0, 1), got {overlap}")
        if sw_batch_size < 1:
            raise ValueError(f"`sw_batch_size` must be at least 1, got {sw_batch_size}")
        if noise_timestep < 0 or (noise_timestep > 0 and self.scheduler is None):
            raise ValueError(f"`noise_timestep`={noise_timestep} needs a scheduler and must be >= 0")
        if noise_timestep > 0 and noise_timestep >= int(self.scheduler.config.num_train_timesteps):
            raise ValueError(f"`noise_timestep`={noise_timestep} must be below the scheduler's "
                             f"{self.scheduler.config.num_train_timesteps} training timesteps")
        if thresholds is not None and len(thresholds) != len(self.config.structure_names):
            raise ValueError(f"`thresholds` needs {len(self.config.structure_names)} values, got {len(thresholds)}")
        if thresholds is not None and not all(isinstance(t, (int, float)) and 0.0 < float(t) < 1.0 for t in thresholds):
            raise ValueError(f"`thresholds` must be probabilities in (0, 1), got {list(thresholds)}")

    def _draft_reports(self, prepared: list[PreparedCT]) -> list[str]:
        from medvlm.models.report_generator import check_max_new_tokens, drafting_batch, render_ct

        size = self.report_processor.image_processor.size["height"]
        images = [render_ct(p.image[0], image_size=size, input_is_hu=False,
                            value_range=tuple(self.config.preprocess["hu_window"]),
                            model_range=tuple(self.config.preprocess["output_range"])) for p in prepared]
        batch = drafting_batch(self.report_processor, images).to(self.report_generator.device)
        tokens = check_max_new_tokens(self.config.max_new_tokens, self.report_generator, batch["input_ids"].shape[1])
        generated = self.report_generator.generate(**batch, max_new_tokens=tokens, do_sample=False)
        return self.report_processor.batch_decode(generated[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)

    @torch.no_grad()
    def __call__(self, ct: Any, report: str | Sequence[str | None] | None = None, *, spacing_mm: Sequence[float] | None = None,
                 affine: np.ndarray | None = None, overlap: float = 0.25, sw_batch_size: int = 1,
                 thresholds: Sequence[float] | None = None, noise_timestep: int = 0,
                 generator: torch.Generator | None = None, return_probabilities: bool = False,
                 draft_missing_reports: bool = True, output_type: str = "np",
                 region: str | Sequence[float] | None = "head_neck", return_dict: bool = True):
        """Contour one CT or a list of CTs.

        Args:
            ct: NIfTI path, DICOM series folder (or `medvlm.data.dicom.DicomSeries`), numpy array / tensor (x, y, z)
                with ``spacing_mm`` or ``affine``, MetaTensor, or a list of these.
            report: report text per CT (de-identified on the way in); ``None`` drafts one with the report
                generator when present, otherwise uses the learned null report (with a warning).
            overlap, sw_batch_size: MONAI sliding-window settings (Gaussian blending).
            thresholds: probability threshold per structure (default: the pipeline's).
            noise_timestep: noise the latent to this timestep before fusion (0: clean latent).
            generator: random source for that noise.
            draft_missing_reports: for a CT without a report, draft one with the report generator (when the
                pipeline has one); ``False`` contours it with the learned null report instead.
            output_type: masks (and probabilities) as ``"np"`` arrays, ``"pt"`` tensors or ``"nifti"``
                (``nibabel`` images in the input's grid, uint8 masks / float32 probabilities).
            region: ``"head_neck"`` (default) finds the neck in a CT of any extent (the axial slices narrower than
                220 mm from left to right above the shoulders, :func:`medvlm.data.inputs.head_neck_region`) and
                contours the ROI's extent there, masks empty elsewhere; a CT with no such slice is an error.
                ``(inferior, superior)``: those millimetres (RAS superior coordinate); ``None``: the whole volume.
        """
        # 1. check inputs
        cts = as_list(ct)
        reports = None if report is None else as_list(report)
        self.check_inputs(cts, reports, overlap, sw_batch_size, noise_timestep, thresholds)
        if output_type not in CONTOUR_OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {CONTOUR_OUTPUT_TYPES}, got {output_type!r}")
        thresholds = list(thresholds if thresholds is not None else self.config.thresholds)
        names = tuple(self.config.structure_names)
        device = self._execution_device

        # 2. preprocess with the MONAI chain (remembering how to invert it)
        config = self.preprocess_config
        prepared = [prepare_ct(c, config, spacing_mm=spacing_mm, affine=affine, what=f"ct[{i}]" if len(cts) > 1 else "ct",
                               region=region)
                    for i, c in enumerate(cts)]

        # 3. reports: given, drafted, or the null report
        texts: list[str | None] = list(reports) if reports is not None else [None] * len(cts)
        sources = ["given" if t is not None else "none" for t in texts]
        warnings: list[list[str]] = [[case.note] if case.note else [] for case in prepared]
        missing = [i for i, t in enumerate(texts) if t is None]
        if missing and draft_missing_reports and self.report_generator is not None and self.report_processor is not None:
            drafted = self._draft_reports([prepared[i] for i in missing])
            for i, text in zip(missing, drafted):
                if text.strip():
                    texts[i], sources[i] = text, "drafted"
                    warnings[i].append("no report given: contoured with a report drafted by the report generator")
        for i in range(len(cts)):
            if texts[i] is None:
                reason = "no report given and none drafted" if self.report_generator is not None else \
                    "no report given and no report generator"
                warnings[i].append(f"{reason}: contoured with the null report; the elective neck side cannot be read "
                                   "from the image alone")

        # 4. sliding-window inference per CT
        all_masks, all_probs, affines, used = [], [], [], []
        for i, case in enumerate(self.progress_bar(prepared)):
            if _flat_body(case.image, config):
                warnings[i].append("the CT's body shows no contrast (its voxels are nearly constant): contours of such a "
                                   "volume mean nothing; check that it is a CT in Hounsfield units")
            fields, processed = None, None
            if texts[i] is not None:  # de-identified and parsed once: prompt, token states, fields and checks
                states, mask, (processed,) = self.encode_reports([texts[i]], device, self.config.max_report_tokens,
                                                                 self.config.report_format)
                fields = self.report_fields([processed], device)
                used.append(processed.model_text(self.config.report_format))
                if not processed.reads_any_field:
                    warnings[i].append("no clinical field (site, side, stage, neck) could be read from the report (another "
                                       "language, or identifiers only?): contoured as with an empty report")
            else:
                states, mask = None, None
                used.append(None)
            probabilities = self._infer(case.image[None].to(device, dtype=self.vae.dtype), states, mask, config,
                                        overlap, sw_batch_size, noise_timestep, generator, fields)
            # 5. back to the input grid, threshold per structure
            restored = case.to_input_grid(probabilities[0])
            masks = {name: restored[c] >= thresholds[c] for c, name in enumerate(names)}
            warnings[i].extend(self._consistency_warnings(masks, case, processed, config))
            all_masks.append(masks)
            all_probs.append(restored.astype(np.float32))
            affines.append(case.input_affine)

        if output_type == "pt":
            all_masks = [{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in m.items()} for m in all_masks]
            all_probs = [torch.from_numpy(p) for p in all_probs]
        elif output_type == "nifti":
            import nibabel as nib

            all_masks = [{k: nib.Nifti1Image(v.astype(np.uint8), a) for k, v in m.items()} for m, a in zip(all_masks, affines)]
            all_probs = [nib.Nifti1Image(np.moveaxis(p, 0, -1), a) for p, a in zip(all_probs, affines)]
        output = ContourPipelineOutput(masks=all_masks, structure_names=names, affines=affines, reports=used,
                                       report_sources=sources, warnings=warnings,
                                       probabilities=all_probs if return_probabilities else None,
                                       dicom_series=[case.dicom for case in prepared])
        self.maybe_free_model_hooks()
        if not return_dict:
            return output.to_tuple()
        return output

    def _infer(self, image: torch.Tensor, states, mask, config: PreprocessConfig, overlap: float, sw_batch_size: int,
               noise_timestep: int, generator, fields: torch.Tensor | None = None) -> torch.Tensor:
        # per-side presence needs each window's distance from the midline of the whole volume: it travels
        # through the sliding window as a second channel (a window alone would find its own centroid)
        sided = states is not None and getattr(self.segmentation, "has_sides", False)
        if sided:
            from medvlm.models.windows import midline_distance

            image = torch.cat([image, midline_distance(image, config.hu_window, config.output_range)], dim=1)

        def predictor(window: torch.Tensor) -> torch.Tensor:
            patch, side_map = (window[:, :1], window[:, 1:]) if sided else (window, None)
            batch = patch.shape[0]
            context = states.expand(batch, -1, -1) if states is not None else None
            context_mask = mask.expand(batch, -1) if mask is not None else None
            skips, _, fused = fused_features(self.vae, self.unet, patch, context, context_mask, timestep=noise_timestep,
                                             scheduler=self.scheduler, generator=generator)
            logits = self.segmentation(fused, skips, context, context_mask, null_report=context is None, image=patch,
                                       report_fields=fields.expand(batch, -1) if fields is not None else None,
                                       side_map=side_map)
            return torch.sigmoid(logits)

        return sliding_window_inference(image, roi_size=tuple(config.roi_size), sw_batch_size=sw_batch_size,
                                        predictor=predictor, overlap=overlap, mode="gaussian")

    @staticmethod
    def _consistency_warnings(masks: dict[str, np.ndarray], case: PreparedCT, report: ProcessedReport | None,
                              config: PreprocessConfig) -> list[str]:
        """E.g. "GTVp found on the right, report says left": the report and the contours disagree."""
        if report is None or "GTVp" not in masks or not masks["GTVp"].any():
            return []
        stated = report.parsed.laterality
        if stated not in ("left", "right"):
            return []
        affine = case.input_affine
        centroid = affine[:3, :3] @ np.argwhere(masks["GTVp"]).mean(axis=0) + affine[:3, 3]
        volume = case.image  # processed grid (RAS), in the model range
        body_threshold = float(map_intensity(BODY_HU, config.hu_window, config.output_range))
        midline = body_midline(volume[0], volume.affine.numpy(), threshold=body_threshold)
        side = "right" if centroid[0] > midline else "left"  # RAS: +x is the patient's right
        if side != stated:
            return [f"GTVp found on the {side}, report says {stated}"]
        return []
