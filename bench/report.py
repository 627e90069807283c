"""Write the benchmark's results: markdown tables, JSON, a speed-vs-quality plot and an image grid."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

QUALITY_BAR_DB = 30.0  # vLLM-Omni's quality gate vs the uncached output: PSNR >= 30 dB and SSIM >= 0.97
QUALITY_BAR_SSIM = 0.97


def _table(rows: list[dict], accuracy: dict[str, float] | None = None) -> list[str]:
    head = "| row | median s | speedup | block passes computed | PSNR dB | SSIM | peak RSS MB |"
    rule = "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    if accuracy:
        head += " prompt accuracy |"
        rule += " ---: |"
    if any(r["cuda_peak_mb"] for r in rows):
        head += " CUDA peak MB |"
        rule += " ---: |"
    lines = [head, rule]
    for r in rows:
        psnr = "identical" if r["psnr_db"] >= 99 else f"{r['psnr_db']:.1f}"
        line = (f"| {r['name']} | {r['median_s']:.3f} | {r['speedup']:.2f}x | {r['fraction_computed']:.0%} | {psnr} | "
                f"{r['ssim']:.3f} | {r['peak_rss_mb']:.0f} |")
        if accuracy:
            line += f" {accuracy.get(r['name'], float('nan')):.0%} |"
        if r["cuda_peak_mb"]:
            line += f" {r['cuda_peak_mb']:.0f} |"
        lines.append(line)
    return lines


def meets_gate(row: dict, accuracy: dict[str, float] | None, prompts: int) -> bool:
    """vLLM-Omni's gate (PSNR and SSIM), and prompt accuracy within one prompt of the baseline's."""
    if row["psnr_db"] < QUALITY_BAR_DB or row["ssim"] < QUALITY_BAR_SSIM:
        return False
    if accuracy and row["name"] in accuracy and "baseline" in accuracy:
        return accuracy[row["name"]] >= accuracy["baseline"] - 1 / prompts - 1e-9
    return True


def best_at_quality(rows: list[dict], accuracy: dict[str, float] | None = None, prompts: int = 1) -> list[str]:
    """Per method: the fastest row that meets the gate."""
    lines = [f"| method | best row with PSNR >= {QUALITY_BAR_DB:g} dB, SSIM >= {QUALITY_BAR_SSIM:g}"
             f"{', accuracy within one prompt' if accuracy else ''} | speedup | block passes computed | PSNR dB | SSIM |"
             f"{' prompt accuracy |' if accuracy else ''}",
             "| --- | --- | ---: | ---: | ---: | ---: |" + (" ---: |" if accuracy else "")]
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "baseline"):
        ok = [r for r in rows if r["method"] == method and meets_gate(r, accuracy, prompts)]
        if not ok:
            lines.append(f"| {method} | none meets the gate | - | - | - | - |" + (" - |" if accuracy else ""))
            continue
        best = max(ok, key=lambda r: r["speedup"])
        psnr = "identical" if best["psnr_db"] >= 99 else f"{best['psnr_db']:.1f}"
        line = (f"| {method} | {best['name']} | {best['speedup']:.2f}x | {best['fraction_computed']:.0%} | "
                f"{psnr} | {best['ssim']:.3f} |")
        if accuracy:
            line += f" {accuracy.get(best['name'], float('nan')):.0%} |"
        lines.append(line)
    return lines


def plot(out: Path, scenario: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = scenario["rows"]
    for method in dict.fromkeys(r["method"] for r in rows):
        picked = sorted((r for r in rows if r["method"] == method), key=lambda r: r["speedup"])
        ax.plot([r["speedup"] for r in picked], [min(r["psnr_db"], 60) for r in picked], "o-", label=method)
    ax.axhline(QUALITY_BAR_DB, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("speedup vs uncached (wall time)")
    ax.set_ylabel("PSNR vs uncached, dB (identical shown at 60)")
    ax.set_title(f"{scenario['name']}: speed vs quality")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    name = "speed_vs_quality.png"
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def grid(out: Path, scenario: dict) -> str:
    from PIL import Image, ImageDraw

    images = scenario["grid"]
    cell = 96
    columns = 6
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


def write_results(out: Path, scenarios: list[dict], command: str, machine: str, seconds: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# Benchmark results", "", f"Command: `{command}` ({seconds / 60:.1f} min)", f"Machine: {machine}", ""]
    for index, scenario in enumerate(scenarios):
        request = scenario["request"]
        lines += [f"## {scenario['name']}", "",
                  f"Model `{scenario['model']}`, {request['width']}x{request['height']}, {request['steps']} steps, "
                  f"cfg {request['cfg']}, {len(scenario['prompts'])} prompt(s) x {scenario['rounds']} interleaved round(s), "
                  f"rows shuffled per round (seed {scenario.get('row_order_seed')}), warm-up not timed, raw times per "
                  "repetition and per-prompt scores in results.json; "
                  "speedup = median wall time of the baseline / the row's; PSNR/SSIM against the uncached images; "
                  "block passes computed = calls of each block's attention query projection, so a row that "
                  "predicts attention but still runs the MLPs (diffusers TaylorSeer) counts only the attention it really computed.", ""]
        if index == 0:
            lines += [f"### Best speedup per method at matched quality (PSNR >= {QUALITY_BAR_DB:g} dB and SSIM >= "
                      f"{QUALITY_BAR_SSIM:g}, prompt accuracy within one prompt of the baseline)", "",
                      *best_at_quality(scenario["rows"], scenario.get("prompt_accuracy"), len(scenario["prompts"])), ""]
        lines += ["### All rows", "", *_table(scenario["rows"], scenario.get("prompt_accuracy")), ""]
        if "teacache_calibration" in scenario:
            fit = scenario["teacache_calibration"]
            lines += [f"TeaCache coefficients fitted on this model by `python -m omni_core.cache.calibrate` "
                      f"({fit['pairs']} pairs, RMSE {fit['rmse']:.3g}, R^2 {fit['r2']:.3f}): "
                      f"`{', '.join(f'{c:.4g}' for c in fit['coefficients'])}`", ""]
        if index == 0:
            lines += [f"![speed vs quality]({plot(out, scenario)})", "", f"![images]({grid(out, scenario)})", ""]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    serializable = [{k: v for k, v in s.items() if k != "grid"} for s in scenarios]
    (out / "results.json").write_text(json.dumps({"command": command, "machine": machine, "seconds": seconds,
                                                  "scenarios": serializable}, indent=2, default=float) + "\n")


def load_image(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))
