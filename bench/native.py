"""Head-to-head on ComfyUI's own sampling: our TeaCache and Cache-DiT nodes on a ComfyUI MODEL against ComfyUI's
EasyCache and LazyCache, each swept over its main knob, on the reference model loaded natively.

    python bench/native.py            # 50 steps, 6 timed prompts x 3 rounds, rows shuffled per prompt, 48 held-out prompts
    python bench/native.py --quick    # the same code on a few steps and prompts (what the tests run)

How the model runs natively: ComfyUI's loaders fix Qwen-Image's width (24 heads of 128), so the reference model
(a small trained Qwen-Image, diffusers' layout, whose keys ComfyUI's QwenImage class shares) is built in ComfyUI's
own QwenImageTransformer2DModel at its own size, wrapped as ComfyUI wraps a loaded file (supported_models ->
BaseModel -> ModelPatcher; tools/native_models.py) and sampled by comfy.sample.sample exactly as KSampler samples:
euler, simple scheduler, cfg 4, ComfyUI's noise, with the shift the diffusers pipeline uses at this size
(ModelSamplingAuraFlow's patch, as a user sets it). Prompts are encoded once by the model's own text encoder into
ComfyUI's CONDITIONING (what CLIPTextEncode gives: ComfyUI's Qwen-Image encode uses the same template and drops
the same prefix). Each cache is applied by its node's own execute(): ours (OmniTeaCache, OmniCacheDiT with a
MODEL), ComfyUI's EasyCacheNode and LazyCacheNode (comfy_extras/nodes_easycache.py, with their default window).
The sample + VAE decode is timed; all rows run back to back, shuffled, on each prompt of each round, and a row's
speedup is the median over those slots of the baseline's time / its own in the same slot; quality is PSNR/SSIM against the
uncached native images; prompt accuracy is read back as in the existing benchmark. The diffusion model gets a copy
of the sampler's latent, as on a GPU (see inputs_as_on_a_gpu).

Writes bench/results/native/ (or --out): README.md (the head-to-head table and every row), results.json (raw
times per repetition, per-prompt scores, versions), fronts.png, grid.png.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / ".build"


def comfy_process() -> None:
    """ComfyUI importable in this process (CPU mode) and this pack loaded as the package `omni_pack`, as ComfyUI
    loads a custom node pack."""
    sys.path.insert(0, str(BUILD / "comfyui"))  # before the repository: ComfyUI's `nodes` module is not ours
    sys.path.insert(1, str(ROOT))
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = True
    spec = importlib.util.spec_from_file_location("omni_pack", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["omni_pack"] = pack
    spec.loader.exec_module(pack)


def inputs_as_on_a_gpu() -> None:
    """ComfyUI hands a flow model (CONST sampling) the sampler's own latent tensor when the model's dtype is the
    latent's (fp32, as on this CPU); on a GPU the cast to the model's bf16 makes a copy. EasyCache adds its cached
    difference to that input in place (apply_cache_diff), so in fp32 it also changes the tensor the sampler then
    computes the denoised latent from: 7-9 dB PSNR at every threshold. Every row gets a copy, as on a GPU (the
    uncached pictures are bit-identical either way)."""
    import comfy.model_sampling

    calculate = comfy.model_sampling.CONST.calculate_input
    comfy.model_sampling.CONST.calculate_input = lambda self, sigma, noise: calculate(self, sigma, noise).clone()


def log(message: str) -> None:
    print(f"[native bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- the model, its prompts and its decode ----------------------------------------------------------------------
class Reference:
    """The reference model natively, its conditioning per prompt, and its VAE."""

    def __init__(self, folder: Path):
        import torch
        from diffusers import QwenImagePipeline
        from comfy_extras.nodes_model_advanced import ModelSamplingSD3
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift
        from tools.native_models import reference_patcher

        self.pipeline = QwenImagePipeline.from_pretrained(str(folder), torch_dtype=torch.float32, local_files_only=True)
        config = self.pipeline.scheduler.config
        tokens = (64 // self.pipeline.vae_scale_factor // 2) ** 2
        mu = calculate_shift(tokens, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift)
        self.shift = math.exp(mu)
        self.model = ModelSamplingSD3().patch(reference_patcher(folder), self.shift, multiplier=1.0)[0]
        self.blocks = list(self.model.model.diffusion_model.transformer_blocks)
        vae = self.pipeline.vae.config
        self.mean = torch.tensor(vae.latents_mean).view(1, -1, 1, 1)
        self.std = torch.tensor(vae.latents_std).view(1, -1, 1, 1)
        self.latent_shape = (1, vae.z_dim, 1, 64 // self.pipeline.vae_scale_factor, 64 // self.pipeline.vae_scale_factor)
        self._conditioning: dict[str, list] = {}
        self.full_passes: dict[int, int] = {}  # steps -> block passes of an uncached run (calls per step vary)

    def conditioning(self, text: str) -> list:
        """ComfyUI's CONDITIONING for `text`: [[features, {}]] (one prompt, no padding: no mask needed)."""
        import torch

        if text not in self._conditioning:
            with torch.inference_mode():
                embeds, _ = self.pipeline.encode_prompt(prompt=text, device="cpu", num_images_per_prompt=1)
            self._conditioning[text] = [[embeds.clone(), {}]]
        return self._conditioning[text]

    def sample(self, model, prompt: str, seed: int, steps: int, cfg: float):
        import comfy.sample
        import torch

        latent = torch.zeros(self.latent_shape)
        noise = comfy.sample.prepare_noise(latent, seed)
        return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", self.conditioning(prompt),
                                   self.conditioning(""), latent, seed=seed, disable_pbar=True)

    def decode(self, samples):
        """The model's latent -> uint8 picture, as the pipeline decodes (z * std + mean, then the VAE)."""
        import torch
        from bench.harness import to_uint8
        from omni_core.families import family_by_name
        from omni_core.vae import DecodeOptions, decode

        with torch.inference_mode():
            vae_latent = samples[:, :, 0] * self.std + self.mean
            image = decode(family_by_name("qwen-image"), self.pipeline.vae, vae_latent, DecodeOptions(tiling=False))
        return to_uint8(image[0])


# --- the rows ------------------------------------------------------------------------------------------------
def node_model(node, socket: str, model, **inputs):
    """The MODEL a node's own execute() returns, as ComfyUI runs it (`socket`: its MODEL input's name)."""
    return node.execute(**{socket: model}, **inputs).result[0]


def rows(args):
    from comfy_extras.nodes_easycache import EasyCacheNode, LazyCacheNode
    from omni_pack.nodes.cachedit import OmniCacheDiT
    from omni_pack.nodes.teacache import OmniTeaCache
    from omni_pack.omni_core.cache.cachedit import CacheDiT
    from omni_pack.omni_core.cache.teacache import TeaCache
    from bench.harness import Row

    teacache = {"start_percent": TeaCache.start_percent, "end_percent": TeaCache.end_percent, "coefficients": "",
                "max_consecutive_skips": TeaCache.max_consecutive_skips}
    cachedit = {name: getattr(CacheDiT, name) for name in (
        "Fn_compute_blocks", "Bn_compute_blocks", "max_warmup_steps", "max_continuous_cached_steps",
        "max_cached_steps", "taylorseer_order", "scm_steps_mask_policy", "scm_steps_policy")}
    easy = {"start_percent": 0.15, "end_percent": 0.95, "verbose": False}  # ComfyUI's defaults for both nodes
    out = [Row("baseline", "baseline", lambda m: m)]
    out += [Row(f"TeaCache {t:g}", "TeaCache (ours)", lambda m, t=t: node_model(
        OmniTeaCache, "pipe", m, rel_l1_thresh=t, **teacache), default=t == TeaCache.rel_l1_thresh) for t in args.teacache]
    out += [Row(f"Cache-DiT {t:g}", "Cache-DiT (ours)", lambda m, t=t: node_model(
        OmniCacheDiT, "pipe", m, residual_diff_threshold=t, enable_taylorseer=False, **cachedit),
        default=t == CacheDiT.residual_diff_threshold) for t in args.cachedit]
    out += [Row(f"Cache-DiT {t:g} + TaylorSeer", "Cache-DiT + TaylorSeer (ours)", lambda m, t=t: node_model(
        OmniCacheDiT, "pipe", m, residual_diff_threshold=t, enable_taylorseer=True, **cachedit),
        default=t == CacheDiT.residual_diff_threshold) for t in args.taylorseer]
    out += [Row(f"EasyCache {t:g}", "EasyCache (ComfyUI)", lambda m, t=t: node_model(
        EasyCacheNode, "model", m, reuse_threshold=t, **easy), default=t == 0.2) for t in args.easycache]
    out += [Row(f"LazyCache {t:g}", "LazyCache (ComfyUI)", lambda m, t=t: node_model(
        LazyCacheNode, "model", m, reuse_threshold=t, **easy), default=t == 0.2) for t in args.lazycache]
    return out


class BlockPasses:
    """Calls of each block's attention query projection: a block that really computed (a skipped block, or a
    whole model call EasyCache skips, never reaches it)."""

    def __init__(self, blocks):
        self.count = 0
        self.handles = [block.attn.to_q.register_forward_pre_hook(self._seen) for block in blocks]

    def _seen(self, module, args) -> None:
        self.count += 1

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def run_once(reference: Reference, row, prompt: str, seed: int, steps: int, cfg: float, instrumented: bool = False):
    """(seconds, picture, fraction of block passes computed, time breakdown or None)."""
    from bench.harness import BlockClock

    model = row.recipe(reference.model)
    passes = BlockPasses(reference.blocks)
    clock = BlockClock(reference.blocks, cuda=False) if instrumented else None
    try:
        start = time.perf_counter()
        samples = reference.sample(model, prompt, seed, steps, cfg)
        sampled = time.perf_counter()
        image = reference.decode(samples)
        end = time.perf_counter()
    finally:
        passes.remove()
        if clock is not None:
            clock.remove()
    if row.name == "baseline":
        reference.full_passes[steps] = passes.count
    fraction = passes.count / reference.full_passes[steps]
    parts = None
    if clock is not None:
        parts = {"text_encode": 0.0, "blocks": clock.seconds, "rest_of_loop": (sampled - start) - clock.seconds,
                 "vae_decode": end - sampled, "other": 0.0, "total": end - start}
    return end - start, image, fraction, parts


def measure(reference: Reference, rows_: list, prompts: list[tuple[str, int]], steps: int, cfg: float, rounds: int,
            seed: int) -> list[list[str]]:
    """Times every row on every prompt of every round. Within one slot (a prompt of a round) all rows run back to
    back in a shuffled order, so a machine whose speed drifts over minutes (shared CPUs do) slows all rows of a
    slot alike; speedups are then paired per slot (bench.harness.paired_speedup). Returns each slot's order."""
    import random

    import psutil

    for row in rows_:  # warm-up (the baseline first: it counts an uncached run's block passes)
        run_once(reference, row, *prompts[0], steps, cfg)
    orders = []
    for round_index in range(rounds):
        for i, (prompt, prompt_seed) in enumerate(prompts):
            order = list(rows_)
            random.Random(seed + round_index * len(prompts) + i).shuffle(order)
            orders.append([row.name for row in order])
            for row in order:
                seconds, image, fraction, _ = run_once(reference, row, prompt, prompt_seed, steps, cfg)
                row.times.append(seconds)
                row.images[i] = image
                row.fraction.append(fraction)
                row.peak_rss.append(psutil.Process().memory_info().rss)  # after the run (resident, not a peak)
                row.raw.append({"round": round_index, "prompt": i, "seconds": seconds, "fraction_computed": fraction})
        log(f"round {round_index + 1}/{rounds} done")
    for row in rows_:
        for prompt, prompt_seed in prompts[:3]:
            row.breakdown.append(run_once(reference, row, prompt, prompt_seed, steps, cfg, instrumented=True)[3])
    log("time breakdown pass done")
    return orders


ROW_ORDER_SEED = 2026


def head_to_head(result: dict) -> dict:
    """Per method its fastest row meeting the gate (timed and held-out prompts), and its speedup against
    EasyCache's best."""
    by_name = {r["name"]: r for r in result["rows"]}
    held = result["held_out"]
    best = {method: by_name[name] if name else None for method, name in held["chosen"].items()}
    easy = best.get("EasyCache (ComfyUI)")
    table = {}
    for method, row in best.items():
        entry = {"row": row["name"] if row else None}
        if row:
            checked = held["rows"][row["name"]]
            entry.update(speedup=row["speedup"], fraction_computed=row["fraction_computed"], psnr_db=checked["psnr_db"],
                         ssim=checked["ssim"], accuracy=checked["accuracy"],
                         vs_easycache=row["speedup"] / easy["speedup"] if easy else None)
        table[method] = entry
    return table


def head_to_head_lines(result: dict) -> list[str]:
    from bench.report import _psnr

    held = result["held_out"]
    n = held["prompts"]
    lines = [f"| method | fastest row meeting the gate | speedup | x EasyCache's best | block passes computed | "
             f"PSNR dB ({n} prompts) | SSIM | prompt accuracy ({n} prompts) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for method, entry in result["head_to_head"].items():
        if entry["row"] is None:
            lines.append(f"| {method} | none at the gate | - | - | - | - | - | - |")
            continue
        versus = f"{entry['vs_easycache']:.2f}x" if entry["vs_easycache"] else "-"
        lines.append(f"| {method} | {entry['row']} | {entry['speedup']:.2f}x | {versus} | {entry['fraction_computed']:.0%} | "
                     f"{_psnr(entry['psnr_db'])} | {entry['ssim']:.3f} | {entry['accuracy']:.0%} |")
    lines += ["", f"Baseline (uncached, native) prompt accuracy on the {n} held-out prompts: {held['baseline_accuracy']:.1%}; "
              "the gate also asks every row to stay within one prompt of it."]
    return lines


NATIVE_START = "<!-- native-summary:start (written by python bench/native.py from bench/results/native/results.json) -->"
NATIVE_END = "<!-- native-summary:end -->"


def readme_summary(results: dict) -> list[str]:
    """What the top-level README quotes: the head-to-head table, from results.json alone."""
    [result] = results["scenarios"]
    request = result["request"]
    return [f"From `{results['command']}` ({results['seconds'] / 60:.0f} min, {results['machine']}); every row, raw "
            "times and the fronts in [`bench/results/native/`](bench/results/native/README.md). Reference model loaded "
            f"natively, {request['width']}x{request['height']}, {request['steps']} steps, {request['sampler']} / "
            f"{request['scheduler']}, cfg {request['cfg']:g}; speed on {len(result['prompts'])} prompts, the gate "
            f"(PSNR >= 30 dB and SSIM >= 0.97 against the uncached native run, prompt accuracy within one prompt of "
            f"its) on the timed prompts and all {result['held_out']['prompts']} held-out prompts:", "",
            *head_to_head_lines(result)]


def write_readme_summary(results_path: Path, readme: Path) -> None:
    import json

    lines = readme_summary(json.loads(results_path.read_text()))
    text = readme.read_text()
    if NATIVE_START not in text or NATIVE_END not in text:
        raise ValueError(f"{readme} has no native-summary markers")
    head, rest = text.split(NATIVE_START, 1)
    readme.write_text(head + NATIVE_START + "\n" + "\n".join(lines) + "\n" + NATIVE_END + rest.split(NATIVE_END, 1)[1])


def same_settings_lines(result: dict, diffusers_results: Path) -> list[str]:
    """Our caches at the same settings in ComfyUI's sampling and in the pack's diffusers path (bench/run.py): how
    far each moves from its own uncached picture."""
    import json

    from bench.report import _psnr

    if not diffusers_results.exists():
        return []
    theirs = {r["name"]: r for r in json.loads(diffusers_results.read_text())["scenarios"][0]["rows"]}
    lines = ["| setting | ComfyUI sampling: speedup | PSNR dB | SSIM | diffusers pipeline (bench/run.py): speedup | PSNR dB | SSIM |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in result["rows"]:
        if row["method"].endswith("(ours)") and row["name"] in theirs:
            other = theirs[row["name"]]
            lines.append(f"| {row['name']} | {row['speedup']:.2f}x | {_psnr(row['psnr_db'])} | {row['ssim']:.3f} | "
                         f"{other['speedup']:.2f}x | {_psnr(other['psnr_db'])} | {other['ssim']:.3f} |")
    return lines if len(lines) > 2 else []


def settings(args) -> None:
    if args.quick:
        args.steps, args.prompts, args.rounds, args.held_out, args.candidates = 8, 2, 1, 3, 1
        args.teacache, args.cachedit, args.taylorseer = (0.2, 0.6), (0.24,), (0.24,)
        args.easycache, args.lazycache = (0.2,), (0.2,)
    else:
        args.prompts, args.held_out = 6, 48
        args.steps, args.rounds, args.candidates = 50, 3, 3
        # Each threshold knob is swept finely where its rows leave the gate (0.3-0.5 for both TeaCache and EasyCache).
        args.teacache = (0.0, 0.1, 0.2, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6)  # 0: what never skipping costs
        args.cachedit = (0.08, 0.16, 0.24, 0.48)
        args.taylorseer = (0.24,)
        args.easycache = (0.05, 0.1, 0.2, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6)
        args.lazycache = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few steps and prompts: checks the command, not the numbers")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: a model this small spends a second thread's gain waiting on it, and "
                             "shared machines do not disturb the ratios)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "native")
    parser.add_argument("--render", action="store_true",
                        help="only rewrite the README's head-to-head block from the committed results.json")
    args = parser.parse_args(argv)
    default_out = args.out == ROOT / "bench" / "results" / "native"
    if args.render:
        sys.path.insert(0, str(ROOT))
        write_readme_summary(args.out / "results.json", ROOT / "README.md")
        return 0
    settings(args)
    comfy_process()
    inputs_as_on_a_gpu()
    import torch

    torch.set_num_threads(args.threads)
    from bench.harness import machine, summarize, versions
    from bench.report import write_results
    from bench.run import check_held_out, spread_over_shapes
    from reference_model.shapes import accuracy, split
    from tools.tiny_models import reference_model_folder

    started = time.perf_counter()
    folder = reference_model_folder()
    reference = Reference(folder)
    _, held_out = split()
    timed = spread_over_shapes(held_out, args.prompts)
    prompts = [(scene.caption, 100 + i) for i, scene in enumerate(timed)]
    rows_ = rows(args)
    log(f"{len(rows_)} rows x {len(prompts)} prompts x {args.rounds} rounds, {args.steps} steps, shift {reference.shift:.3f}")
    orders = measure(reference, rows_, prompts, args.steps, 4.0, args.rounds, ROW_ORDER_SEED)
    table = summarize(rows_, rows_[0], paired=True)
    dit = sum(t.numel() * t.element_size() for t in reference.model.model.diffusion_model.state_dict().values())
    for entry in table:
        entry["dit_mb"] = dit / 2**20
    result = {"name": "reference model, ComfyUI's own sampling", "model": folder.name,
              "request": {"width": 64, "height": 64, "steps": args.steps, "cfg": 4.0, "sampler": "euler",
                          "scheduler": "simple", "shift": reference.shift},
              "prompts": [p for p, _ in prompts], "rounds": args.rounds, "row_order_seed": ROW_ORDER_SEED,
              "row_order_per_slot": orders, "paired_speedup": True, "rows": table, "grid": {row.name: row.images[0] for row in rows_}}
    result["prompt_accuracy"] = {row.name: accuracy(timed, [row.images[i] for i in range(len(timed))])["all"]
                                 for row in rows_}
    by_name = {row.name: row for row in rows_}
    scenes = held_out[: args.held_out]

    def images_of(name: str):
        return [run_once(reference, by_name[name], scene.caption, 1000 + i, args.steps, 4.0)[1]
                for i, scene in enumerate(scenes)]

    check_held_out(result, scenes, images_of, args.candidates)
    result["head_to_head"] = head_to_head(result)
    command = "python bench/native.py" + (" --quick" if args.quick else "") + (
        f" --threads {args.threads}" if args.threads != 1 else "")
    seconds = time.perf_counter() - started
    write_results(args.out, [result], command, machine(), versions(), seconds)
    # what is timed here: sampling + decode (a prompt's CONDITIONING is made once, as ComfyUI caches CLIPTextEncode)
    extra = ["", "## Head to head: each method's fastest row at the gate", "", *head_to_head_lines(result), ""]
    same = same_settings_lines(result, ROOT / "bench" / "results" / "results.json")
    if same:
        extra += ["## Our caches at the same settings: ComfyUI's sampling vs the diffusers pipeline", "",
                  "Each against its own uncached pictures (the two paths draw different noise and use different "
                  "schedules, so the pictures differ; how far a cache moves from its own uncached run is what "
                  "compares).", "", *same, ""]
    readme = args.out / "README.md"
    text = readme.read_text().replace("(generate + VAE decode)", "(comfy.sample.sample + VAE decode; each prompt's "
                                      "CONDITIONING is made once, as ComfyUI keeps CLIPTextEncode's output)")
    readme.write_text(text.replace("\n## ", "\n" + "\n".join(extra) + "\n## ", 1) if "\n## " in text else text + "\n".join(extra))
    if default_out:
        write_readme_summary(args.out / "results.json", ROOT / "README.md")
    log(f"wrote {args.out} in {seconds:.0f} s")
    medians = {e['row']: e for e in result["head_to_head"].values() if e["row"]}
    log("head to head: " + ", ".join(f"{name} {e['speedup']:.2f}x" for name, e in medians.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
