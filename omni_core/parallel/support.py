"""Which parallel method each family supports, and why not where it does not: read from the methods' own
plans, so the README's support table (tools/parallel_support.py) and Parallel Config's refusals agree."""

from __future__ import annotations

from ..families import FAMILIES, ModelFamily

METHODS = ("Ulysses", "Ring", "CFG", "Tensor parallel", "VAE patch", "Expert", "HSDP")
NO_EXPERTS = "no token routing to experts (Wan 2.2's two experts take whole steps)"


def _component_class(source, component: str, default: str) -> str:
    if source is None:
        return default
    try:
        return source.component_config(component).get("_class_name") or default
    except (KeyError, FileNotFoundError, OSError):
        return default


def tensor_parallel_problem(family: ModelFamily, source=None) -> str | None:
    from .tensor_parallel import PLANS

    name = _component_class(source, "transformer", family.transformer_class)
    if name not in PLANS:
        return f"no tensor-parallel plan for {name} (plans: {', '.join(sorted(PLANS))})"
    return None


def hsdp_problem(family: ModelFamily, source=None) -> str | None:
    from .hsdp import BLOCK_LISTS

    name = _component_class(source, "transformer", family.transformer_class)
    if name not in BLOCK_LISTS:
        return f"no block lists known to shard for {name}"
    return None


def vae_patch_problem(family: ModelFamily, source=None) -> str | None:
    from .vae_patch import PATCH_PARALLEL_VAES

    name = _component_class(source, "vae", family.vae_class)
    if name not in PATCH_PARALLEL_VAES:
        return f"{name} has no patch-parallel decode (supported: {', '.join(PATCH_PARALLEL_VAES)})"
    return None


def cfg_parallel_problem(family: ModelFamily) -> str | None:
    if not family.true_cfg:
        return "no negative-prompt branch to split (distilled guidance only, one transformer pass per step)"
    return family.cfg_parallel_problem


def method_problems(family: ModelFamily) -> dict[str, str | None]:
    """Method -> None where the family supports it, else the reason."""
    sequence = None  # cache-dit has a context-parallel plan for every family's transformer
    return {
        "Ulysses": sequence,
        "Ring": sequence,
        "CFG": cfg_parallel_problem(family),
        "Tensor parallel": tensor_parallel_problem(family),
        "VAE patch": vae_patch_problem(family),
        "Expert": NO_EXPERTS,
        "HSDP": hsdp_problem(family),
    }


def support_table() -> str:
    """Markdown: one row per family, one column per method."""
    lines = ["| Family | " + " | ".join(METHODS) + " |", "|---|" + "---|" * len(METHODS)]
    reasons: dict[str, int] = {}
    for family in FAMILIES:
        cells = []
        for problem in method_problems(family).values():
            if problem is None:
                cells.append("✅")
            else:
                number = reasons.setdefault(problem, len(reasons) + 1)
                cells.append(f"❌ ({number})")
        lines.append(f"| {family.name} | " + " | ".join(cells) + " |")
    lines += [""] + [f"({number}) {reason}." for reason, number in reasons.items()]
    return "\n".join(lines) + "\n"
