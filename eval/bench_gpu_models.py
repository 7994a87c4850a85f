"""Benchmark: memory and time of the hnc_gpu networks at the reference study's ROI (352 x 352 x 64) on one GPU.

For each network, one training step (forward + backward, bf16 autocast) at the shapes the preset
trains with: the VAE on a 160 x 160 x 64 patch, the UNet on the full ROI's latents, the segmentation
decoder at full resolution (VAE features computed without gradient, as the VAE is frozen then).
Run: ``python -m eval.bench_gpu_models [--config configs/hnc_gpu.yaml] [--context-dim 384]``.
"""
from __future__ import annotations

import argparse
import time

import torch


def _measure(name: str, step, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    step()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    print(f"{name:<44} peak {peak:7.2f} GiB   {seconds:7.3f} s", flush=True)
    return {"name": name, "peak_gib": peak, "seconds": seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/hnc_gpu.yaml")
    parser.add_argument("--context-dim", type=int, default=None, help="text width (default: read the text encoder)")
    parser.add_argument("--text-tokens", type=int, default=256)
    parser.add_argument("--device", default="cuda", help="cuda (memory and time) or cpu (time only; a check that "
                                                         "every step runs, e.g. with --config configs/tiny.yaml)")
    parser.add_argument("--vae-patch", type=int, nargs=3, default=(160, 160, 64), metavar=("X", "Y", "Z"))
    args = parser.parse_args(argv)
    from medvlm.config import load_config
    from medvlm.models.factory import build_segmentation, build_unet, build_vae, text_encoder_config
    from medvlm.models.segmentation import fused_features

    config = load_config(args.config)
    context_dim = args.context_dim or int(text_encoder_config(config.text)["hidden_size"])
    device = torch.device(args.device)
    roi = tuple(config.data.preprocess.roi_size)
    vae = build_vae(config.models, config.data.preprocess).to(device)
    unet = build_unet(config.models, context_dim).to(device)
    seg = build_segmentation(config.models, context_dim, config.data.preprocess).to(device)
    factor = vae.compression
    latent = tuple(s // factor for s in roi)
    context = torch.randn(1, args.text_tokens, context_dim, device=device)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{device_name} | ROI {roi} | latent {latent} | torch {torch.__version__}")
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
    patch = tuple(args.vae_patch)

    def vae_step():
        x = torch.randn(1, 1, *patch, device=device)
        masks = torch.rand(1, vae.config.mask_channels, *patch, device=device).round()
        with autocast():
            posterior = vae.encode(x).latent_dist
            decoded = vae.decode(posterior.sample(), vae.encode_masks(masks) if vae.config.mask_channels else None)
            loss = (decoded.sample.float() - x).abs().mean() + 1e-6 * posterior.kl().mean()
        loss.backward()

    def unet_step():
        z = torch.randn(1, vae.generation_channels, *latent, device=device)
        with autocast():
            loss = unet(z, torch.tensor([500], device=device), context).sample.float().pow(2).mean()
        loss.backward()

    def seg_step():
        x = torch.randn(1, 1, *roi, device=device)
        with torch.no_grad(), autocast():
            skips, _, fused = fused_features(vae, unet, x, context)
        with autocast():
            logits = seg(fused, skips, context, image=x)
            loss = logits.float().sigmoid().mean()
        loss.backward()

    results = []
    steps = ((f"VAE train step, patch {'x'.join(map(str, patch))}", vae_step),
             (f"UNet train step, latents {latent}", unet_step), (f"segmentation train step, full ROI {roi}", seg_step))
    for name, step in steps:
        try:
            results.append(_measure(name, step, device))
        except torch.cuda.OutOfMemoryError:
            print(f"{name:<44} out of memory", flush=True)
        for module in (vae, unet, seg):
            module.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0 if len(results) == 3 else 1


if __name__ == "__main__":
    raise SystemExit(main())
