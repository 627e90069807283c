"""Write the benchmark's results: markdown tables, JSON, the speed-vs-quality fronts, an image grid, and the
README's summary (between its bench-summary markers)."""

from __future__ import annotations

import json
from pathlib import Path


QUALITY_BAR_DB = 30.0  # vLLM-Omni's quality gate vs the uncached output: PSNR >= 30 dB and SSIM >= 0.97
QUALITY_BAR_SSIM = 0.97
SUMMARY_START = "<!-- bench-summary:start (written by python bench/run.py from bench/results/results.json) -->"
SUMMARY_END = "<!-- bench-summary:end -->"


def meets_gate(row: dict, accuracy: dict[str, float] | None, prompts: int) -> bool:
    """vLLM-Omni's gate (PSNR and SSIM), and prompt accuracy within one prompt of the baseline's."""
    if row["psnr_db"] < QUALITY_BAR_DB or row["ssim"] < QUALITY_BAR_SSIM:
        return False
    if accuracy and row["name"] in accuracy and "baseline" in accuracy:
        return accuracy[row["name"]] >= accuracy["baseline"] - 1 / prompts - 1e-9
    return True


def _psnr(value: float) -> str:
    return "identical" if value >= 99 else f"{value:.1f}"


def _seconds(parts: dict, key: str) -> str:
    return f"{parts[key]:.3f}" if parts else "-"


def rows_table(scenario: dict) -> list[str]:
    rows = scenario["rows"]
    accuracy = scenario.get("prompt_accuracy")
    prompts = len(scenario["prompts"])
    cuda = any(r["cuda_peak_mb"] for r in rows)
    head = ("| row | median s | speedup | block passes computed | PSNR dB | SSIM | gate | DiT MB | text s | blocks s | "
            "rest of loop s | VAE s | ideal speedup | cache efficiency |")
    rule = "| --- | ---: | ---: | ---: | ---: | ---: | :---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    if accuracy:
        head, rule = head + " prompt accuracy |", rule + " ---: |"
    if cuda:
        head, rule = head + " CUDA peak MB |", rule + " ---: |"
    lines = [head, rule]
    for r in rows:
        parts = r.get("breakdown_s") or {}
        name = r["name"] + (" (default)" if r.get("default") else "")
        efficiency = f"{r['cache_efficiency']:.2f}" if "cache_efficiency" in r and r["name"] != "baseline" else "-"
        ideal = f"{r['ideal_speedup']:.2f}x" if "ideal_speedup" in r and r["name"] != "baseline" else "-"
        line = (f"| {name} | {r['median_s']:.3f} | {r['speedup']:.2f}x | {r['fraction_computed']:.0%} | {_psnr(r['psnr_db'])} | "
                f"{r['ssim']:.3f} | {'yes' if meets_gate(r, accuracy, prompts) else '**no**'} | "
                f"{r['dit_mb']:.1f} | {_seconds(parts, 'text_encode')} | {_seconds(parts, 'blocks')} | "
                f"{_seconds(parts, 'rest_of_loop')} | {_seconds(parts, 'vae_decode')} | {ideal} | {efficiency} |")
        if accuracy:
            line += f" {accuracy.get(r['name'], float('nan')):.0%} |"
        if cuda:
            line += f" {r['cuda_peak_mb'] or 0:.0f} |"
        lines.append(line)
    return lines


def headline(scenario: dict) -> list[str]:
    """Per method: its published default, and the fastest row that meets the gate on the timed prompts and on
    all held-out prompts (accuracy within one prompt of the baseline's)."""
    held = scenario["held_out"]
    by_name = {r["name"]: r for r in scenario["rows"]}
    n = held["prompts"]
    lines = [f"| method | at its default | speedup | PSNR dB | SSIM | accuracy ({n} prompts) | fastest row meeting the gate "
             f"| speedup | block passes computed | PSNR dB | SSIM | accuracy ({n} prompts) | cache efficiency |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for method, chosen in held["chosen"].items():
        default = next((r for r in scenario["rows"] if r["method"] == method and r.get("default")), None)
        if default:
            checked = held["rows"].get(default["name"], {})
            mark = "" if checked.get("meets_gate", True) else " (fails the gate)"
            cells = (f"{default['name']}{mark} | {default['speedup']:.2f}x | {_psnr(checked.get('psnr_db', default['psnr_db']))} | "
                     f"{checked.get('ssim', default['ssim']):.3f} | {checked['accuracy']:.0%}" if checked else "")
        else:
            cells = "- | - | - | - | -"
        if chosen:
            r, checked = by_name[chosen], held["rows"][chosen]
            best = (f"{chosen} | {r['speedup']:.2f}x | {r['fraction_computed']:.0%} | {_psnr(checked['psnr_db'])} | "
                    f"{checked['ssim']:.3f} | {checked['accuracy']:.0%} | {r.get('cache_efficiency', float('nan')):.2f}")
        else:
            best = f"none of the {held['candidates_per_method']} fastest passing the timed prompts' gate | - | - | - | - | - | -"
        lines.append(f"| {method} | {cells} | {best} |")
    return lines


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both speed and quality, by speed."""
    front = [p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)]
    return sorted(front)


def plot_fronts(out: Path, scenario: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    rows = [r for r in scenario["rows"] if r["method"] != "baseline"]
    for metric, ax, bar, label in (("psnr_db", axes[0], QUALITY_BAR_DB, "PSNR vs uncached, dB (identical at 60)"),
                                   ("ssim", axes[1], QUALITY_BAR_SSIM, "SSIM vs uncached")):
        for index, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
            colour = f"C{index % 10}"
            points = [(r["speedup"], min(r[metric], 60.0)) for r in rows if r["method"] == method]
            ax.scatter(*zip(*points), color=colour, s=14, alpha=0.5)
            front = pareto(points)
            ax.plot(*zip(*front), "-o", color=colour, markersize=4, label=method)
            for r in rows:
                if r["method"] == method and r.get("default"):
                    ax.scatter([r["speedup"]], [min(r[metric], 60.0)], marker="*", s=120, color=colour, edgecolor="black")
        ax.axhline(bar, color="gray", linestyle="--", linewidth=1)
        ax.set_xlabel("speedup vs uncached (median wall time)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].set_ylim(0.6, 1.005)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{scenario['name']}: speed vs quality fronts per method (line: Pareto front; star: default; dashed: gate)",
                 fontsize=10)
    fig.tight_layout()
    name = "fronts.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def grid(out: Path, scenario: dict) -> str:
    from PIL import Image, ImageDraw

    images = scenario["grid"]
    cell = 96
    columns = 8
    names = list(images)
    rows = (len(names) + columns - 1) // columns
    canvas = Image.new("RGB", (columns * cell, rows * (cell + 14)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, name in enumerate(names):
        x, y = (i % columns) * cell, (i // columns) * (cell + 14)
        canvas.paste(Image.fromarray(images[name]).resize((cell, cell), Image.NEAREST), (x, y + 14))
        draw.text((x + 2, y + 1), name[:17], fill="black")
    name = "grid.png"
    canvas.save(out / name)
    return name


def method_notes(scenario: dict) -> list[str]:
    request = scenario["request"]
    if scenario.get("paired_speedup"):
        timing = (f"rows run back to back in a shuffled order on each prompt of each round (seed "
                  f"{scenario.get('row_order_seed')}), warm-up not timed. Speedup = the median over those (round, prompt) "
                  "slots of the baseline's wall time (generate + VAE decode) / the row's in the same slot")
    else:
        timing = (f"rows shuffled per round (seed {scenario.get('row_order_seed')}), warm-up not timed. Speedup = median "
                  "wall time (generate + VAE decode) of the baseline / the row's")
    return [f"Model `{scenario['model']}`, {request['width']}x{request['height']}, {request['steps']} steps, cfg "
            f"{request['cfg']}, {len(scenario['prompts'])} prompt(s) x {scenario['rounds']} round(s), {timing}; PSNR/SSIM "
            "against the uncached images; block passes computed = calls of each block's attention query projection (a "
            "row that predicts attention but runs the MLPs, diffusers TaylorSeer, counts only the attention it computed). "
            "The seconds columns are medians of one more, untimed pass with a timer on every block call; ideal speedup = the baseline's time with its block "
            "seconds scaled by the row's fraction computed and every other cost kept; cache efficiency = speedup / ideal "
            "(above 1 when a method also skips work outside the blocks: whole model calls, as ComfyUI's EasyCache skips). "
            "DiT MB: the denoiser's weights held in memory between runs. Raw times per repetition and per-prompt "
            "scores are in results.json.", ""]


def summary(results: dict) -> list[str]:
    """What the top-level README quotes: the headline and the stacks, from results.json alone."""
    reference = results["scenarios"][0]
    held = reference["held_out"]
    by_name = {r["name"]: r for r in reference["rows"]}
    lines = [f"From `{results['command']}` ({results['seconds'] / 60:.0f} min, {results['machine']}); all tables, raw times "
             "and the fronts plot in [`bench/results/`](bench/results/README.md). Reference model, 64x64, "
             f"{reference['request']['steps']} steps; speed on {len(reference['prompts'])} prompts (two of each shape), "
             f"quality gate PSNR >= {QUALITY_BAR_DB:g} dB **and** SSIM >= {QUALITY_BAR_SSIM:g} against the uncached images, "
             f"with prompt accuracy on all {held['prompts']} held-out prompts within one prompt of the baseline's "
             f"({held['baseline_accuracy']:.1%}):", "", *headline(reference), ""]
    failing = [r for r in reference["rows"] if r.get("default") and not held["rows"].get(r["name"], {}).get("meets_gate", True)]
    if failing:
        lines += ["Defaults that fail the gate: " + ", ".join(
            f"{r['name']} ({_psnr(held['rows'][r['name']]['psnr_db'])} dB, SSIM {held['rows'][r['name']]['ssim']:.3f}, "
            f"accuracy {held['rows'][r['name']]['accuracy']:.0%})" for r in failing) + ".", ""]
    efficiencies = {m: by_name[c]["cache_efficiency"] for m, c in held["chosen"].items() if c and "cache_efficiency" in by_name[c]}
    if efficiencies:
        lines += ["Cache efficiency of the chosen rows (measured speedup / the ideal that their fraction of block passes "
                  "would give with the measured non-block costs): " + ", ".join(f"{m} {e:.2f}" for m, e in efficiencies.items())
                  + ".", ""]
    stacks = next((s for s in results["scenarios"] if s["name"].startswith("stacks")), None)
    if stacks:
        lines += ["Stacks (same model and prompts; DiT MB = the denoiser's weights held in memory):", "",
                  "| stack | speedup | PSNR dB | SSIM | gate | DiT MB |", "| --- | ---: | ---: | ---: | :---: | ---: |"]
        for r in stacks["rows"]:
            lines.append(f"| {r['name']} | {r['speedup']:.2f}x | {_psnr(r['psnr_db'])} | {r['ssim']:.3f} | "
                         f"{'yes' if meets_gate(r, None, 1) else '**no**'} | {r['dit_mb']:.1f} |")
        lines.append("")
    return lines


def write_summary(readme: Path, lines: list[str]) -> None:
    text = readme.read_text()
    if SUMMARY_START not in text or SUMMARY_END not in text:
        raise ValueError(f"{readme} has no bench-summary markers")
    head, rest = text.split(SUMMARY_START, 1)
    _, tail = rest.split(SUMMARY_END, 1)
    readme.write_text(head + SUMMARY_START + "\n" + "\n".join(lines) + "\n" + SUMMARY_END + tail)


def write_results(out: Path, scenarios: list[dict], command: str, machine: str, versions: dict[str, str],
                  seconds: float, readme: Path | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    serializable = [{k: v for k, v in s.items() if k != "grid"} for s in scenarios]
    results = {"command": command, "machine": machine, "versions": versions, "seconds": seconds, "scenarios": serializable}
    lines = ["# Benchmark results", "", f"Command: `{command}` ({seconds / 60:.1f} min)", f"Machine: {machine}",
             f"Versions: {', '.join(f'{k} {v}' for k, v in versions.items())}", ""]
    for index, scenario in enumerate(scenarios):
        lines += [f"## {scenario['name']}", "", *method_notes(scenario)]
        if "held_out" in scenario:
            held = scenario["held_out"]
            lines += [f"### Each method at its default, and its fastest row meeting the gate (PSNR >= {QUALITY_BAR_DB:g} dB "
                      f"and SSIM >= {QUALITY_BAR_SSIM:g} on the timed prompts and on all {held['prompts']} held-out prompts, "
                      f"accuracy within one prompt of the baseline's {held['baseline_accuracy']:.1%})", "",
                      *headline(scenario), "",
                      f"The rows tried on the {held['prompts']} held-out prompts (untimed; accuracy = background, colour, "
                      "position and shape all read back right):", "",
                      "| row | PSNR dB | SSIM | accuracy | meets the gate |", "| --- | ---: | ---: | ---: | :---: |",
                      *[f"| {name} | {_psnr(c['psnr_db'])} | {c['ssim']:.3f} | {c['accuracy']:.1%} | "
                        f"{'yes' if c['meets_gate'] else '**no**'} |" for name, c in held["rows"].items()], ""]
        lines += ["### All rows", "", *rows_table(scenario), ""]
        if "teacache_calibration" in scenario:
            fit = scenario["teacache_calibration"]
            lines += [f"TeaCache coefficients fitted on this model by `python -m omni_core.cache.calibrate` "
                      f"({fit['pairs']} pairs, RMSE {fit['rmse']:.3g}, R^2 {fit['r2']:.3f}): "
                      f"`{', '.join(f'{c:.4g}' for c in fit['coefficients'])}`", ""]
        if index == 0:
            lines += [f"![speed vs quality fronts]({plot_fronts(out, scenario)})", "", f"![images]({grid(out, scenario)})", ""]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    if "held_out" in scenarios[0]:
        (out / "summary.md").write_text("\n".join(summary(results)) + "\n")
        if readme is not None:
            write_summary(readme, summary(results))
