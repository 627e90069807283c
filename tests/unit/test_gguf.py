"""GGUF files: every supported quant type is dequantized on the fly exactly as gguf-py's reference does,
unsupported types and tensors that do not fit are named before loading, and the bytes are what the file holds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, quants
from safetensors.torch import load_file

from omni_core import LoadSpec, ModelLoadError, ModelStore, OmniPipe, Variant
from omni_core.single_file import check_transformer_file
from omni_core.weights import file as weights_file, gguf, open_weights
from tools.gguf_files import quantize_q4_k, random_blocks, write_gguf

TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "BF16"]


def _write(path, tensors: dict[str, tuple[np.ndarray, GGMLQuantizationType | None]]):
    writer = GGUFWriter(str(path), arch="omni_test")
    for name, (data, kind) in tensors.items():
        if kind is None:
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("kind", TYPES)
def test_every_type_is_dequantized_on_the_fly_like_the_reference(tmp_path, kind):
    qtype = GGMLQuantizationType[kind]
    if kind == "BF16":
        blocks = quants.quantize(np.random.default_rng(1).normal(size=(8, 512)).astype(np.float32), qtype)
    else:
        blocks = random_blocks(qtype, rows=8, blocks_per_row=512 // GGML_QUANT_SIZES[qtype][0])
    bias = np.linspace(-1, 1, 8).astype(np.float32)
    path = tmp_path / f"{kind}.gguf"
    _write(path, {"0.weight": (blocks, qtype), "0.bias": (bias, None)})
    assert {name: info.dtype for name, info in open_weights(path).tensors.items()} == {"0.weight": kind, "0.bias": "F32"}
    model = torch.nn.Sequential(torch.nn.Linear(512, 8))
    gguf.install(model, open_weights(path).read_state(), torch.float32)
    layer = model[0]
    assert type(layer).__name__ == "GGUFLinear" and layer.weight.quant_type == qtype, "kept quantized in memory"
    assert layer.weight.numel() == blocks.size, "holds the file's bytes"
    assert torch.equal(layer.bias, torch.from_numpy(bias)), "an F32 tensor of the file is loaded exactly"
    x = torch.randn(3, 512)
    reference = torch.from_numpy(quants.dequantize(blocks, qtype).astype(np.float32))
    # diffusers' dequantizers compute in fp16: each weight within one fp16 rounding of gguf-py's fp32 values.
    bound = x.abs() @ reference.abs().T * 2**-10 + 1e-6
    assert ((model(x) - (x @ reference.T + torch.from_numpy(bias))).abs() <= bound).all()


def test_q4_k_writer_round_trips_through_the_reference_dequantizer():
    values = np.random.default_rng(0).normal(0, 0.05, size=(16, 512)).astype(np.float32)
    back = quants.dequantize(quantize_q4_k(values), GGMLQuantizationType.Q4_K)
    assert np.sqrt(((back - values) ** 2).mean()) < 0.1 * values.std()


def test_unsupported_type_and_misfit_are_named_before_loading(tmp_path, model_dirs):
    source = LoadSpec.create(model_dirs["quant-qwen-image"], "quant-qwen-image").source
    family = source and LoadSpec.create(model_dirs["quant-qwen-image"], "quant-qwen-image").model_family
    state = load_file(str(model_dirs["quant-qwen-image"] / "transformer" / "diffusion_pytorch_model.safetensors"))
    unsupported = tmp_path / "iq.gguf"
    tensors = {key: (value.float().numpy(), None) for key, value in state.items()}
    name = "transformer_blocks.0.attn.to_q.weight"
    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType.IQ2_XXS]
    tensors[name] = (np.zeros((256, 256 // block * type_size), dtype=np.uint8), GGMLQuantizationType.IQ2_XXS)
    _write(unsupported, tensors)
    with pytest.raises(ModelLoadError, match=rf"transformer_file: iq.gguf: tensor '{name}' has quantization type "
                                             r"IQ2_XXS, which cannot be dequantized here. Supported types: F32, F16, "):
        check_transformer_file(family, source, "transformer", unsupported)

    flux = load_file(str(model_dirs["quant-flux"] / "transformer" / "diffusion_pytorch_model.safetensors"))
    other = tmp_path / "flux.gguf"
    write_gguf(other, flux, "Q8_0")
    with pytest.raises(ModelLoadError, match=r"transformer_file: flux.gguf does not fit the transformer of "
                                             r"'quant-qwen-image' \(QwenImageTransformer2DModel\); read as diffusers "
                                             r"layout, the model needs '.*', which the file does not have"):
        check_transformer_file(family, source, "transformer", other)

    not_gguf = tmp_path / "broken.gguf"
    not_gguf.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match="transformer_file: broken.gguf is not a readable GGUF file"):
        check_transformer_file(family, source, "transformer", not_gguf)


def test_memory_estimate_is_the_files_quantized_bytes(tmp_path, model_dirs):
    folder = model_dirs["quant-flux"]
    state = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    path = tmp_path / "q4k.gguf"
    counts = write_gguf(path, state, "Q4_K")
    assert counts["Q4_K"] > 10 and counts["F32"] > 0
    spec = LoadSpec.create(folder, "quant-flux", transformer_files={"transformer": str(path)})
    store = ModelStore()
    estimate = store.component_bytes(Variant(spec))["transformer"]
    loaded, _ = store.get(OmniPipe(spec))
    tensors = {id(t): t for t in [*loaded.pipeline.transformer.parameters(), *loaded.pipeline.transformer.buffers()]}
    measured = sum(t.numel() * t.element_size() for t in tensors.values())
    assert estimate <= measured <= estimate * 1.02
    plain = ModelStore().component_bytes(Variant(LoadSpec.create(folder, "quant-flux")))["transformer"]
    assert estimate < 0.3 * plain, "Q4_K holds well under a third of the fp32 transformer"


def test_a_first_run_with_a_gguf_transformer_reads_its_header_once(tmp_path, model_dirs, monkeypatch):
    folder = model_dirs["quant-flux"]
    state = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    path = tmp_path / "q8.gguf"
    write_gguf(path, state, "Q8_0")
    reads = []
    original = weights_file._read
    monkeypatch.setattr(weights_file, "_read", lambda p: reads.append(p) or original(p))
    parsed = []
    import gguf as gguf_package

    original_reader = gguf_package.GGUFReader.__init__
    monkeypatch.setattr(gguf_package.GGUFReader, "__init__",
                        lambda self, *a, **k: parsed.append(a) or original_reader(self, *a, **k))
    from omni_core import GenerationRequest, generate

    spec = LoadSpec.create(folder, "quant-flux", transformer_files={"transformer": str(path)})  # the Loader
    spec.check_files()
    result = generate(OmniPipe(spec), GenerationRequest(prompt="x", steps=2, cfg=1.0, width=32, height=32), ModelStore())
    assert result.report.sections["quantization"]["files"]["transformer"]["types"]["Q8_0"]["tensors"] > 0
    assert [p for p in reads if p.suffix == ".gguf"] == [path.resolve()], "one header read for check, estimate, load, report"
    assert len(parsed) == 1, "and one GGUF parse: the tensors are read through the same reader"
