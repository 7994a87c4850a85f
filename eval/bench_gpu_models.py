"""Benchmark: memory and time of the hnc_gpu networks at the seed's ROI (352 x 352 x 64) on one GPU.

For each network, one training step (forward + backward, bf16 autocast) at the shapes the preset
trains with: the VAE on a 160 x 160 x 64 patch, the UNet on the full ROI's latents, the segmentation
decoder at full resolution (VAE features computed without gradient, as the VAE is frozen then).
Run: ``python -m eval.bench_gpu_models [--config configs/hnc_gpu.yaml] [--context-dim 384]``.
"""
from __future__ import annotations

import argparse
import time

import torch


def _measure(name: str, step) -> dict:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"{name:<44} peak {peak:7.2f} GiB   {seconds:7.3f} s", flush=True)
    return {"name": name, "peak_gib": peak, "seconds": seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/hnc_gpu.yaml")
    parser.add_argument("--context-dim", type=int, default=None, help="text width (default: read the text encoder)")
    parser.add_argument("--text-tokens", type=int, default=256)
    args = parser.parse_args(argv)
    from medvlm.config import load_config
    from medvlm.models.factory import build_segmentation, build_unet, build_vae, text_encoder_config

    config = load_config(args.config)
    context_dim = args.context_dim or int(text_encoder_config(config.text)["hidden_size"])
    device = torch.device("cuda")
    roi = tuple(config.data.preprocess.roi_size)
    vae = build_vae(config.models).to(device)
    unet = build_unet(config.models, context_dim).to(device)
    seg = build_segmentation(config.models, context_dim, config.data.preprocess).to(device)
    factor = vae.compression
    latent = tuple(s // factor for s in roi)
    context = torch.randn(1, args.text_tokens, context_dim, device=device)
    print(f"{torch.cuda.get_device_name()} | ROI {roi} | latent {latent} | torch {torch.__version__}")
    autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731

    def vae_step():
        x = torch.randn(1, 1, 160, 160, 64, device=device)
        with autocast():
            posterior = vae.encode(x).latent_dist
            loss = (vae.decode(posterior.sample()).sample.float() - x).abs().mean() + 1e-6 * posterior.kl().mean()
        loss.backward()

    def unet_step():
        z = torch.randn(1, config.models.vae.latent_channels, *latent, device=device)
        with autocast():
            loss = unet(z, torch.tensor([500], device=device), context).sample.float().pow(2).mean()
        loss.backward()

    def seg_step():
        x = torch.randn(1, 1, *roi, device=device)
        with torch.no_grad(), autocast():
            encoded = vae.encode(x, return_features=True)
            fused = unet(encoded.latent_dist.mode(), 0, context, return_features=True).features[-1]
        with autocast():
            logits = seg(fused, encoded.features, context)
            loss = logits.float().sigmoid().mean()
        loss.backward()

    for name, step in (("VAE train step, patch 160x160x64", vae_step), (f"UNet train step, latents {latent}", unet_step),
                       (f"segmentation train step, full ROI {roi}", seg_step)):
        try:
            _measure(name, step)
        except torch.cuda.OutOfMemoryError:
            print(f"{name:<44} out of memory", flush=True)
        for module in (vae, unet, seg):
            module.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
