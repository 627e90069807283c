"""Train the quality-reference model from scratch on CPU and save it as a QwenImagePipeline folder.

    python -m reference_model.train --out reference_model/omni-shapes-qwen-image

Real diffusers classes (the Qwen-Image architecture at small size): a byte-level BPE tokenizer and a
random, frozen Qwen2.5-VL text encoder; an AutoencoderKLQwenImage trained as an autoencoder; a
QwenImageTransformer2DModel trained with flow matching (velocity = noise - x0, as the pipeline samples)
on captioned scenes from reference_model.shapes, with 10% empty captions so CFG works. Prompts are
encoded and latents packed by the pipeline's own methods, so training sees exactly what inference sees.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel
from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d

from tools.tiny_models.qwen_image import qwen_scheduler, qwen_text_encoder
from tools.tiny_models.tokenizer import build_qwen_tokenizer

from .shapes import render, split

TEXT_HIDDEN = 64
DIT = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=6, attention_head_dim=32, num_attention_heads=4,
           joint_attention_dim=TEXT_HIDDEN, axes_dims_rope=(8, 12, 12), guidance_embeds=False)
VAE = dict(base_dim=16, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True])
LATENT = 16  # 64 px / VAE downscale 4


def log(message: str) -> None:
    print(f"[train {time.strftime('%H:%M:%S')}] {message}", flush=True)


def images_to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) list -> (B, 3, 1, H, W) in [-1, 1], the VAE's video layout with one frame."""
    x = torch.from_numpy(np.stack(images)).float().div(127.5).sub(1.0)
    return x.permute(0, 3, 1, 2).unsqueeze(2)


def use_last_temporal_tap(vae: torch.nn.Module) -> None:
    """With one frame, a causal 3D conv only ever sees its last temporal slice (the others meet padding), and
    the default init scales that slice for three: start it as a properly scaled 2D conv instead."""
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, QwenImageCausalConv3d) and module.kernel_size[0] > 1:
                weight2d = torch.empty_like(module.weight[:, :, -1])
                torch.nn.init.kaiming_uniform_(weight2d, a=math.sqrt(5))
                module.weight.zero_()
                module.weight[:, :, -1] = weight2d


def cosine(step: int, total: int, warmup: int, hold: float = 0.0) -> float:
    """Linear warmup, then flat for `hold` of the run, then cosine down to 0."""
    if step < warmup:
        return (step + 1) / warmup
    flat_until = warmup + hold * (total - warmup)
    if step < flat_until:
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * (step - flat_until) / max(1, total - flat_until)))


def vae_roundtrip(vae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode to the posterior mean and decode, without the [-1, 1] clamp of vae.decode (it would zero the
    gradient of every pixel the untrained decoder overshoots)."""
    z = vae.quant_conv(vae.encoder(x))[:, : vae.config.z_dim]
    return z, vae.decoder(vae.post_quant_conv(z))


def train_vae(vae, scenes, steps: int, batch: int, lr: float, rng) -> dict:
    use_last_temporal_tap(vae)
    vae.train()
    # This VAE learns the backgrounds first and the shapes only after ~1000 steps: hold the rate up until then.
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * cosine(step, steps, 50, hold=0.75)
        x = images_to_tensor([render(scenes[i], rng) for i in rng.integers(len(scenes), size=batch)])
        _, recon = vae_roundtrip(vae, x)
        loss = F.mse_loss(recon, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            psnr = 10 * math.log10(4.0 / F.mse_loss(recon.detach().clamp(-1, 1), x).item())
            log(f"vae step {step}/{steps} loss {loss.item():.4f} psnr {psnr:.1f} dB")
    vae.eval()
    with torch.no_grad():  # held-out quality: fresh renders of every scene
        test = images_to_tensor([render(s, rng) for s in scenes[:128]])
        recon = vae.decode(vae.encode(test).latent_dist.mode()).sample.clamp(-1, 1)
        psnr = 10 * math.log10(4.0 / F.mse_loss(recon, test).item())
    return {"vae_steps": steps, "vae_seconds": round(time.perf_counter() - start, 1), "vae_psnr_db": round(psnr, 2)}


@torch.no_grad()
def encode_dataset(vae, scenes, count: int, rng) -> tuple[torch.Tensor, list[str]]:
    latents, captions = [], []
    for start in range(0, count, 128):
        picked = [scenes[i] for i in rng.integers(len(scenes), size=min(128, count - start))]
        latents.append(vae.encode(images_to_tensor([render(s, rng) for s in picked])).latent_dist.mode()[:, :, 0])
        captions += [s.caption for s in picked]
    return torch.cat(latents), captions


def train_dit(pipeline: QwenImagePipeline, latents, captions, steps: int, batch: int, lr: float, rng, seed: int) -> dict:
    transformer = pipeline.transformer
    transformer.train()
    ema = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    img_shapes = [[(1, LATENT // 2, LATENT // 2)]] * batch
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * cosine(step, steps, 100)
        index = rng.integers(len(captions), size=batch)
        prompts = [captions[i] if rng.random() > 0.1 else "" for i in index]
        with torch.no_grad():
            embeds, mask = pipeline.encode_prompt(prompts, device="cpu")
        x0 = latents[index]
        sigma = torch.sigmoid(torch.randn(batch, generator=generator))  # logit-normal
        noise = torch.randn(x0.shape, generator=generator)
        s = sigma.view(-1, 1, 1, 1)
        noisy = (1 - s) * x0 + s * noise
        pack = lambda t: pipeline._pack_latents(t, batch, 4, LATENT, LATENT)  # noqa: E731
        prediction = transformer(hidden_states=pack(noisy), encoder_hidden_states=embeds, encoder_hidden_states_mask=mask,
                                 timestep=sigma, img_shapes=img_shapes, return_dict=False)[0]
        loss = F.mse_loss(prediction, pack(noise - x0))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for key, value in transformer.state_dict().items():
                ema[key].mul_(decay).add_(value.detach(), alpha=1 - decay)
        if step % 100 == 0 or step == steps - 1:
            log(f"dit step {step}/{steps} loss {loss.item():.4f}")
    transformer.load_state_dict(ema)
    transformer.eval()
    return {"dit_steps": steps, "dit_seconds": round(time.perf_counter() - start, 1), "dit_final_loss": round(loss.item(), 4)}


def build_untrained(seed: int) -> QwenImagePipeline:
    """The architecture with fresh weights (also the random baseline the benchmark compares with)."""
    torch.manual_seed(seed)
    text_encoder = qwen_text_encoder(TEXT_HIDDEN, 640)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLQwenImage(latents_mean=[0.0] * 4, latents_std=[1.0] * 4, **VAE)
    torch.manual_seed(seed + 2)
    transformer = QwenImageTransformer2DModel(**DIT)
    pipeline = QwenImagePipeline(scheduler=qwen_scheduler(), vae=vae, text_encoder=text_encoder,
                                 tokenizer=build_qwen_tokenizer(), transformer=transformer)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def train(out: Path, seed: int = 0, vae_steps: int = 2000, dit_steps: int = 1500, batch: int = 64,
          dataset: int = 6144, vae_batch: int = 8) -> dict:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    train_scenes, held_out = split()
    started = time.perf_counter()
    pipeline = build_untrained(seed)
    info = {"seed": seed, "batch": batch, "vae_batch": vae_batch, "dataset": dataset,
            "train_scenes": len(train_scenes), "held_out_scenes": len(held_out)}
    info.update(train_vae(pipeline.vae, train_scenes, vae_steps, vae_batch, 2e-3, rng))
    latents, captions = encode_dataset(pipeline.vae, train_scenes, dataset, rng)
    mean, std = latents.mean(dim=(0, 2, 3)), latents.std(dim=(0, 2, 3))
    # The pipeline decodes z * std + mean, so the model learns on (z - mean) / std.
    pipeline.vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    latents = (latents - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    info.update(train_dit(pipeline, latents, captions, dit_steps, batch, 8e-4, rng, seed))
    info.update(total_seconds=round(time.perf_counter() - started, 1), torch=torch.__version__,
                cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    out.mkdir(parents=True, exist_ok=True)
    pipeline.save_pretrained(str(out), safe_serialization=True)
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    log(f"saved {out} ({info['total_seconds']:.0f} s): {info}")
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=2000)
    parser.add_argument("--vae-batch", type=int, default=8)
    parser.add_argument("--dit-steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dataset", type=int, default=6144, help="training latents encoded once")
    args = parser.parse_args(argv)
    train(args.out, args.seed, args.vae_steps, args.dit_steps, args.batch, args.dataset, args.vae_batch)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
