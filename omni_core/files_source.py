"""A model made of single files, as ComfyUI users have them: the diffusion model from models/diffusion_models (the
second Wan 2.2 expert from another), and optionally its text encoder(s) and VAE from models/text_encoders and
models/vae. The family and every size are read from the files' headers; what a file cannot say (the scheduler,
the VAE's latent statistics, Wan 2.2's expert boundary) comes from the family's released settings.

Without a text encoder file the pipe needs ComfyUI's CONDITIONING; without a VAE file its latents are decoded by
ComfyUI's own VAE nodes (the released VAE's statistics still give the LATENT its space)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from .errors import InvalidInput, ModelLoadError
from .families.facts import ReleasedDefaults, SingleFile
from .single_file import load_denoiser
from .weights import WeightsFile, open_weights
from .weights.layouts import strip_comfy_prefix, to_diffusers
from .weights.precision import header_state, stored_state
from .weights.vaes import latent_channels, vae_kind

# The inputs each component comes from (for messages).
INPUTS = {"transformer": "model", "transformer_2": "transformer_2_file", "text_encoder": "text_encoder_file",
          "text_encoder_2": "text_encoder_2_file", "vae": "vae_file"}
DENOISERS = ("transformer", "transformer_2")


def transformer_shapes(weights: WeightsFile, layouts: tuple) -> dict[str, tuple[int, ...]]:
    """The diffusion model's tensor shapes in diffusers' keys (the file's layout converted on 'meta')."""
    meta = strip_comfy_prefix(header_state(weights))
    converted, _ = to_diffusers(meta, layouts)
    return {key: tuple(value.shape) for key, value in converted.items() if not key.endswith(".weight_scale")}


@dataclass(frozen=True)
class FilesSource:
    """The same questions as a diffusers folder (source.ModelSource) answers, from single files."""

    name: str
    family_name: str
    files: tuple[tuple[str, Path], ...]  # (component, file)
    # Folders holding tokenizers ComfyUI ships (the host passes them; a tokenizer beside the file comes first).
    tokenizer_dirs: tuple[Path, ...] = field(default=(), compare=False)

    # --- what the files are -----------------------------------------------------------------------------
    @cached_property
    def weights(self) -> dict[str, WeightsFile]:
        return {component: open_weights(path) for component, path in self.files}

    @property
    def facts(self) -> SingleFile:
        from .families import family_by_name

        return family_by_name(self.family_name).single_file

    @property
    def family(self):
        from .families import family_by_name

        return family_by_name(self.family_name)

    @cached_property
    def transformer_config(self) -> dict:
        return self.facts.config(transformer_shapes(self.weights["transformer"], self.family.single_file_layouts))

    @cached_property
    def released(self) -> ReleasedDefaults:
        return self.facts.released(self.transformer_config, "transformer_2" in self.weights)

    @property
    def folder(self) -> None:
        return None

    @property
    def pipeline_class_name(self) -> str:
        return self.released.pipeline_class

    @cached_property
    def model_index(self) -> dict:
        released = self.released
        index = {"_class_name": released.pipeline_class, "scheduler": ["diffusers", released.scheduler_class]}
        for attr in DENOISERS:
            if attr in self.weights:
                index[attr] = ["diffusers", self.facts.transformer_class]
        if "vae" in self.weights:
            index["vae"] = ["diffusers", released.vae_class]
        for attr, kind in self._text_encoder_kinds().items():
            index[attr] = ["transformers", kind.model_class]
        return index

    def _text_encoder_kinds(self) -> dict:
        given = [attr for attr in ("text_encoder", "text_encoder_2") if attr in self.weights]
        if not given:
            return {}
        from .weights.text_encoders import text_encoder_kind

        return {attr: text_encoder_kind(self.weights[attr], INPUTS[attr]) for attr in given}

    def has_component(self, component: str) -> bool:
        return component in self.model_index

    def component_config(self, component: str) -> dict:
        if component in DENOISERS:
            if component == "transformer_2":
                return self.facts.config(transformer_shapes(self.weights[component], self.family.single_file_layouts))
            return self.transformer_config
        if component == "vae":
            defaults = self._released_vae()
            return vae_kind(self.weights["vae"]).read_config(self.weights["vae"], defaults) if "vae" in self.weights \
                else defaults
        if component == "scheduler":
            return self.scheduler_config()
        kinds = self._text_encoder_kinds()
        if component in kinds:
            return kinds[component].config(self.weights[component], input_name=INPUTS[component]).to_dict()
        raise ModelLoadError(f"model: '{self.name}' has no {component}.")

    def _released_vae(self) -> dict:
        """The released VAE's configuration: its class's own defaults (Wan and Qwen-Image: the released VAE) with
        the family's values on top."""
        import inspect

        import diffusers

        released = self.released
        signature = inspect.signature(getattr(diffusers, released.vae_class).__init__)
        defaults = {k: p.default for k, p in signature.parameters.items()
                    if k != "self" and p.default is not inspect.Parameter.empty}
        return {**defaults, **released.vae}

    def scheduler_config(self) -> dict:
        return dict(self.released.scheduler)

    def processor_config(self) -> dict:
        return {}

    # --- the files on disk ---------------------------------------------------------------------------------
    def component_weights(self) -> dict[str, list[WeightsFile]]:
        return {component: [weights] for component, weights in self.weights.items()}

    def fingerprint(self) -> tuple:
        return tuple((component, str(path), path.stat().st_size, path.stat().st_mtime_ns) for component, path in self.files)

    def check_weight_files(self) -> None:
        """Every file intact and of the kind its input asks for, and the parts fitting each other (the text
        encoder's width the diffusion model's text input, the VAE's latent channels its image input), from
        the headers alone."""
        for component, weights in self.weights.items():
            weights.check(INPUTS[component])
        config = self.transformer_config
        if "vae" in self.weights:
            kind = vae_kind(self.weights["vae"])
            if self.released.vae_class not in kind.diffusers_classes:
                raise InvalidInput("vae_file", f"{self.weights['vae'].name} is a {kind.name}-type VAE; "
                                   f"{self.family_name} models decode with a {self.released.vae_class}.",
                                   f"the VAE of this {self.family_name} model")
            channels = latent_channels(self.weights["vae"])
            expected = self.family.latent_channels_of(config)
            if channels != expected:
                raise InvalidInput("vae_file", f"{self.weights['vae'].name} makes {channels}-channel latents, but "
                                   f"{self.weights['transformer'].name} denoises {expected}-channel ones.",
                                   f"the VAE of this {self.family_name} model")
        from .weights.text_encoders import check_readable, hidden_size

        for attr, kind in self._text_encoder_kinds().items():
            check_readable(self.weights[attr], INPUTS[attr])
            width = hidden_size(self.weights[attr])
            expected = self.family.text_width_of(config, attr)
            if width != expected:
                raise InvalidInput(INPUTS[attr], f"{self.weights[attr].name} encodes {width}-wide text embeddings, but "
                                   f"{self.weights['transformer'].name} takes {expected}-wide ones.",
                                   f"the {kind.name} text encoder of this {self.family_name} model")

    def empty_component(self, component: str) -> torch.nn.Module:
        import diffusers
        from accelerate import init_empty_weights

        if component not in DENOISERS or component not in self.weights:
            raise ModelLoadError(f"{component}_file: '{self.name}' has no {component}.")
        with init_empty_weights():
            return getattr(diffusers, self.facts.transformer_class).from_config(self.component_config(component))

    # --- loading -----------------------------------------------------------------------------------------
    def load_denoiser(self, component: str, dtype: torch.dtype, fp8_matmul: bool = False) -> torch.nn.Module:
        """A diffusion model from its file: fp8 layers stay fp8 (with the file's scales), GGUF stays quantized."""
        weights = self.weights[component]
        state, _ = to_diffusers(strip_comfy_prefix(stored_state(weights, dtype)), self.family.single_file_layouts)
        return load_denoiser(self.empty_component(component), weights, state, dtype, fp8_matmul, INPUTS[component])

    def load_component(self, component: str, dtype: torch.dtype) -> torch.nn.Module:
        if component == "vae":
            return self._load_vae(dtype)
        return self.load_denoiser(component, dtype)

    def _load_vae(self, dtype: torch.dtype) -> torch.nn.Module:
        import diffusers
        from accelerate import init_empty_weights

        weights = self.weights["vae"]
        kind = vae_kind(weights)
        config = self.component_config("vae")
        with init_empty_weights():
            vae = getattr(diffusers, self.released.vae_class).from_config(config)
        state = kind.to_diffusers(strip_comfy_prefix(stored_state(weights, dtype)), config)
        vae.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, strict=True,
                            assign=True)
        return vae.eval()

    def load_pipeline(self, family, dtype: torch.dtype, fp8_matmul: bool = False):
        import diffusers

        released = self.released
        parts = {attr: self.load_denoiser(attr, dtype, fp8_matmul) for attr in DENOISERS if attr in self.weights}
        parts["vae"] = self._load_vae(dtype) if "vae" in self.weights else None
        parts["scheduler"] = getattr(diffusers, released.scheduler_class).from_config(self.scheduler_config())
        kinds = self._text_encoder_kinds()
        for index, attr in enumerate(("text_encoder", "text_encoder_2")[: len(released.text_encoders)]):
            tokenizer = "tokenizer" if index == 0 else "tokenizer_2"
            if attr in kinds:
                parts[tokenizer] = kinds[attr].tokenizer(self.weights[attr], self.tokenizer_dirs)
                parts[attr] = kinds[attr].load(self.weights[attr], dtype, fp8_matmul, parts[tokenizer], INPUTS[attr])
            else:
                parts[attr], parts[tokenizer] = None, None
        pipeline = getattr(diffusers, released.pipeline_class)(**parts, **released.pipeline_config)
        pipeline.set_progress_bar_config(disable=True)
        pipeline.omni_vae_config = self.component_config("vae")  # the LATENT's space when no VAE file is loaded
        return pipeline


def family_for_files(files: dict[str, Path], families) -> object:
    """The family whose single-file markers the diffusion model file has (ModelLoadError when none does)."""
    weights = open_weights(files["transformer"])
    weights.check("model")
    keys = set(strip_comfy_prefix(header_state(weights)))
    for family in families:  # before the others: Flux.2's keys include Flux.1's markers
        if family.single_file is None and any(layout.marker in keys for layout in family.single_file_layouts):
            raise InvalidInput("model", f"{weights.name} is a {family.name} diffusion model, which Omni Accel loads "
                               f"only over a {family.name} diffusers folder (its text encoder and VAE files are not "
                               "read yet).", f"a {family.name} folder from models/diffusers as model, with this file "
                               "as transformer_file")
    for family in families:
        if family.single_file is not None and any(marker in keys for marker in family.single_file.markers):
            return family
    known = ", ".join(f.name for f in families if f.single_file is not None)
    raise InvalidInput("model", f"{weights.name} is not a diffusion model of a family Omni Accel runs (none of their "
                       "marker tensors is in it).", f"single-file {known} diffusion models")
