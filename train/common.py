"""Shared training mechanics, written once: accelerate, AdamW, cosine schedule with warm-up, clipping,
accumulation, mixed precision, TensorBoard, progress bar, atomic checkpoints (keep the last K), exact
resume, Ctrl-C checkpoint. A stage subclasses :class:`StageTrainer` and fills in four hooks.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.optimization import get_cosine_schedule_with_warmup
from monai.losses import DiceCELoss, DiceFocalLoss, DiceLoss
from torch import nn

from medvlm.config import MedVLMConfig, StageConfig, config_hash, config_to_dict
from medvlm.errors import ConfigError, MedVLMError
from medvlm.models.base import set_conv3d_layout
from train.data import DeterministicBatches, MixedBatches

logger = logging.getLogger(__name__)
CHECKPOINT_PREFIX = "step_"
COMPLETE_MARKER = "checkpoint.json"


class TrainingError(MedVLMError):
    """A training run that cannot start or continue as asked (the message says what to do)."""


# What each stage's result depends on: its config sections and the stages it loads. A stage is reused
# while its fingerprint (these sections + its upstream stages' fingerprints) is unchanged, so editing the
# segmentation settings retrains segmentation alone, and editing the VAE retrains everything built on it.
# Sections that do not change a result (checkpoint_every, log_every, data.phantom: the data folder is the
# run's identity) are left out.
STAGE_INPUTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "contrastive": (("text", "models.contrastive", "training.contrastive"), ()),
    "vae": (("models.vae", "training.vae"), ()),
    "diffusion": (("text", "models.unet", "training.diffusion"), ("contrastive", "vae")),
    "segmentation": (("text", "models.segmentation", "training.segmentation"), ("contrastive", "vae", "diffusion")),
    "baseline": (("models.baseline", "training.segmentation"), ()),
    "report_generator": (("text", "models.report_generator", "training.report_generator"), ()),
}
_SHARED_INPUTS = ("data.preprocess", "training.seed", "training.mixed_precision", "training.augment")
# settings only the pipelines read when they sample: no stage's result depends on them, so changing one reuses
# every stage and rewrites the pipelines
_SAMPLING_ONLY: dict[str, tuple[str, ...]] = {"models.unet": ("prior_strength",)}


def stage_settings(config: MedVLMConfig, stage: str) -> dict:
    """The configuration values ``stage``'s result depends on (section path -> plain value)."""
    plain = config_to_dict(config)

    def lookup(path: str):
        value = plain
        for key in path.split("."):
            value = value[key]
        return {k: v for k, v in value.items() if k not in _SAMPLING_ONLY[path]} if path in _SAMPLING_ONLY else value

    sections, _ = STAGE_INPUTS[stage]
    return {path: lookup(path) for path in (*_SHARED_INPUTS, *sections)}


def stage_fingerprint(config: MedVLMConfig, stage: str) -> str:
    """Short hash of :func:`stage_settings` and of the upstream stages' fingerprints."""
    import hashlib

    _, upstream = STAGE_INPUTS[stage]
    payload = {"settings": stage_settings(config, stage), "upstream": {u: stage_fingerprint(config, u) for u in upstream}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class StageResult:
    stage: str
    steps: int
    seconds: float
    samples_per_second: float
    final_losses: dict = field(default_factory=dict)
    validation: dict = field(default_factory=dict)
    config_hash: str = ""
    output: str = ""
    fingerprint: str = ""
    settings: dict = field(default_factory=dict)


def make_accelerator(config: MedVLMConfig, output_dir: Path, stage: StageConfig) -> Accelerator:
    cpu = not torch.cuda.is_available()
    precision = config.training.mixed_precision
    if precision == "auto":
        precision = "no" if cpu else "bf16"
    return Accelerator(cpu=cpu, mixed_precision=precision, gradient_accumulation_steps=stage.gradient_accumulation_steps,
                       log_with="tensorboard", project_config=ProjectConfiguration(project_dir=str(output_dir),
                                                                                  logging_dir=str(output_dir / "logs")))


def atomic_directory_swap(staging: Path, target: Path) -> None:
    """Move a finished ``staging`` folder onto ``target`` (the old one is removed only afterwards)."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
    staging.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class StageTrainer:
    """One training stage. Subclasses set ``name`` and implement the hooks:

    * :meth:`setup` builds models and data and returns the *loss module*: an ``nn.Module`` whose
      ``forward(**inputs)`` returns ``(loss, logs)`` and which holds the trainable networks (so that
      accelerate's DDP wrapper sees every forward and synchronises gradients);
    * :meth:`make_inputs` returns the keyword inputs of micro-batch ``index`` (a function of the index);
    * :meth:`validate` (optional) returns metrics; :meth:`export` writes the final artefacts.
    """

    name = "stage"
    settings_name: str | None = None  # the training section to read (default: ``name``)

    def __init__(self, config: MedVLMConfig, data_dir: str | Path, output_dir: str | Path, *, resume: bool = False,
                 train_fraction: float = 1.0):
        self.config = config
        self.data_dir = Path(data_dir)
        self.output_dir = Path(output_dir)
        self.stage_dir = self.output_dir / self.name
        self.resume = resume
        self.train_fraction = train_fraction
        self.stage_config: StageConfig = getattr(config.training, self.settings_name or self.name)
        self.accelerator = make_accelerator(config, self.stage_dir, self.stage_config)
        self.device = self.accelerator.device
        self.checkpoint_objects: list = []  # extra stateful objects saved with checkpoints (EMA, ...)
        self.fingerprint = stage_fingerprint(config, self.name) if self.name in STAGE_INPUTS else ""

    # ------------------------------------------------------------------ hooks
    def setup(self) -> torch.nn.Module:
        raise NotImplementedError

    def make_inputs(self, index: int) -> dict:
        raise NotImplementedError

    def validate(self, step: int) -> dict:
        return {}

    def export(self, folder: Path) -> None:
        raise NotImplementedError

    def after_optimizer_step(self, step: int) -> None:
        """E.g. EMA updates."""

    # ------------------------------------------------------------------ helpers
    def mirror_prob(self, unsupported: str | None = None) -> float:
        """``lateral_mirror`` of this stage, checked; ``unsupported`` says why this stage cannot mirror
        (e.g. it trains on cached features), so a setting that would do nothing is an error, not ignored."""
        section = f"training.{self.settings_name or self.name}.lateral_mirror"
        value = float(self.stage_config.lateral_mirror)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{section} must be a probability in [0, 1], got {value}")
        if value and unsupported:
            raise ConfigError(f"{section} = {value} has no effect here: {unsupported}; set it to 0")
        return value

    def batches(self, cases: Sequence, *, share: float | None = None) -> DeterministicBatches:
        """The stage's batches over its ``cases``; with ``share``, that share of the draws is synthetic (the
        cases' ``synthetic`` flags; :class:`MixedBatches`)."""
        place = {"rank": self.accelerator.process_index, "world_size": self.accelerator.num_processes}
        if share is not None:
            return MixedBatches([case.synthetic for case in cases], share, self.stage_config.batch_size,
                                self.config.training.seed, **place)
        return DeterministicBatches(len(cases), self.stage_config.batch_size, self.config.training.seed, **place)

    def step_generator(self, step: int) -> torch.Generator:
        """Randomness of one step (noise, timesteps, report dropout) from (seed, step): the same on every
        process, so draws are made for the global batch and each process keeps its share (:meth:`share`)."""
        generator = torch.Generator(device="cpu")
        generator.manual_seed(self.config.training.seed * 1_000_003 + step * 101)
        return generator

    def share(self, global_tensor: torch.Tensor) -> torch.Tensor:
        """This process's rows of a tensor drawn for the whole global batch."""
        per_rank = global_tensor.shape[0] // self.accelerator.num_processes
        start = self.accelerator.process_index * per_rank
        return global_tensor[start:start + per_rank]

    def global_rows(self, local_rows: int) -> int:
        return local_rows * self.accelerator.num_processes

    def checkpoints(self) -> list[Path]:
        folder = self.stage_dir / "checkpoints"
        if not folder.is_dir():
            return []
        return sorted((p for p in folder.iterdir() if p.name.startswith(CHECKPOINT_PREFIX)),
                      key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))

    def _memory_format(self, module: torch.nn.Module, training: bool) -> None:
        """Channels-last 3D weights while training (``training.channels_last``), contiguous ones to save."""
        if self.config.training.channels_last:
            set_conv3d_layout(module, channels_last=training)

    def frozen_upstream(self, module: torch.nn.Module) -> torch.nn.Module:
        """An upstream stage's model used here only forward (feature caches, validation): eval mode, no
        gradients, on this process's device. Its weights stay contiguous: channels-last made no measurable
        difference to a single-case forward pass on 2 CPU cores (VAE encode of a 64^3 CT 0.18-0.23 s
        contiguous vs 0.21-0.25 s channels-last), only to training steps, and it changes the float rounding of
        every cached feature."""
        return module.eval().requires_grad_(False).to(self.device)

    def _save_checkpoint(self, step: int, losses: dict) -> None:
        self._memory_format(self.trained, training=False)
        try:
            self._write_checkpoint(step, losses)
        finally:
            self._memory_format(self.trained, training=True)

    def _write_checkpoint(self, step: int, losses: dict) -> None:
        # accelerate saves the state; the naming and rotation are written here rather than with
        # ProjectConfiguration(automatic_checkpoint_naming=True, total_limit=K): that writes straight into
        # checkpoints/checkpoint_<n> (n counts saves, not steps) and deletes the oldest before the new one is
        # complete, so a crash mid-save could leave a partial checkpoint to resume from. Here a checkpoint is
        # staged, marked complete with its step and settings, swapped in atomically, and only then the oldest go.
        self.accelerator.wait_for_everyone()
        folder = self.stage_dir / "checkpoints"
        staging = folder / f".partial-{CHECKPOINT_PREFIX}{step:07d}"
        if self.accelerator.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(staging))
        if self.accelerator.is_main_process:
            (staging / COMPLETE_MARKER).write_text(json.dumps({"step": step, "losses": losses, "fingerprint": self.fingerprint}))
            atomic_directory_swap(staging, folder / f"{CHECKPOINT_PREFIX}{step:07d}")
            for old in self.checkpoints()[: -self.config.training.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def _load_latest(self) -> int:
        candidates = [p for p in self.checkpoints() if (p / COMPLETE_MARKER).is_file()]
        if not candidates:
            logger.info("%s: no checkpoint to resume from; starting at step 0", self.name)
            return 0
        latest = candidates[-1]
        try:
            marker = json.loads((latest / COMPLETE_MARKER).read_text())
            if marker.get("fingerprint", "") != self.fingerprint:
                raise TrainingError(f"checkpoint {latest} was written with other {self.name} settings; pass "
                                    "--retrain-changed to start this stage over with the current ones")
            self.accelerator.load_state(str(latest))
            step = int(marker["step"])
        except TrainingError:
            raise
        except Exception as exc:  # any failure to read a checkpoint is reported the same way
            previous = f"; the previous one, {candidates[-2].name}, is kept: delete {latest.name} to resume from it" \
                if len(candidates) > 1 else ""
            raise TrainingError(f"checkpoint {latest} is corrupted ({type(exc).__name__}){previous}") from None
        logger.info("%s: resumed from %s (step %d)", self.name, latest.name, step)
        return step

    # ------------------------------------------------------------------ the loop
    def run(self) -> StageResult:
        cfg = self.stage_config
        set_seed(self.config.training.seed)
        module = self.setup()
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise TrainingError(f"{self.name}: nothing to train (all parameters frozen)")
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.steps)
        self._memory_format(module, training=True)
        module, optimizer = self.accelerator.prepare(module, optimizer)
        self.trained = module
        self.accelerator.register_for_checkpointing(scheduler)
        for obj in self.checkpoint_objects:
            self.accelerator.register_for_checkpointing(obj)
        start = self._load_latest() if self.resume else 0
        if self.accelerator.is_main_process:
            self.accelerator.init_trackers(self.name, config={"config_hash": config_hash(self.config), "stage": self.name})
        progress = None
        if self.accelerator.is_local_main_process:
            from tqdm.auto import tqdm

            progress = tqdm(total=cfg.steps, initial=start, desc=f"train {self.name}", unit="step")
        losses: dict = {}
        validation: dict = {}
        begin = time.perf_counter()
        step = start
        try:
            for step in range(start, cfg.steps):
                module.train()
                for micro in range(cfg.gradient_accumulation_steps):
                    with self.accelerator.accumulate(module):
                        inputs = self.make_inputs(step * cfg.gradient_accumulation_steps + micro)
                        loss, logs = module(**{k: v.to(self.device) if torch.is_tensor(v) else v for k, v in inputs.items()})
                        self.accelerator.backward(loss)
                        if self.accelerator.sync_gradients and cfg.max_grad_norm > 0:
                            self.accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                self.after_optimizer_step(step)
                losses = {k: float(v) for k, v in logs.items()}
                if not all(math.isfinite(v) for v in losses.values()):
                    raise TrainingError(f"{self.name}: loss is not finite at step {step} ({losses}); lower the learning rate")
                if (step + 1) % self.config.training.log_every == 0 or step + 1 == cfg.steps:
                    self.accelerator.log({**{f"loss/{k}": v for k, v in losses.items()}, "lr": scheduler.get_last_lr()[0]}, step=step + 1)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix({k: f"{v:.4f}" for k, v in list(losses.items())[:2]})
                if (step + 1) % self.config.training.checkpoint_every == 0 and step + 1 < cfg.steps:
                    self._save_checkpoint(step + 1, losses)
            step = cfg.steps
        except KeyboardInterrupt:
            self._save_checkpoint(step, losses)
            logger.warning("%s interrupted: checkpoint written at step %d; continue with --resume", self.name, step)
            raise
        finally:
            if progress is not None:
                progress.close()
        seconds = time.perf_counter() - begin
        module.eval()
        validation = self.validate(cfg.steps)
        self._memory_format(module, training=False)  # exports are written with safetensors
        if validation:
            self.accelerator.log({f"val/{k}": v for k, v in validation.items() if isinstance(v, (int, float))}, step=cfg.steps)
        self.accelerator.wait_for_everyone()
        final = self.stage_dir / "final"
        if self.accelerator.is_main_process:
            staging = Path(tempfile.mkdtemp(prefix=".final-", dir=self.stage_dir))
            self.export(staging)
            atomic_directory_swap(staging, final)
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        done = cfg.steps - start
        samples = done * cfg.batch_size * cfg.gradient_accumulation_steps
        return StageResult(stage=self.name, steps=cfg.steps, seconds=seconds,
                           samples_per_second=samples / max(seconds, 1e-9), final_losses=losses, validation=validation,
                           config_hash=config_hash(self.config), output=str(final), fingerprint=self.fingerprint,
                           settings=stage_settings(self.config, self.name) if self.fingerprint else {})

    def log_slices(self, tag: str, volumes: dict[str, torch.Tensor], step: int) -> None:
        """Write the middle axial slice of each (X, Y, Z) volume (values in [-1, 1] or {0, 1}) to TensorBoard."""
        if not self.accelerator.is_main_process:
            return
        try:
            writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
        except Exception:  # no TensorBoard tracker (e.g. logging disabled): nothing to write
            return
        for name, volume in volumes.items():
            volume = volume.detach().float().cpu()
            axial = volume[..., volume.shape[-1] // 2].T.flip(0)  # anterior up
            shown = ((axial + 1) / 2 if float(axial.min()) < 0 else axial).clamp(0, 1)
            writer.add_image(f"{tag}/{name}", shown[None], global_step=step)

    def unwrap(self, module: torch.nn.Module) -> torch.nn.Module:
        return self.accelerator.unwrap_model(module)



class BestDiceMixin:
    """For stages validated by Dice per structure: validation every ``validate_every`` steps, the best
    weights by mean Dice kept, and those (not the last) exported."""

    best: tuple[float, dict | None] = (-1.0, None)

    def after_optimizer_step(self, step: int) -> None:
        every = self.stage_config.validate_every
        if every > 0 and (step + 1) % every == 0 and step + 1 < self.stage_config.steps:
            self.validate(step + 1)

    @torch.no_grad()
    def validation_dice(self, module: torch.nn.Module, logits_of, step: int, on_prediction=None) -> dict:
        """MONAI ``DiceMetric`` per structure over ``self.validation_cases`` (threshold 0.5 on the sigmoid),
        with ``module`` in eval mode; ``logits_of(number, case)`` gives one case's logits (1, C, X, Y, Z) and
        ``on_prediction(number, case, prediction)`` sees each binary prediction. Then :meth:`record_dice`."""
        from monai.metrics import DiceMetric

        if not self.validation_cases:
            return {}
        was_training = module.training
        module.eval()
        metric = DiceMetric(include_background=True, reduction="mean_batch", ignore_empty=False)
        for number, case in enumerate(self.validation_cases):
            prediction = (torch.sigmoid(logits_of(number, case)) > 0.5).float()
            metric(y_pred=prediction, y=case.label[None].to(self.device))
            if on_prediction is not None:
                on_prediction(number, case, prediction)
        dice = metric.aggregate().cpu().tolist()
        module.train(was_training)
        return self.record_dice(dice, module, step)

    def record_dice(self, dice: list[float], module: torch.nn.Module, step: int) -> dict:
        """Scores per structure and their mean; keeps ``module``'s weights when the mean is the best so far."""
        import copy

        from medvlm.vocabulary import STRUCTURE_NAMES

        scores = {f"dice_{name}": float(value) for name, value in zip(STRUCTURE_NAMES, dice)}
        scores["dice_mean"] = float(sum(dice) / len(dice))
        if scores["dice_mean"] > self.best[0]:
            self.best = (scores["dice_mean"], copy.deepcopy(module.state_dict()))
        self.accelerator.log({f"val/{k}": v for k, v in scores.items()}, step=step)
        return scores

    def restore_best(self, module: torch.nn.Module) -> torch.nn.Module:
        if self.best[1] is not None:
            module.load_state_dict(self.best[1])  # the best validation checkpoint, not the last
        return module


# ----------------------------------------------------------------------------- helpers of several stages
def load_upstream(output_dir: Path, stage: str, component: str) -> Path:
    folder = output_dir / stage / "final" / component
    if not folder.is_dir():
        raise TrainingError(f"stage needs the {stage!r} stage's {component!r}, not found at {folder}; train {stage} first")
    return folder


# smooth_nr=0: a structure absent from every patch of a batch gets no Dice gradient (its Dice loss is 1 whatever the
# prediction). MONAI's default 1e-5 makes it 1 - 1e-5 / (sum of predictions + 1e-5), a reward for driving every
# prediction of that structure to 0 whose gradient grows without bound as they near it.
DICE_SMOOTHING = {"smooth_nr": 0.0, "smooth_dr": 1e-5}


class MultiLabelDiceBCELoss(nn.Module):
    """Dice (sigmoid, per structure over the whole batch) + binary cross-entropy per voxel and structure: the
    ``dice_bce`` loss.

    Written here because MONAI's ``DiceCELoss`` takes its cross-entropy term as a softmax over the channels whenever
    the input has more than one, ``sigmoid=True`` or not (its binary cross-entropy only for one channel): a pull
    between structures at the voxels of any, and no cross-entropy at a voxel outside every structure.
    """

    def __init__(self, lambda_dice: float = 1.0, lambda_ce: float = 1.0):
        super().__init__()
        self.dice = DiceLoss(sigmoid=True, batch=True, **DICE_SMOOTHING)
        self.bce = nn.BCEWithLogitsLoss()
        self.lambda_dice, self.lambda_ce = float(lambda_dice), float(lambda_ce)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.lambda_dice * self.dice(logits, target) + self.lambda_ce * self.bce(logits, target.to(logits.dtype))


def segmentation_loss(settings) -> nn.Module:
    """The multi-label loss of ``training.segmentation`` (sigmoid Dice per structure; structures overlap):
    ``dice_ce`` MONAI's ``DiceCELoss`` (its cross-entropy a softmax over the structures: see
    :class:`MultiLabelDiceBCELoss`), ``dice_bce`` Dice + a binary cross-entropy per structure, ``dice_focal``
    MONAI's ``DiceFocalLoss`` (a sigmoid focal term per structure).

    batch=True: Dice per structure over the whole batch, so a patch without the structure does not floor the loss.
    """
    if settings.loss == "dice_ce":
        return DiceCELoss(sigmoid=True, batch=True, lambda_dice=settings.lambda_dice, lambda_ce=settings.lambda_ce,
                          **DICE_SMOOTHING)
    if settings.loss == "dice_bce":
        return MultiLabelDiceBCELoss(settings.lambda_dice, settings.lambda_ce)
    if settings.loss == "dice_focal":
        return DiceFocalLoss(sigmoid=True, batch=True, lambda_dice=settings.lambda_dice,
                             lambda_focal=settings.lambda_focal, **DICE_SMOOTHING)
    raise ConfigError(f"training.segmentation.loss must be 'dice_ce', 'dice_bce' or 'dice_focal', got {settings.loss!r}")
