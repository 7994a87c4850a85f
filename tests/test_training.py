"""Staged training on accelerate: all stages end to end, exact resume, corrupted checkpoints, 2-process DDP."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from medvlm.config import load_config
from train.cli import main as train_main
from train.cli import run
from train.common import TrainingError, stage_fingerprint
from train.stage_vae import VAETrainer

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from medvlm.config import PhantomDataConfig
    from medvlm.data.writer import write_phantom_dataset

    out = tmp_path_factory.mktemp("tinydata") / "ds"
    config = load_config(TINY).data.phantom
    write_phantom_dataset(out, PhantomDataConfig(**{**config.__dict__, "previews": 0}))
    return out


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    output = tmp_path_factory.mktemp("run") / "tiny"
    run("all", str(TINY), str(tiny_data), str(output))
    return output


def test_all_stages_write_loadable_pipelines_and_a_summary(trained):
    summary = json.loads((trained / "training_summary.json").read_text())
    assert list(summary["stages"]) == ["contrastive", "vae", "diffusion", "segmentation", "baseline", "report_generator"]
    for stage in summary["stages"].values():
        assert stage["steps"] == 6 and stage["seconds"] > 0 and stage["final_losses"]["total"] > 0
        assert stage["config_hash"] == summary["config_hash"]
        assert stage["fingerprint"] == stage_fingerprint(load_config(TINY), stage["stage"])
    assert "dice_mean" in summary["stages"]["segmentation"]["validation"]
    code = ("import sys; from pipelines import ContourPipeline, ReportToCTPipeline, ZeroShotClassificationPipeline, "
            "ReportGenerationPipeline as R; root = sys.argv[1];"
            "[c.from_pretrained(f'{root}/{n}') for c, n in ((ContourPipeline, 'contour'), (ReportToCTPipeline, 'report_to_ct'),"
            "(ZeroShotClassificationPipeline, 'zero_shot'), (R, 'report_generation'))]; print('loaded')")
    result = subprocess.run([sys.executable, "-c", code, str(trained)], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("loaded")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((trained / "segmentation" / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert "loss/total" in events.Tags()["scalars"] and "lr" in events.Tags()["scalars"]
    assert "val/dice_CTVn" in events.Tags()["scalars"]
    assert {"validation/ct", "validation/CTVn_predicted"} <= set(events.Tags()["images"])


def test_vae_scaling_factor_is_set_from_data(trained):
    config = json.loads((trained / "vae" / "final" / "vae" / "config.json").read_text())
    assert config["scaling_factor"] != 1.0 and config["scaling_factor"] > 0


def test_second_run_reuses_finished_stages_and_other_runs_are_refused(trained, tiny_data, tmp_path, capsys):
    before = (trained / "vae" / "final" / "vae" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert train_main(["vae", "--config", str(TINY), "--data", str(tiny_data), "--output", str(trained)]) == 0
    assert "reused" in capsys.readouterr().out
    assert (trained / "vae" / "final" / "vae" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == before
    other = tmp_path / "other.yaml"
    other.write_text(TINY.read_text().replace("seed: 0\n  mixed_precision", "seed: 1\n  mixed_precision"))
    assert train_main(["vae", "--config", str(other), "--data", str(tiny_data), "--output", str(trained)]) == 2
    assert "settings changed" in capsys.readouterr().err  # nothing replaced without --retrain-changed
    assert train_main(["vae", "--config", str(TINY), "--data", str(tmp_path / "other_data"), "--output", str(trained)]) == 2
    assert "different run" in capsys.readouterr().err
    assert (trained / "vae" / "final" / "vae" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == before


def test_stage_fingerprints_follow_what_each_stage_is_built_on():
    from train.common import STAGE_INPUTS, stage_fingerprint

    base = load_config(TINY)
    before = {name: stage_fingerprint(base, name) for name in STAGE_INPUTS}

    def changed_by(edit) -> set[str]:
        config = load_config(TINY)
        edit(config)
        return {name for name in STAGE_INPUTS if stage_fingerprint(config, name) != before[name]}

    assert changed_by(lambda c: setattr(c.training.segmentation, "learning_rate", 0.5)) == {"segmentation", "baseline"}
    assert changed_by(lambda c: setattr(c.models.vae, "latent_channels", 8)) == {"vae", "diffusion", "segmentation"}
    assert changed_by(lambda c: setattr(c.training.contrastive, "steps", 7)) == {"contrastive", "diffusion", "segmentation"}
    assert changed_by(lambda c: setattr(c.training, "checkpoint_every", 3)) == set()  # bookkeeping, not results
    assert changed_by(lambda c: setattr(c.models.unet, "prior_strength", 0.5)) == set()  # read when sampling only
    assert changed_by(lambda c: setattr(c.models.unet, "prior_rank", 4)) == {"diffusion", "segmentation"}
    assert changed_by(lambda c: setattr(c.training, "seed", 5)) == set(STAGE_INPUTS)


def test_changed_settings_retrain_only_that_stage_when_asked(tiny_data, tmp_path, capsys):
    output = tmp_path / "run"
    weights = output / "vae" / "final" / "vae" / "diffusion_pytorch_model.safetensors"
    assert train_main(["vae", "--config", str(TINY), "--data", str(tiny_data), "--output", str(output)]) == 0
    first = weights.read_bytes()
    changed = tmp_path / "changed.yaml"
    text = TINY.read_text()
    start = text.index("  vae: {steps:")
    changed.write_text(text[:start] + text[start:].replace("learning_rate: 0.001,", "learning_rate: 0.002,", 1))
    assert changed.read_text() != text
    capsys.readouterr()

    marker = (output / "run.json").read_bytes()
    assert train_main(["vae", "--config", str(changed), "--data", str(tiny_data), "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert "vae: training.vae" in err and "--retrain-changed" in err and weights.read_bytes() == first
    assert (output / "run.json").read_bytes() == marker  # a refused run changes no file, its marker included
    # a stage built on the changed one is refused until that one is retrained
    assert train_main(["diffusion", "--config", str(changed), "--data", str(tiny_data), "--output", str(output)]) == 2
    assert "built on vae" in capsys.readouterr().err

    assert train_main(["vae", "--config", str(changed), "--data", str(tiny_data), "--output", str(output),
                       "--retrain-changed"]) == 0
    assert "retraining" in capsys.readouterr().out and weights.read_bytes() != first
    summary = json.loads((output / "training_summary.json").read_text())
    assert summary["stages"]["vae"]["fingerprint"] == stage_fingerprint(load_config(changed), "vae")
    assert train_main(["vae", "--config", str(changed), "--data", str(tiny_data), "--output", str(output)]) == 0
    assert "reused" in capsys.readouterr().out


def test_missing_datalist_is_a_clear_error(tmp_path, capsys):
    assert train_main(["vae", "--config", str(TINY), "--data", str(tmp_path / "empty"), "--output", str(tmp_path / "o")]) == 2
    assert "datalist" in capsys.readouterr().err


def _vae_weights(output: Path) -> dict:
    return load_file(str(output / "vae" / "final" / "vae" / "diffusion_pytorch_model.safetensors"))


def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(tiny_data, tmp_path, monkeypatch):
    config = load_config(TINY)
    VAETrainer(config, tiny_data, tmp_path / "straight").run()

    original = VAETrainer.make_inputs
    state = {"raised": False}

    def interrupt_once(self, index):
        if index == 5 and not state["raised"]:
            state["raised"] = True
            raise KeyboardInterrupt
        return original(self, index)

    monkeypatch.setattr(VAETrainer, "make_inputs", interrupt_once)
    with pytest.raises(KeyboardInterrupt):
        VAETrainer(config, tiny_data, tmp_path / "resumed").run()
    assert (tmp_path / "resumed" / "vae" / "checkpoints" / "step_0000005").is_dir()
    VAETrainer(config, tiny_data, tmp_path / "resumed", resume=True).run()
    straight, resumed = _vae_weights(tmp_path / "straight"), _vae_weights(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_channels_last_training_changes_the_weights_layout_not_the_result(tiny_data, tmp_path, monkeypatch):
    """``training.channels_last`` trains with channels-last 3D weights and exports the same VAE (up to float
    rounding) as contiguous training."""
    layouts = []
    original = VAETrainer.make_inputs

    def record_layout(self, index):
        weight = next(p for p in self.vae.parameters() if p.dim() == 5 and p.shape[1] > 1 and p.shape[2] > 1)
        layouts.append(weight.is_contiguous(memory_format=torch.channels_last_3d) and not weight.is_contiguous())
        return original(self, index)

    monkeypatch.setattr(VAETrainer, "make_inputs", record_layout)
    for channels_last in (True, False):
        config = load_config(TINY)
        config.training.channels_last = channels_last
        VAETrainer(config, tiny_data, tmp_path / str(channels_last)).run()
    steps = load_config(TINY).training.vae.steps
    assert layouts == [True] * steps + [False] * steps
    last, contiguous = _vae_weights(tmp_path / "True"), _vae_weights(tmp_path / "False")
    assert last.keys() == contiguous.keys()
    assert all(torch.allclose(last[k], contiguous[k], rtol=1e-3, atol=1e-5) for k in last)


def test_corrupted_checkpoint_is_reported_and_the_previous_one_kept(tiny_data, tmp_path):
    config = load_config(TINY)
    config.training.vae.steps = 10  # checkpoints at steps 4 and 8
    VAETrainer(config, tiny_data, tmp_path / "run").run()
    checkpoints = sorted((tmp_path / "run" / "vae" / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == ["step_0000004", "step_0000008"]
    weights = next(checkpoints[-1].glob("model*.safetensors"))
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(TrainingError, match="step_0000008 is corrupted.*step_0000004, is kept"):
        VAETrainer(config, tiny_data, tmp_path / "run", resume=True).run()
    assert checkpoints[0].is_dir()


@pytest.mark.slow
def test_two_process_ddp_splits_the_batch_and_keeps_ranks_identical(tiny_data, tmp_path):
    launcher = Path(sys.executable).parent / "accelerate"
    config = tmp_path / "ddp.yaml"
    config.write_text(TINY.read_text().replace("vae: {steps: 6, batch_size: 2", "vae: {steps: 3, batch_size: 2"))
    command = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", "29517", str(ROOT / "tests" / "ddp_worker.py"), str(config),
               str(tiny_data), str(tmp_path / "ddp")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    assert ranks[0]["sum"] == ranks[1]["sum"] and ranks[0]["weights"] == ranks[1]["weights"]
    for step in range(3):
        a, b = ranks[0]["seen"][step], ranks[1]["seen"][step]
        assert len(a) == len(b) == 1 and a != b  # each rank takes its half of the global batch of 2
    single = load_config(config)
    trainer = VAETrainer(single, tiny_data, tmp_path / "single")
    trainer.run()
    flat = torch.cat([p.detach().flatten() for p in trainer.unwrap(trainer.vae).parameters()])
    assert torch.allclose(flat[:2000], torch.tensor(ranks[0]["weights"]), atol=1e-5)


def test_segmentation_with_cached_frozen_features_trains_and_validates(trained, tiny_data, tmp_path):
    from medvlm.models.segmentation import fused_features
    from train.stage_segmentation import SegmentationTrainer

    for stage in ("contrastive", "vae", "diffusion"):
        shutil.copytree(trained / stage / "final", tmp_path / stage / "final")
    config = load_config(TINY)
    config.training.segmentation.cache_features = True
    config.training.segmentation.steps = 4
    config.training.segmentation.report_dropout = 0.0  # every row has its report: the presence loss takes part
    trainer = SegmentationTrainer(config, tiny_data, tmp_path)
    result = trainer.run()
    assert result.steps == 4 and result.final_losses["total"] > 0
    # presence targets: every training case, whole (per side of its midline for CTVn); each step draws
    # presence_batch_size of them, the same draw on every process
    from medvlm.models.windows import midline_distance
    from train.data import structure_presence

    margin = trainer.segmentation.config.side_margin
    for case, target in zip(trainer.cases, trainer.presence_pool["present"]):
        assert torch.equal(target, structure_presence(case.label, midline_distance(case.image[None])[0], margin))
    rows = trainer._presence_rows(3)
    assert len(rows["present"]) == min(config.training.segmentation.presence_batch_size, len(trainer.cases))
    assert torch.equal(rows["presence_states"], trainer._presence_rows(3)["presence_states"])
    # the presence head is trained next to the voxel loss (tiny config: presence_head on, weight 1)
    losses = result.final_losses
    assert losses["presence"] > 0 and losses["total"] == pytest.approx(losses["voxel"] + losses["presence"], rel=1e-4)
    assert 0.0 <= result.validation["dice_mean"] <= 1.0
    assert (tmp_path / "segmentation" / "final" / "segmentation" / "diffusion_pytorch_model.safetensors").is_file()
    # each cached patch carries the voxel coordinates of the whole ROI, cut at the patch's corner
    inputs = trainer.make_inputs(2)
    patch = tuple(config.training.segmentation.patch_size)
    assert tuple(inputs["coordinates"].shape) == (len(inputs["labels"]), 3, *patch)
    whole = trainer.coordinates
    assert tuple(whole.shape[1:]) == tuple(trainer.cases[0].image.shape[1:])
    lines = (whole[0, :, 0, 0], whole[1, 0, :, 0], whole[2, 0, 0, :])
    for grid in inputs["coordinates"]:
        corner = [int((lines[axis] - grid[axis, 0, 0, 0]).abs().argmin()) for axis in range(3)]
        assert torch.equal(grid, whole[(slice(None), *(slice(c, c + p) for c, p in zip(corner, patch)))])
    # the frozen upstream VAE and UNet (feature cache, validation) are untrainable and in eval mode
    for frozen in (trainer.vae, trainer.unet):
        assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.training
    # the cache, computed for several cases per forward pass, holds what each case gives alone
    assert trainer.cache_batch > 1 and len(trainer.cache) == len(trainer.cases)
    tokens = trainer.tokenizer([c.prompt for c in trainer.cases], padding=True, truncation=True,
                               max_length=config.text.max_length, return_tensors="pt")
    for number in (0, len(trainer.cases) - 1):
        with torch.no_grad():
            one = {k: v[number:number + 1] for k, v in tokens.items()}
            states = trainer.text_encoder(**one).last_hidden_state
            features, latents, fused = fused_features(trainer.vae, trainer.unet, trainer.cases[number].image[None], states,
                                                      one["attention_mask"])
            fused_null = trainer.unet(latents, 0, None, return_features=True).features[-1]
        entry = trainer.cache[number]
        torch.testing.assert_close(entry["fused"], fused[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(entry["fused_null"], fused_null[0], atol=1e-4, rtol=1e-4)
        for cached, alone in zip(entry["features"], features):
            torch.testing.assert_close(cached, alone[0], atol=1e-4, rtol=1e-4)
        assert torch.equal(entry["mask"], one["attention_mask"][0])
    # validation runs the frozen networks once per validation case: later validations reuse their features
    assert len(trainer._validation_inputs) == len(trainer.validation_cases) > 0
    first = trainer.validate(5)

    def encode_again(*args, **kwargs):
        raise AssertionError("validation encoded a case again")

    trainer.vae.encode = encode_again
    try:
        assert trainer.validate(6) == first
    finally:
        del trainer.vae.encode


def test_image_quality_augmentation_blurs_only_the_training_ct_of_both_contouring_stages(trained, tiny_data, tmp_path):
    """blur_prob / low_resolution_prob: the baseline's and the cached decoder's training images are smoothed (the
    same draw for the same step), their contours and cached features are not; off, the images are untouched."""
    from train.stage_baseline import BaselineTrainer
    from train.stage_segmentation import SegmentationTrainer

    def roughness(images):  # mean absolute difference of neighbouring voxels: what a blur lowers
        return float((images[..., 1:] - images[..., :-1]).abs().mean())

    for stage in ("contrastive", "vae", "diffusion"):
        shutil.copytree(trained / stage / "final", tmp_path / stage / "final")
    made = {}
    for prob in (0.0, 1.0):
        config = load_config(TINY)
        c = config.training.segmentation
        c.cache_features, c.blur_prob, c.blur_sigma = True, prob, (1.0, 1.5)
        for trainer_class in (BaselineTrainer, SegmentationTrainer):
            trainer = trainer_class(config, tiny_data, tmp_path / f"{trainer_class.name}_{prob}")
            if trainer_class is SegmentationTrainer:
                for stage in ("contrastive", "vae", "diffusion"):
                    shutil.copytree(tmp_path / stage, trainer.output_dir / stage)
            trainer.setup()
            made[trainer_class.name, prob] = (trainer.make_inputs(3), trainer.make_inputs(3))
    for name in ("baseline", "segmentation"):
        (sharp, _), (blurred, again) = made[name, 0.0], made[name, 1.0]
        assert torch.equal(blurred["images"], again["images"])  # a function of (seed, step, case)
        assert torch.equal(sharp["labels"], blurred["labels"])  # the same patches; the contours untouched
        assert roughness(blurred["images"]) < 0.8 * roughness(sharp["images"])
        assert blurred["images"].shape == sharp["images"].shape and blurred["images"].dtype == torch.float32
    cached_sharp, cached_blurred = made["segmentation", 0.0][0], made["segmentation", 1.0][0]
    for a, b in zip(cached_sharp["features"], cached_blurred["features"]):
        assert torch.equal(a, b)  # cached features: computed once from the unaugmented CT


def test_mixed_batches_draw_the_synthetic_share_and_every_case_of_a_kind_equally():
    """MixedBatches: over whole epochs, ``share`` of the draws are synthetic cases, each real case is drawn
    once an epoch and the synthetic ones equally often; the draws are a function of (seed, step), split by rank
    like DeterministicBatches'; without synthetic cases it draws as DeterministicBatches does."""
    from collections import Counter

    from train.data import DeterministicBatches, MixedBatches

    flags = [False] * 6 + [True] * 15
    for share in (0.25, 0.5, 0.75):
        batches = MixedBatches(flags, share, 2, seed=3)
        steps = batches.batches_per_epoch * 10
        counts = Counter(i for step in range(steps) for i in batches.indices(step))
        real, synthetic = [counts[i] for i in range(6)], [counts[i] for i in range(6, 21)]
        assert set(real) == {10}  # once an epoch, ten epochs
        assert max(synthetic) - min(synthetic) <= 1  # in turn: none left out, none favoured
        assert abs(sum(synthetic) / (sum(real) + sum(synthetic)) - share) < 0.05
        assert batches.indices(7) == MixedBatches(flags, share, 2, seed=3).indices(7)
        ranks = [MixedBatches(flags, share, 2, seed=3, rank=r, world_size=2).indices(7) for r in (0, 1)]
        assert ranks[0] + ranks[1] == batches.indices(7)
    assert MixedBatches(flags, 0.5, 2, seed=4).indices(0) != MixedBatches(flags, 0.5, 2, seed=3).indices(0) or \
        MixedBatches(flags, 0.5, 2, seed=4).indices(1) != MixedBatches(flags, 0.5, 2, seed=3).indices(1)
    only_real = MixedBatches([False] * 7, 0.5, 2, seed=3)
    plain = DeterministicBatches(7, 2, seed=3)
    assert [only_real.indices(s) for s in range(9)] == [plain.indices(s) for s in range(9)]
    assert set(MixedBatches(flags, 0.0, 2, seed=3).order(0)) == set(range(6))  # share 0: the real cases alone
    with pytest.raises(ValueError, match=r"synthetic share must be in \[0, 1\)"):
        MixedBatches(flags, 1.0, 2, seed=3)


def test_contouring_stages_draw_synthetic_cases_at_the_configured_share(trained, tiny_data, tmp_path):
    """``training.segmentation.synthetic_share``: the segmentation stage and the baseline beside it mark the
    datalist's ``synthetic`` items and draw them at that share; unset, they draw every case equally often."""
    from train.data import MixedBatches
    from train.stage_baseline import BaselineTrainer
    from train.stage_segmentation import SegmentationTrainer

    data = shutil.copytree(tiny_data, tmp_path / "data")
    listing = json.loads((data / "datalist.json").read_text())
    for item in listing["training"][: len(listing["training"]) // 2]:
        item["synthetic"] = {"synthesis": "rendered", "source": "case", "seed": 0}
    (data / "datalist.json").write_text(json.dumps(listing))
    for share, kind, trainer_class in ((0.25, "MixedBatches", SegmentationTrainer),
                                       (0.25, "MixedBatches", BaselineTrainer),
                                       (None, "DeterministicBatches", BaselineTrainer)):
        config = load_config(TINY)
        config.training.segmentation.synthetic_share = share
        trainer = trainer_class(config, data, tmp_path / f"{trainer_class.name}_{share}")
        for stage in ("contrastive", "vae", "diffusion"):
            shutil.copytree(trained / stage / "final", trainer.output_dir / stage / "final")
        trainer.setup()
        flags = [case.synthetic for case in trainer.cases]
        assert sum(flags) == len(listing["training"]) // 2 and not all(flags)
        assert type(trainer.batcher).__name__ == kind
        if share is not None:
            assert isinstance(trainer.batcher, MixedBatches)
            drawn = [i for step in range(trainer.batcher.batches_per_epoch) for i in trainer.batcher.indices(step)]
            assert sum(flags[i] for i in drawn) < sum(not flags[i] for i in drawn)


def test_image_quality_blur_changes_edges_not_the_patch_border():
    """A uniform patch stays uniform under the blur (MONAI's filter alone pads with zeros, brightening the border);
    a step edge is smoothed; each draw is a function of (seed, step, case)."""
    from train.data import ImageQuality

    config = load_config(TINY).training.segmentation
    config.blur_prob, config.blur_sigma = 1.0, (1.0, 1.5)
    quality = ImageQuality(config)
    uniform = torch.full((1, 1, 12, 12, 12), -0.8)
    torch.testing.assert_close(quality(uniform, 0, 1, [0]), uniform, atol=1e-3, rtol=0)  # zero padding: 0.3
    step = torch.full((2, 1, 12, 12, 12), -1.0)
    step[:, :, 6:] = 0.0
    blurred = quality(step, 0, 1, [0, 1])
    assert -1.0 < float(blurred[0, 0, 5, 6, 6]) < float(blurred[0, 0, 6, 6, 6]) < 0.0
    assert torch.equal(blurred, quality(step, 0, 1, [0, 1])) and not torch.equal(blurred[0], quality(step, 0, 2, [0, 1])[0])


def test_aligned_patches_cut_every_scale_at_the_same_place():
    from train.data import aligned_corner, cut_patch

    full = torch.arange(64 ** 3, dtype=torch.float32).reshape(1, 64, 64, 64)
    quarter = torch.nn.functional.avg_pool3d(full[None], 4)[0]  # a map on the latent grid (factor 4)
    corners = {tuple(aligned_corner((64, 64, 64), (32, 32, 32), 4, (0, step, 3))) for step in range(20)}
    assert len(corners) > 1 and all(c % 4 == 0 and 0 <= c <= 32 for corner in corners for c in corner)
    assert aligned_corner((64, 64, 64), (32, 32, 32), 4, (0, 5, 3)) == aligned_corner((64, 64, 64), (32, 32, 32), 4, (0, 5, 3))
    for corner in corners:
        patch = cut_patch(full, corner, (32, 32, 32), 64)
        assert patch.shape == (1, 32, 32, 32)
        assert torch.allclose(cut_patch(quarter, corner, (32, 32, 32), 64), torch.nn.functional.avg_pool3d(patch[None], 4)[0])


def test_foreground_patches_hold_a_structure_of_the_case_and_zero_keeps_uniform_corners():
    from train.data import aligned_corner

    label = torch.zeros(3, 64, 64, 64)
    label[1, 50:53, 10:13, 40:43] = 1  # two small structures in opposite corners; structure 0 absent
    label[2, 4:7, 57:60, 60:63] = 1
    held = set()
    for step in range(40):
        corner = aligned_corner((64, 64, 64), (32, 32, 32), 4, (0, step, 7), label, 1.0)
        assert all(c % 4 == 0 and 0 <= c <= 32 for c in corner)
        window = label[(slice(None), *(slice(c, c + 32) for c in corner))]
        # the whole small structure lies inside (centred on one of its voxels, snapped to the grid)
        inside = [k for k in (1, 2) if window[k].sum() == label[k].sum()]
        assert inside, corner
        held.update(inside)
    assert held == {1, 2}  # both present structures are drawn
    uniform = [aligned_corner((64, 64, 64), (32, 32, 32), 4, (0, step, 7)) for step in range(40)]
    assert [aligned_corner((64, 64, 64), (32, 32, 32), 4, (0, step, 7), label, 0.0) for step in range(40)] == uniform
    # an empty label falls back to the uniform corner
    assert aligned_corner((64, 64, 64), (32, 32, 32), 4, (0, 3, 7), torch.zeros(3, 64, 64, 64), 1.0) == uniform[3]
    # about half of the patches are centred with 0.5
    centred = sum(aligned_corner((64, 64, 64), (32, 32, 32), 4, (0, s, 7), label, 0.5) != uniform[s] for s in range(40))
    assert 8 <= centred <= 32


def test_segmentation_loss_is_chosen_by_name_and_a_wrong_name_is_a_config_error():
    from monai.losses import DiceCELoss, DiceFocalLoss

    from medvlm.config import SegmentationStageConfig
    from medvlm.errors import ConfigError
    from train.common import MultiLabelDiceBCELoss, segmentation_loss

    assert isinstance(segmentation_loss(SegmentationStageConfig()), DiceCELoss)
    assert isinstance(segmentation_loss(SegmentationStageConfig(loss="dice_bce")), MultiLabelDiceBCELoss)
    assert isinstance(segmentation_loss(SegmentationStageConfig(loss="dice_focal")), DiceFocalLoss)
    with pytest.raises(ConfigError, match="dice_ce"):
        segmentation_loss(SegmentationStageConfig(loss="focal"))


def test_dice_bce_is_a_sigmoid_dice_plus_a_binary_cross_entropy_per_structure():
    """``dice_bce``: the cross-entropy is binary per voxel and structure (MONAI's DiceCELoss takes a softmax over
    the channels), so a voxel outside every structure is pushed down; weights apply per term."""
    from monai.losses import DiceLoss

    from medvlm.config import SegmentationStageConfig
    from train.common import segmentation_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 6, 6, 6)
    target = (torch.rand(2, 3, 6, 6, 6) > 0.7).float()
    target[:, 2] = target[:, 1]  # two structures on the same voxels
    loss = segmentation_loss(SegmentationStageConfig(loss="dice_bce", lambda_dice=0.5, lambda_ce=2.0))
    dice = DiceLoss(sigmoid=True, batch=True, smooth_nr=0.0, smooth_dr=1e-5)(logits, target)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    assert float(loss(logits, target)) == pytest.approx(float(0.5 * dice + 2.0 * bce), rel=1e-5)
    outside = torch.zeros(1, 3, 4, 4, 4, requires_grad=True)  # no structure anywhere: every logit pushed down
    segmentation_loss(SegmentationStageConfig(loss="dice_bce", lambda_dice=0.0))(outside, torch.zeros(1, 3, 4, 4, 4)).backward()
    assert (outside.grad > 0).all()
    softmax = torch.zeros(1, 3, 4, 4, 4, requires_grad=True)  # dice_ce: MONAI's softmax cross-entropy leaves them alone
    segmentation_loss(SegmentationStageConfig(lambda_dice=0.0))(softmax, torch.zeros(1, 3, 4, 4, 4)).backward()
    assert float(softmax.grad.abs().max()) == 0.0


@pytest.mark.parametrize("name", ["dice_ce", "dice_bce", "dice_focal"])
def test_a_structure_absent_from_a_batch_is_not_driven_ever_lower_by_the_dice_term(name):
    """A batch without a structure (the brainstem in most patches): as its logits fall, the pull on them does
    not grow (MONAI's default Dice smoothing rewards driving them to -inf, its gradient growing as they fall)."""
    from monai.losses import DiceLoss

    from medvlm.config import SegmentationStageConfig
    from train.common import segmentation_loss

    target = torch.zeros(4, 3, 12, 12, 12)
    target[:, 0, 2:5, 2:5, 2:5] = 1.0  # structure 0 present, structures 1 and 2 absent from the whole batch

    def pull_on_the_absent(loss, level):
        logits = torch.full(target.shape, level, requires_grad=True)
        loss(logits, target).backward()
        return float(logits.grad[:, 1].abs().sum())

    ours = segmentation_loss(SegmentationStageConfig(loss=name))
    assert pull_on_the_absent(ours, -20.0) <= pull_on_the_absent(ours, -12.0) + 1e-9
    default = DiceLoss(sigmoid=True, batch=True)
    assert pull_on_the_absent(default, -20.0) > 10 * pull_on_the_absent(default, -12.0)


def test_diffusion_on_cached_latents_matches_encoding_every_step(trained, tiny_data, tmp_path):
    """Without augmentation, cached latents and token states give the loss that encoding every step gives
    (same noise, timesteps, report dropout and UNet weights); padding to the longest prompt of all cases
    instead of the batch's changes nothing."""
    from train.stage_diffusion import DiffusionTrainer

    for stage in ("contrastive", "vae"):
        shutil.copytree(trained / stage / "final", tmp_path / stage / "final")
    losses = {}
    for cached in (False, True):
        config = load_config(TINY)
        config.training.augment = False
        config.training.diffusion.cache_latents = cached
        torch.manual_seed(0)  # the same initial UNet
        trainer = DiffusionTrainer(config, tiny_data, tmp_path)
        loss_module = trainer.setup().eval()
        inputs = trainer.make_inputs(3)
        assert ("latents" in inputs) == cached and ("images" in inputs) != cached
        with torch.no_grad():
            losses[cached] = float(loss_module(**inputs)[0])
    assert losses[True] > 0
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_snr_weighting_clips_the_easy_low_noise_steps_and_keeps_or_lowers_the_noisiest():
    """``clipped`` keeps v-prediction's own weight where SNR + 1 <= gamma + 1 (the noisiest steps) and lowers the
    low-noise steps to (gamma + 1) / (SNR + 1); Min-SNR lowers the noisiest steps to SNR / (SNR + 1) as well;
    with epsilon-prediction Min-SNR is min(SNR, gamma) / SNR."""
    from diffusers.training_utils import compute_snr

    from medvlm.models.factory import training_scheduler
    from train.stage_diffusion import snr_weights

    v = training_scheduler(1000, "v_prediction")
    t = torch.tensor([0, 400, 999])
    snr = compute_snr(v, t)
    assert snr[0] > 100 and snr[2] < 0.05  # the schedule's ends, as the weights below assume
    clipped = snr_weights(v, t, "clipped", 5.0)
    assert float(clipped[2]) == pytest.approx(1.0)
    assert float(clipped[0]) == pytest.approx(6.0 / (float(snr[0]) + 1.0), rel=1e-5)
    assert float(clipped[1]) == pytest.approx(min(1.0, 6.0 / (float(snr[1]) + 1.0)), rel=1e-5)
    min_snr = snr_weights(v, t, "min_snr", 5.0)
    assert float(min_snr[2]) == pytest.approx(float(snr[2]) / (float(snr[2]) + 1.0), rel=1e-5)
    assert float(min_snr[0]) == pytest.approx(5.0 / (float(snr[0]) + 1.0), rel=1e-5)
    epsilon = training_scheduler(1000, "epsilon")
    weights = snr_weights(epsilon, t, "min_snr", 5.0)
    assert float(weights[2]) == pytest.approx(1.0)
    assert float(weights[0]) == pytest.approx(5.0 / float(compute_snr(epsilon, t)[0]), rel=1e-5)


def test_snr_weighted_diffusion_loss_is_the_weighted_mean_of_per_sample_errors(trained, tiny_data, tmp_path):
    """With ``snr_weighting`` the stage's loss is each sample's MSE times its timestep's weight, averaged (so, at
    one timestep for the whole batch, the weight times the unweighted MSE, which is logged beside it)."""
    from train.stage_diffusion import DiffusionTrainer, snr_weights

    for stage in ("contrastive", "vae"):
        shutil.copytree(trained / stage / "final", tmp_path / stage / "final")
    config = load_config(TINY)
    config.training.augment = False
    config.training.diffusion.snr_weighting = "min_snr"
    torch.manual_seed(0)
    trainer = DiffusionTrainer(config, tiny_data, tmp_path)
    loss_module = trainer.setup().eval()
    inputs = trainer.make_inputs(2)
    for step in (5, 990):
        inputs["timesteps"] = torch.full_like(inputs["timesteps"], step)
        with torch.no_grad():
            loss_module.snr_weighting = "min_snr"
            loss, logs = loss_module(**inputs)
            loss_module.snr_weighting = None
            plain, _ = loss_module(**inputs)
        weight = float(snr_weights(trainer.scheduler, inputs["timesteps"][:1], "min_snr", 5.0)[0])
        assert float(logs["mse"]) == pytest.approx(float(plain), rel=1e-5)
        assert float(loss) == pytest.approx(weight * float(plain), rel=1e-4)
    assert weight == pytest.approx(1.0)  # epsilon-prediction: the noisiest steps keep their weight


def test_cached_diffusion_latents_hold_each_cases_mirror_image_drawn_per_step(trained, tiny_data, tmp_path):
    """lateral_mirror with cached latents: rows N..2N-1 are the mirror images (the structure channels flipped
    left-right and the prompt's side swapped), drawn per step with the collate's seeded probability."""
    from train.data import mirror_case
    from train.stage_diffusion import DiffusionTrainer, generation_latents

    for stage in ("contrastive", "vae"):
        shutil.copytree(trained / stage / "final", tmp_path / stage / "final")
    config = load_config(TINY)
    config.training.diffusion.lateral_mirror = 0.5
    trainer = DiffusionTrainer(config, tiny_data, tmp_path)
    trainer.setup()
    n = len(trainer.cases)
    assert trainer.cache["latents"].shape[0] == 2 * n
    with torch.no_grad():
        mirrored = generation_latents(trainer.vae, mirror_case(trainer.cases[0]).image[None],
                                      mirror_case(trainer.cases[0]).label[None])[0]
    assert torch.allclose(trainer.cache["latents"][n], mirrored, atol=1e-5)
    assert not torch.allclose(trainer.cache["latents"][n], trainer.cache["latents"][0], atol=1e-3)
    drawn = [trainer.make_inputs(step)["latents"] for step in range(8)]
    rows = {tuple(r.flatten()[:4].tolist()) for batch in drawn for r in batch}
    mirrors = {tuple(r.flatten()[:4].tolist()) for r in trainer.cache["latents"][n:]}
    assert rows & mirrors and rows - mirrors  # both the cases and their mirror images are drawn


def test_canonical_side_diffusion_learns_every_lateralised_case_in_one_side(trained, tiny_data, tmp_path):
    """models.unet.canonical_side: a right-sided case is cached as its mirror image (CT, structures, words and
    fields), left-sided cases as they are, and the lateral mirror draws only cases without a side."""
    from medvlm.data.laterality import side_of_labels
    from train.data import has_side, mirror_case
    from train.stage_diffusion import DiffusionTrainer, generation_latents

    for stage in ("contrastive", "vae"):
        shutil.copytree(trained / stage / "final", tmp_path / stage / "final")
    config = load_config(TINY)
    config.models.unet.canonical_side = "left"
    config.training.diffusion.lateral_mirror = 0.5
    original = load_config(TINY)
    reference = DiffusionTrainer(original, tiny_data, tmp_path / "reference")
    for stage in ("contrastive", "vae"):
        shutil.copytree(trained / stage / "final", tmp_path / "reference" / stage / "final")
    reference.setup()
    sides = [side_of_labels(c.labels)[0] for c in reference.cases]
    assert "left" in sides and "right" in sides, "the check needs cases of both sides"
    trainer = DiffusionTrainer(config, tiny_data, tmp_path)
    trainer.setup()
    assert trainer.unet.config.canonical_side == "left"
    n = len(trainer.cases)
    cached_sides = side_of_labels(trainer.cache["fields"][:n])
    assert "right" not in cached_sides and cached_sides.count("left") == sides.count("left") + sides.count("right")
    assert all("right" not in c.prompt.lower() or not has_side(c) for c in trainer.cases)
    first_right = sides.index("right")
    with torch.no_grad():
        flipped = mirror_case(reference.cases[first_right])
        expected = generation_latents(trainer.vae, flipped.image[None], flipped.label[None])[0]
    assert torch.allclose(trainer.cache["latents"][first_right], expected, atol=1e-5)
    drawn = {int(i) for step in range(16) for i in trainer.batcher.indices(step)}
    assert drawn  # the batches index cases; a mirror row (>= n) is only ever drawn for a case without a side
    for step in range(16):
        rows = trainer.make_inputs(step)["latents"]
        for row in rows:
            matches = [j for j in range(2 * n) if torch.equal(trainer.cache["latents"][j], row)]
            assert matches and all(j < n or not has_side(trainer.cases[j - n]) for j in matches)


def test_data_efficiency_sweep_trains_per_fraction_reuses_finished_ones_and_reports_relative_dice(trained, tiny_data, tmp_path):
    from eval.data_efficiency import plot, sweep, table

    out = tmp_path / "efficiency"
    results = sweep(trained, tiny_data, out, config=TINY, fractions=(1.0, 0.5), steps=2)
    assert sorted(results["fractions"]) == [0.5, 1.0] and results["steps"] == 2
    assert results["fractions"][0.5]["cases"] < results["fractions"][1.0]["cases"]
    assert all(v == pytest.approx(1.0) for v in results["relative"][1.0].values() if v == v)  # nan when Dice is 0
    for fraction in ("0.5", "1"):
        assert (out / f"fraction_{fraction}" / "vae" / "final").is_symlink()  # frozen stages shared, not copied
    decoder = out / "fraction_0.5" / "segmentation" / "final" / "segmentation" / "diffusion_pytorch_model.safetensors"
    written = decoder.stat().st_mtime_ns
    again = sweep(trained, tiny_data, out, config=TINY, fractions=(0.5, 1.0), steps=2)
    assert decoder.stat().st_mtime_ns == written and again["fractions"] == results["fractions"]
    assert "| 50 % |" in table(results) and plot(results, out / "curve.png").stat().st_size > 0
    with pytest.raises(ValueError, match="fractions"):
        sweep(trained, tiny_data, out, config=TINY, fractions=(0.0,))


def test_augmentation_utility_trains_on_real_and_on_real_plus_synthetic_cases(trained, tiny_data, tmp_path, monkeypatch):
    from eval.augmentation_utility import decision_cases, evaluate, summary, table
    from medvlm.data.datalist import load_datalist
    from medvlm.data.io import load_labels

    out = tmp_path / "augmentation"
    monkeypatch.chdir(tiny_data.parent)  # a relative data folder, as on the command line
    source = load_datalist(tiny_data)
    results = evaluate(trained, Path(tiny_data.name), out, config=TINY, real=2, synthetic=3, steps=2,
                       synthesis=["text", "rendered"], score_on=("decision", "test"), synthetic_share=0.5)
    assert results["real"]["cases"] == 2 and results["real + text"]["cases"] == 5 and results["synthetic_share"] == 0.5
    # an edited real case's lesions are checked in its image (a whole generated case has no real lesion to compare)
    assert "lesions" not in results["real + text"] and set(results["real + rendered"]["lesions"]) == {"GTVp", "GTVn"}
    assert all(0.0 <= v <= 1.0 for row in ("real", "real + text") for split in ("decision", "test")
               for v in results[row][split]["dice"].values())
    augmented = load_datalist(out / "real_plus_text" / "data")
    assert len(augmented["training"]) == 5 and len(augmented["test"]) == len(source["test"])
    # the synthetic cases stay marked as such, so that the decoder can draw them at the synthetic share
    assert ["synthetic" in item for item in augmented["training"]] == [False, False, True, True, True]
    # the decision split: training cases after the real set, none of them trained on or prompted with
    decision = load_datalist(out / "decision_split")["test"]
    assert [i["image"] for i in decision] == [str(Path(i["image"]).resolve()) for i in source["training"][2:]]
    assert not {i["image"] for i in decision} & {i["image"] for i in augmented["training"]}
    assert decision_cases(source, 2, count=1) == source["training"][2:3]
    with pytest.raises(ValueError, match="decision split"):
        decision_cases(source, len(source["training"]))
    masks, _, names = load_labels(out / "synthetic_text" / "synthetic_002" / "labels.nii.gz")
    assert "CTVn" in names and masks.shape[0] == len(names)
    # the third synthetic case reuses the first real report (prompts cycle over the real set only)
    assert augmented["training"][4]["report"] == augmented["training"][0]["report"]
    assert "| difference (text) |" in table(results) and "decision split" in table(results, "decision")
    assert set(results["real"]["test"]["structures"]) == set(names)  # per structure, for the nine-structure mean
    for split in ("decision", "test"):
        overview, rows = summary({2: [results, results]}, split)
        gain = (np.mean(list(results["real + text"][split]["structures"].values()))
                - np.mean(list(results["real"][split]["structures"].values())))
        assert "| 2 | text | 2 |" in overview and f"{split} split" in overview
        assert rows[0]["target"] == ">= +0.03" and rows[0]["value"] == pytest.approx(gain)
        assert rows[0]["met"] == (gain >= 0.03) and rows[1]["target"] == ">= -0.01" and rows[0]["spread"] == 0.0
    with pytest.raises(ValueError, match="score_on"):
        evaluate(trained, Path(tiny_data.name), out, config=TINY, real=2, synthetic=3, steps=2, score_on=("validation",))
    with pytest.raises(ValueError, match="synthesis"):
        evaluate(trained, Path(tiny_data.name), out, config=TINY, real=2, synthetic=3, steps=2, synthesis=["mixup"])
    with pytest.raises(ValueError, match="synthetic_share"):
        evaluate(trained, Path(tiny_data.name), out, config=TINY, real=2, synthetic=3, steps=2, synthetic_share=1.0)


def test_cases_with_and_without_a_report_share_a_batch(tiny_data, tmp_path):
    """A datalist may hold cases without a report (nor a record): each reads as every field unknown, and batches
    mixing them with reported cases stack (they did not: a 1-long vector against the fields' 39)."""
    from medvlm.data.datalist import load_datalist
    from medvlm.text.parse import LABEL_NAMES
    from train.data import collate, load_cases, report_fields

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    raw = json.loads((data / "datalist.json").read_text())
    raw["training"] = raw["training"][:2]
    raw["training"][1].pop("report", None)
    raw["training"][1].pop("record", None)
    (data / "datalist.json").write_text(json.dumps(raw))
    assert "report" not in load_datalist(data)["training"][1]
    cases = load_cases(data, load_config(TINY))
    assert cases[1].report == "" and cases[1].labels.shape == cases[0].labels.shape == (len(LABEL_NAMES),)
    assert cases[0].labels.any() and not cases[1].labels.any()
    batch = collate(cases, [0, 1], None, seed=0, epoch=0)
    assert batch["labels"].shape == (2, len(LABEL_NAMES))
    fields = report_fields(batch["labels"], len(LABEL_NAMES))
    assert fields[0].any() and not fields[1].any()


def test_lesion_synthesis_keeps_the_real_case_but_its_tumour_and_nodes(trained, tiny_data, tmp_path):
    """``--synthesis lesions``: a synthetic case is a real one with GTVp and GTVn regenerated for its report; its
    other structures are the real case's (the CT pasted outside the lesions is tested with the pipeline's
    ``keep_structures`` in tests/test_pipelines.py; the tiny untrained generator draws lesions everywhere)."""
    from eval.augmentation_utility import LESIONS, synthesise
    from medvlm.data.datalist import load_datalist
    from medvlm.data.io import load_labels, load_nifti
    from medvlm.errors import InputError

    def kept_but_the_elective_target(masks, real, names):  # the CTVn grown only to hold the new nodes
        nodes, target = masks[names.index("GTVn")] > 0, masks[names.index("CTVn")] > 0
        near = torch.nn.functional.max_pool3d(torch.as_tensor(nodes)[None, None].float(), 5, stride=1,
                                              padding=2)[0, 0].numpy() > 0  # within 2 voxels (the margin is 5 mm, a voxel 6 mm)
        grown = target & ~(real[names.index("CTVn")] > 0)
        assert target[nodes].all() and not grown[~near].any() and target[real[names.index("CTVn")] > 0].all()
        for c, name in enumerate(names):
            if name not in LESIONS + ("CTVn",):
                assert np.array_equal(masks[c], real[c]), name

    items = load_datalist(tiny_data)["training"][:2]
    written = synthesise(Path(trained), items, 2, tmp_path / "synthetic", steps=3, synthesis="lesions")
    regenerated = []
    for item, source in zip(written, items):
        masks, _, names = load_labels(item["label"])
        real, _, real_names = load_labels(source["label"])
        real = real[[real_names.index(n) for n in names]]
        kept_but_the_elective_target(masks, real, names)
        regenerated += [not np.array_equal(masks[names.index(n)], real[names.index(n)]) for n in LESIONS]
        assert item["report"] == source["report"]
    assert any(regenerated)  # the lesions are the generator's, not the real case's
    primary = synthesise(Path(trained), items, 1, tmp_path / "primary", steps=3, synthesis="primary")
    masks, _, names = load_labels(primary[0]["label"])
    real, _, real_names = load_labels(items[0]["label"])
    assert all(np.array_equal(masks[c], real[real_names.index(n)]) for c, n in enumerate(names) if n != "GTVp")
    rendered = synthesise(Path(trained), items, 2, tmp_path / "rendered", steps=3, synthesis="rendered")
    kept_real = []
    for item, source, number in zip(rendered, items, range(2)):  # the lesions drawn into the real CT
        masks, _, names = load_labels(item["label"])
        real, _, real_names = load_labels(source["label"])
        real = real[[real_names.index(n) for n in names]]
        kept_but_the_elective_target(masks, real, names)
        lesions = [names.index(n) for n in LESIONS]
        around = torch.nn.functional.max_pool3d(torch.as_tensor(np.concatenate([masks[lesions], real[lesions]]).any(0))
                                                [None, None].float(), 3, stride=1, padding=1)[0, 0].numpy() > 0
        image, source_ct = load_nifti(item["image"])[0], load_nifti(source["image"])[0]
        assert np.allclose(image[~around], source_ct[~around], atol=0.5)  # the real CT outside, to the stored HU
        keep_out = (source_ct > 300) | real[[names.index(n) for n in ("SpinalCord", "Brainstem", "Bone_Mandible")]].any(0)
        assert not (masks[lesions].any(0) & keep_out).any()  # no new lesion in bone, cord, brainstem or mandible
        assert item["synthetic"]["seed"] in (number, number + 2, number + 4, number + 6)  # a retry: seed + count
        for n in LESIONS:  # each lesion exactly when the report states it; one no try drew stays the real case's
            k = names.index(n)
            assert masks[k].any() == real[k].any(), n
            if n in item["synthetic"].get("real_lesions", ()):
                assert np.array_equal(masks[k], real[k]) and np.allclose(image[real[k] > 0], source_ct[real[k] > 0], atol=0.5)
                if n == "GTVn":  # real nodes: the real elective target, not grown
                    assert np.array_equal(masks[names.index("CTVn")], real[names.index("CTVn")])
        kept_real.append(item["synthetic"].get("real_lesions", []))
        assert (tmp_path / "rendered" / f"synthetic_{number:03d}" / "seed.txt").read_text().split() == [
            str(item["synthetic"]["seed"]), *kept_real[-1]]
    again = synthesise(Path(trained), items, 2, tmp_path / "rendered", steps=3, synthesis="rendered")
    assert again == rendered  # reused: seed and kept lesions read back
    (tmp_path / "rendered" / "synthetic_001" / "seed.txt").write_text("3\nParotid_L\n")  # not a lesion it regenerates
    with pytest.raises(InputError, match="synthetic_001/seed.txt: expected the case's generator seed"):
        synthesise(Path(trained), items, 2, tmp_path / "rendered", steps=3, synthesis="rendered")
    kept_nodes = synthesise(Path(trained), items, 1, tmp_path / "rendered-primary", steps=3, synthesis="rendered-primary")
    masks, _, names = load_labels(kept_nodes[0]["label"])
    real, _, real_names = load_labels(items[0]["label"])
    node = real[real_names.index("GTVn")] > 0
    assert np.array_equal(masks[names.index("GTVn")], real[real_names.index("GTVn")])  # the real nodes kept
    assert np.allclose(load_nifti(kept_nodes[0]["image"])[0][node], load_nifti(items[0]["image"])[0][node], atol=0.5)
    text = synthesise(Path(trained), items, 1, tmp_path / "text", steps=3, synthesis="text")  # no structure kept
    assert not all(np.array_equal(a, b) for a, b in zip(load_labels(text[0]["label"])[0], load_labels(written[0]["label"])[0]))
    with pytest.raises(ValueError, match="synthesis must be one of"):
        synthesise(Path(trained), items, 1, tmp_path / "other", synthesis="mixup")


def test_augment_writes_the_source_datalist_plus_synthetic_cases_and_continues(trained, tiny_data, tmp_path, capsys):
    """``medvlm augment``: every source case kept (paths absolute), synthetic cases in training with their
    provenance; a rerun of the same command reuses the finished cases; bad options are refused."""
    from medvlm.cli import main
    from medvlm.data.datalist import load_datalist
    from medvlm.data.io import load_labels

    out = tmp_path / "augmented"
    argv = ["augment", "--pipeline", str(trained / "report_to_ct"), "--data", str(tiny_data), "--out", str(out),
            "--cases", "2", "--per-case", "1.5", "--steps", "2"]
    assert main(argv) == 0 and "train segmentation" in capsys.readouterr().out
    source, augmented = load_datalist(tiny_data), load_datalist(out)
    assert augmented["validation"] == source["validation"] and augmented["test"] == source["test"]
    real, synthetic = augmented["training"][:len(source["training"])], augmented["training"][len(source["training"]):]
    assert real == source["training"] and len(synthetic) == 3  # round(1.5 * 2)
    assert [s["synthetic"]["source"] for s in synthetic] == [source["training"][i]["id"] for i in (0, 1, 0)]
    # case n: seed n, or n + 3 per retry until its lesions are the source's (the default, rendered)
    assert [s["synthetic"]["seed"] % 3 for s in synthetic] == [0, 1, 2] and synthetic[2]["report"] == source["training"][0]["report"]
    assert all(s["synthetic"]["synthesis"] == "rendered" for s in synthetic)
    masks, _, names = load_labels(synthetic[0]["label"])
    kept = [n for n in names if n not in ("GTVp", "GTVn")]
    real_masks, _, real_names = load_labels(source["training"][0]["label"])
    assert all(np.array_equal(masks[names.index(n)], real_masks[real_names.index(n)]) for n in kept)
    written = Path(synthetic[0]["image"]).stat().st_mtime_ns
    assert main(argv) == 0 and Path(synthetic[0]["image"]).stat().st_mtime_ns == written  # reused, not regenerated
    assert main(argv[:-1] + ["0"]) == 2 and "--steps" in capsys.readouterr().err


def test_lesion_synthesis_takes_a_case_off_the_model_grid_through_the_preprocessing(trained, tiny_data, tmp_path):
    """A source CT in another orientation is brought to the pipeline's grid as in training (RAS, spacing, body
    crop, centre crop); labels missing a kept structure are refused by name."""
    import nibabel as nib

    from medvlm.data.datalist import load_datalist
    from medvlm.data.io import load_labels, load_nifti, save_labels, save_nifti
    from medvlm.errors import InputError
    from pipelines import ReportToCTPipeline
    from pipelines.augment import source_case

    pipe = ReportToCTPipeline.from_pretrained(trained / "report_to_ct")
    item = load_datalist(tiny_data)["training"][0]
    ct, affine = load_nifti(item["image"])
    labels, _, names = load_labels(item["label"])
    on_grid = source_case(pipe, item)
    assert np.array_equal(on_grid[0], ct) and on_grid[1].shape == (len(pipe.config.structure_names), *ct.shape)
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = ct.shape[0] - 1
    lps_affine = affine @ flip  # the same patient stored left-to-right (LAS)
    save_nifti(tmp_path / "ct.nii.gz", ct[::-1], lps_affine)
    save_labels(tmp_path / "labels.nii.gz", labels[:, ::-1], lps_affine, names)
    moved = {"image": tmp_path / "ct.nii.gz", "label": tmp_path / "labels.nii.gz", "id": "las"}
    image, masks, moved_affine = source_case(pipe, moved)
    assert nib.aff2axcodes(moved_affine) == ("R", "A", "S") and image.shape == tuple(pipe.preprocess_config.roi_size)
    ordered = labels[[names.index(n) for n in pipe.config.structure_names]]
    assert masks.sum(axis=(1, 2, 3)).tolist() == ordered.sum(axis=(1, 2, 3)).tolist()  # every contour voxel kept
    save_labels(tmp_path / "partial.nii.gz", labels[:2], affine, names[:2])
    with pytest.raises(InputError, match="no channel for"):
        source_case(pipe, {**item, "label": tmp_path / "partial.nii.gz"})


def test_generation_fidelity_pairing_and_stages_are_judged_by_the_baseline_and_the_paired_masks(trained, tiny_data):
    import numpy as np

    from eval.generation_eval import JUDGES, centre_side, laterality_fidelity, lesion_side, stage_fidelity

    ddpm = laterality_fidelity(trained, n_per_side=1, steps=3, scheduler="DDPMScheduler")
    assert ddpm["scheduler"] == "DDPMScheduler" and ddpm["n"] == 2 and ddpm["prior_strength"] == 1.0
    with pytest.raises(ValueError, match="latent prior"):  # passed on to the pipeline, whose UNet has none
        laterality_fidelity(trained, n_per_side=1, steps=3, prior_strength=0.5)
    assert all(ddpm[judge] in (0.0, 0.5, 1.0) for judge in JUDGES) and 0.0 <= ddpm["pairing_oar_dice"] <= 1.0
    # a judge reads a mask's side: its centre against the body's midline (RAS +x = right)
    mask, affine = np.zeros((10, 4, 4), bool), np.diag([2.0, 2.0, 2.0, 1.0])
    mask[6:9] = True  # x = 12..16 mm
    assert centre_side(mask, affine, 9.0) == "right" and centre_side(mask, affine, 20.0) == "left"
    assert centre_side(np.zeros_like(mask), affine, 9.0) == "none"
    names = ["GTVp", "GTVn"]
    assert lesion_side(np.stack([np.zeros_like(mask), mask]), names, affine, 9.0) == "right"  # no GTVp: the nodes
    assert laterality_fidelity(trained, n_per_side=1, steps=3)["scheduler"] == "DDIMScheduler"  # what training ships
    with pytest.raises(ValueError, match="not a diffusers scheduler"):
        laterality_fidelity(trained, n_per_side=1, steps=3, scheduler="UNet2DModel")  # a model, not a scheduler
    stages = stage_fidelity(trained, n=2, steps=3)
    assert stages["n"] == 2
    # the autoencoder's ceiling also scores the judge on real CTs and on their reconstructions (the pairing's bound)
    from eval.generation_eval import autoencoder_ceiling
    from medvlm.data.datalist import load_datalist

    items = load_datalist(tiny_data)["validation"][:2]
    ceiling = autoencoder_ceiling(trained, items)
    assert ceiling["n"] == 2 and 0.0 <= ceiling["judge_oar_dice_reconstruction"] <= 1.0
    assert 0.0 <= ceiling["judge_oar_dice_input"] <= 1.0
    with pytest.raises(ValueError, match="needs a run folder or an autoencoder"):
        autoencoder_ceiling(None, items)
    # reconstructions made once (as `evaluate` shares them with the realism figures) give the same ceiling
    from eval.generation_eval import vae_reconstructions

    made = vae_reconstructions(trained, items, with_inputs=True)
    assert autoencoder_ceiling(trained, items, reconstructions=made) == ceiling
    with pytest.raises(ValueError, match="for each of the 2 items"):
        autoencoder_ceiling(trained, items, reconstructions=made[:1])
    for judge in JUDGES:
        row = stages[judge]
        assert all(row[k] in (0.0, 0.5, 1.0) for k in ("T4 GTVp larger than T1", "N0 without GTVn", "N2 with GTVn"))
        assert row["T1 GTVp ml"] >= 0 and row["T4 GTVp ml"] >= 0


def test_rectified_flow_trains_on_the_straight_path_and_samples_with_the_flow_matching_scheduler(trained, tiny_data, tmp_path):
    """prediction_type flow_matching: the loss is the velocity (noise - latents) error at the point sigma of the
    straight path; the shipped sampler is diffusers' FlowMatchEulerDiscreteScheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from medvlm.models.factory import is_flow_matching, sampling_scheduler
    from train.stage_diffusion import DiffusionTrainer

    for stage in ("contrastive", "vae"):
        shutil.copytree(trained / stage / "final", tmp_path / stage / "final")
    config = load_config(TINY)
    config.training.diffusion.prediction_type = "flow_matching"
    torch.manual_seed(0)
    trainer = DiffusionTrainer(config, tiny_data, tmp_path)
    loss_module = trainer.setup().eval()
    inputs = trainer.make_inputs(0)
    with torch.no_grad():
        loss = float(loss_module(**inputs)[0])
        latents, noise = inputs["latents"], inputs["noise"]
        sigma = (inputs["timesteps"].float() / 1000).view(-1, 1, 1, 1, 1)
        from train.stage_diffusion import with_null_report

        context, mask = with_null_report(trainer.unet, inputs["states"], inputs["attention_mask"], inputs["drop"])
        prediction = trainer.unet((1 - sigma) * latents + sigma * noise, sigma.flatten() * 1000, context,
                                  encoder_attention_mask=mask).sample
    assert loss == pytest.approx(float(torch.nn.functional.mse_loss(prediction, noise - latents)), rel=1e-5)
    scheduler = sampling_scheduler(1000, "flow_matching")
    assert isinstance(scheduler, FlowMatchEulerDiscreteScheduler) and is_flow_matching(scheduler)
    from pipelines import ReportToCTPipeline

    pipe = ReportToCTPipeline.from_pretrained(trained / "report_to_ct")
    pipe.scheduler = scheduler
    out = pipe("left tonsil carcinoma, cT2 N1 M0", num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    assert out.ct.shape == (1, 32, 32, 32) and np.isfinite(out.ct).all() and out.masks.shape == (1, 9, 32, 32, 32)


def test_lateral_mirror_swaps_sides_in_the_ct_the_report_and_the_paired_structures(tiny_data):
    """The mirrored case is a consistent patient of the other side: tumour, words, labels and parotids move together."""
    import numpy as np

    from medvlm.vocabulary import STRUCTURE_NAMES
    from medvlm.text.parse import LABEL_NAMES, parse_report
    from train.data import collate, load_cases, mirror_case

    cases = load_cases(tiny_data, load_config(TINY))
    gtvp, left, right = STRUCTURE_NAMES.index("GTVp"), STRUCTURE_NAMES.index("Parotid_L"), STRUCTURE_NAMES.index("Parotid_R")
    lateral = [c for c in cases if parse_report(c.report).laterality in ("left", "right") and c.label[gtvp].sum() > 0]
    assert lateral, "the tiny dataset should hold a lateralised tumour"

    def tumour_side(case):  # RAS: array index 0 grows towards the patient's right
        body = (case.image[0] > -0.6).nonzero().float()[:, 0].mean()
        centroid = case.label[gtvp].nonzero().float()[:, 0].mean()
        return "right" if centroid > body else "left"

    for case in lateral:
        side = parse_report(case.report).laterality
        assert tumour_side(case) == side  # the dataset itself: the report's side is the tumour's side
        mirror = mirror_case(case)
        other = "left" if side == "right" else "right"
        assert parse_report(mirror.report).laterality == other and f"primary: {other} " in mirror.prompt
        assert tumour_side(mirror) == other
        assert mirror.labels[LABEL_NAMES.index(f"laterality={other}")] == 1 and mirror.labels[LABEL_NAMES.index(f"laterality={side}")] == 0
        assert torch.equal(mirror.label[left], case.label[right].flip(0)) and torch.equal(mirror.label[right], case.label[left].flip(0))
        twice = mirror_case(mirror)  # mirroring is an involution
        assert torch.equal(twice.image, case.image) and torch.equal(twice.label, case.label)
        assert twice.prompt == case.prompt and twice.report == case.report and np.array_equal(twice.labels, case.labels)

    # in a batch: off by default, seeded per (seed, epoch, case), and then about half the cases
    indices = list(range(len(cases)))
    plain = collate(cases, indices, None, seed=0, epoch=0)
    assert plain["prompt"] == [c.prompt for c in cases]
    batches = [collate(cases, indices, None, seed=0, epoch=e, mirror_prob=0.5) for e in range(4)]
    again = collate(cases, indices, None, seed=0, epoch=0, mirror_prob=0.5)
    assert torch.equal(again["image"], batches[0]["image"]) and again["prompt"] == batches[0]["prompt"]
    flipped = [not torch.equal(b["image"][i], plain["image"][i]) for b in batches for i in indices]
    assert 0.25 < sum(flipped) / len(flipped) < 0.75


def test_lateral_mirror_is_checked_where_it_cannot_act(tiny_data, tmp_path):
    """A mirror probability outside [0, 1], or on a stage that trains on cached or fixed inputs, is an error
    naming the setting, never silently ignored."""
    from medvlm.errors import ConfigError
    from train.stage_report_generator import ReportGeneratorTrainer

    config = load_config(TINY)
    config.training.vae.lateral_mirror = 1.5
    with pytest.raises(ConfigError, match=r"training\.vae\.lateral_mirror must be a probability"):
        VAETrainer(config, tiny_data, tmp_path / "a").setup()
    config.training.vae.lateral_mirror = 0.5
    VAETrainer(config, tiny_data, tmp_path / "b").setup()  # supported: the VAE trains on augmented cases
    config.training.report_generator.lateral_mirror = 0.5
    with pytest.raises(ConfigError, match=r"training\.report_generator\.lateral_mirror = 0\.5 has no effect here"):
        ReportGeneratorTrainer(config, tiny_data, tmp_path / "c").setup()


def test_presence_targets_count_the_whole_case_and_side_maps_follow_the_crop(tiny_data):
    """The presence head learns what the report says of the case: a crop that misses the tumour must not
    teach that the report rules the tumour out; and a patch keeps the whole volume's midline distances."""
    from monai.transforms import Compose, SpatialCropd

    from medvlm.vocabulary import STRUCTURE_NAMES
    from medvlm.models.windows import coordinate_channels, midline_distance
    from train.data import collate, load_cases, structure_presence

    cases = load_cases(tiny_data, load_config(TINY))
    gtvp = STRUCTURE_NAMES.index("GTVp")
    number = next(i for i, c in enumerate(cases) if c.label[gtvp].sum() > 0)
    assert structure_presence(cases[number].label)[gtvp] == 1.0
    assert structure_presence(torch.zeros(3, 2, 2, 2)).tolist() == [0.0, 0.0, 0.0]

    config = load_config(TINY)
    crop = Compose([SpatialCropd(keys=["image", "side", "label"], roi_start=[0, 0, 0], roi_end=[1, 1, 1])])
    batch = collate(cases, [number], crop, seed=0, epoch=0, side_margin=1.0, config=config)
    assert batch["label"].shape[2:] == (1, 1, 1) and batch["label"][0, gtvp].sum() == 0  # no tumour in the patch
    crop = Compose([SpatialCropd(keys=["image", "side", "label"], roi_start=[2, 0, 0], roi_end=[6, 4, 4])])
    batch = collate(cases, [number], crop, seed=0, epoch=0, side_margin=1.0, config=config)
    whole = midline_distance(cases[number].image[None])[0]
    assert torch.equal(batch["side_map"][0], whole[:, 2:6, 0:4, 0:4])
    assert batch["coordinates"] is None  # only asked for with coordinates=True
    # a patch's voxel coordinates are those of the whole volume, cut and moved with it
    crop = Compose([SpatialCropd(keys=["image", "side", "coordinates", "label"], roi_start=[2, 0, 0], roi_end=[6, 4, 4])])
    batch = collate(cases, [number], crop, seed=0, epoch=0, side_margin=1.0, config=config, coordinates=True)
    grid = coordinate_channels(cases[number].image[None])[0]
    assert torch.equal(batch["coordinates"][0], grid[:, 2:6, 0:4, 0:4])
    assert batch["coordinates"][0, 0].min() > -1.0  # x starts at voxel 2 of the volume, not at its edge
    present = structure_presence(cases[number].label, whole, 1.0)  # per side: (anywhere, left, right)
    assert present.shape == (len(STRUCTURE_NAMES), 3) and present[gtvp, 0] == 1.0
    parotid_left, parotid_right = STRUCTURE_NAMES.index("Parotid_L"), STRUCTURE_NAMES.index("Parotid_R")
    assert present[parotid_left].tolist() == [1.0, 1.0, 0.0]  # RAS: the patient's left is low x
    assert present[parotid_right].tolist() == [1.0, 0.0, 1.0]


def test_shared_cases_preprocess_once_per_settings_only_inside_the_block(tiny_data):
    import dataclasses

    from train.data import load_cases, shared_cases

    config = load_config(TINY)
    apart = load_cases(tiny_data, config)
    assert load_cases(tiny_data, config)[0] is not apart[0]  # outside the block: preprocessed again
    with shared_cases():
        first = load_cases(tiny_data, config)
        again = load_cases(tiny_data, config)
        assert again is not first and all(a is b for a, b in zip(first, again))  # same cases, own list
        assert torch.equal(first[0].image, apart[0].image) and first[0].prompt == apart[0].prompt
        validation = load_cases(tiny_data, config, "validation")
        assert {c.case_id for c in validation}.isdisjoint(c.case_id for c in first)
        other = dataclasses.replace(config, data=dataclasses.replace(
            config.data, preprocess=dataclasses.replace(config.data.preprocess, hu_window=(-500.0, 500.0))))
        assert load_cases(tiny_data, other)[0] is not first[0]  # other preprocessing: its own cases
        assert not torch.equal(load_cases(tiny_data, other)[0].image, first[0].image)
    assert load_cases(tiny_data, config)[0] is not first[0]  # the block's cache is gone after it


def test_latent_template_and_prior_are_measured_on_the_cached_training_latents(trained, tiny_data, tmp_path):
    """models.unet.latent_template: the UNet's template is the per-voxel mean and spread of the cached training
    latents' CT channels (structure channels untouched), and the loss noises normalised latents;
    models.unet.prior_rank: the latent prior is fitted to the normalised latents of the rows training draws."""
    from train.stage_diffusion import DiffusionTrainer

    for stage in ("contrastive", "vae"):
        shutil.copytree(trained / stage / "final", tmp_path / stage / "final")
    config = load_config(TINY)
    config.models.unet.latent_template = True
    config.models.unet.prior_rank, config.models.unet.prior_spread = 2, 0.5
    trainer = DiffusionTrainer(config, tiny_data, tmp_path)
    loss_fn = trainer.setup()
    c = trainer.vae.config.latent_channels
    cached = trainer.cache["latents"]
    rows = trainer._learned_rows(len(cached))
    assert rows[:len(trainer.cases)] == list(range(len(trainer.cases))) and int(trainer.unet.prior_cases) == len(rows)
    assert trainer.unet.config.prior_rows == len(rows) and tuple(trainer.unet.prior_coefficients.shape) == (len(rows), 2)
    assert all(row >= len(trainer.cases) for row in rows[len(trainer.cases):])
    assert torch.allclose(trainer.unet.prior_mean, trainer.unet.normalize_latents(cached[rows]).mean(0), atol=1e-4)
    assert tuple(trainer.unet.config.template_size) == tuple(cached.shape[2:])
    assert torch.allclose(trainer.unet.template_mean[:c], cached[:, :c].mean(0), atol=1e-5)
    assert torch.equal(trainer.unet.template_mean[c:], torch.zeros_like(trainer.unet.template_mean[c:]))
    inputs = trainer.make_inputs(0)
    seen = {}
    original = trainer.unet.forward

    def spy(sample, *args, **kwargs):
        seen["sample"] = sample
        return original(sample, *args, **kwargs)

    trainer.unet.forward = spy
    with torch.no_grad():
        loss_fn(**inputs)
    from medvlm.models.factory import noised_latents

    expected = noised_latents(trainer.scheduler, trainer.unet.normalize_latents(inputs["latents"]), inputs["noise"],
                              inputs["timesteps"])
    assert torch.allclose(seen["sample"], expected, atol=1e-5)


def test_generative_and_contrastive_stages_leave_out_synthetic_cases(tiny_data, tmp_path):
    """A datalist written by ``medvlm augment`` marks its generated cases ``synthetic``: the segmentation stage
    trains on them, the autoencoder and the contrastive, diffusion and report-drafting stages on real CTs only."""
    from train.data import load_cases

    from pipelines.augment import _absolute

    payload = json.loads((Path(tiny_data) / "datalist.json").read_text())
    if isinstance(payload.get("records"), str):
        payload["records"] = str((Path(tiny_data) / payload["records"]).resolve())
    for section in ("training", "validation", "test"):  # paths absolute, as medvlm augment writes them
        payload[section] = [_absolute(item, Path(tiny_data)) for item in payload.get(section, [])]
    payload["training"].append({**payload["training"][0], "id": "synthetic_000",
                                "synthetic": {"synthesis": "lesions", "source": "x", "seed": 0}})
    (tmp_path / "augmented").mkdir()
    (tmp_path / "augmented" / "datalist.json").write_text(json.dumps(payload))
    config = load_config(TINY)
    real = len(payload["training"]) - 1
    assert len(load_cases(tmp_path / "augmented", config)) == real + 1
    assert [c.case_id for c in load_cases(tmp_path / "augmented", config, synthetic=False)] == \
        [c.case_id for c in load_cases(tiny_data, config)]
    trainer = VAETrainer(config, tmp_path / "augmented", tmp_path / "vae")
    trainer.setup()
    assert len(trainer.cases) == real and all(c.case_id != "synthetic_000" for c in trainer.cases)
