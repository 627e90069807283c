"""Write GGUF transformer files of the small models with the `gguf` package (test and benchmark data).

gguf-py quantizes F16, BF16, Q8_0 and Q4_0..Q5_1 but no K-quant; Q4_K is written here, by the format's
definition (super-blocks of 256 values in 8 groups of 32, 6-bit group scales and minimums under fp16
super-block scales), and checked against gguf-py's own dequantizer. As real converters do, tensors whose
rows do not fill whole blocks (and all 1-D tensors) stay F32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, quants



def quantize_q4_k(values: np.ndarray) -> np.ndarray:
    """float32 (rows, n*256) -> uint8 (rows, n*144) Q4_K blocks."""
    rows = values.reshape(-1, 8, 32).astype(np.float32)  # (blocks, groups, 32)
    low = np.minimum(rows.min(axis=2), 0.0)
    high = rows.max(axis=2)
    scales = (high - low) / 15.0
    d = (scales.max(axis=1) / 63.0).astype(np.float16).astype(np.float32)
    dmin = ((-low).max(axis=1) / 63.0).astype(np.float16).astype(np.float32)
    sc = np.where(d[:, None] > 0, np.round(scales / np.where(d[:, None] > 0, d[:, None], 1)), 0).clip(0, 63).astype(np.uint8)
    mn = np.where(dmin[:, None] > 0, np.round(-low / np.where(dmin[:, None] > 0, dmin[:, None], 1)), 0).clip(0, 63).astype(np.uint8)
    step = d[:, None] * sc
    offset = dmin[:, None] * mn
    q = np.where(step[..., None] > 0, np.round((rows + offset[..., None]) / np.where(step[..., None] > 0, step[..., None], 1)), 0)
    q = q.clip(0, 15).astype(np.uint8)  # (blocks, 8, 32)
    packed_scales = np.empty((rows.shape[0], 12), dtype=np.uint8)
    packed_scales[:, 0:4] = (sc[:, 0:4] & 0x3F) | ((sc[:, 4:8] >> 4) << 6)
    packed_scales[:, 4:8] = (mn[:, 0:4] & 0x3F) | ((mn[:, 4:8] >> 4) << 6)
    packed_scales[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((mn[:, 4:8] & 0x0F) << 4)
    qs = (q[:, 0::2, :] | (q[:, 1::2, :] << 4)).reshape(rows.shape[0], 128)
    blocks = np.concatenate([d.astype(np.float16).view(np.uint8).reshape(-1, 2),
                             dmin.astype(np.float16).view(np.uint8).reshape(-1, 2), packed_scales, qs], axis=1)
    return blocks.reshape(values.shape[0], -1)


def quantize(values: np.ndarray, kind: GGMLQuantizationType) -> np.ndarray:
    if kind == GGMLQuantizationType.Q4_K:
        return quantize_q4_k(values)
    return quants.quantize(values, kind)


def quantizable(tensor: torch.Tensor, kind: GGMLQuantizationType) -> bool:
    block = GGML_QUANT_SIZES[kind][0]
    return tensor.ndim == 2 and tensor.shape[-1] % block == 0


def write_gguf(path: Path, state: dict[str, torch.Tensor], kind: str) -> dict[str, int]:
    """Writes `state` (any key layout) with every quantizable weight in `kind`; returns tensors per type."""
    qtype = GGMLQuantizationType[kind]
    writer = GGUFWriter(str(path), arch="omni_test")
    counts: dict[str, int] = {}
    for key, tensor in state.items():
        values = tensor.detach().float().numpy()
        if kind == "F16":
            writer.add_tensor(key, values.astype(np.float16))
            written = "F16"
        elif quantizable(tensor, qtype):
            data = quantize(values, qtype)
            writer.add_tensor(key, data, raw_shape=data.shape, raw_dtype=qtype)
            written = kind
        else:
            writer.add_tensor(key, values)
            written = "F32"
        counts[written] = counts.get(written, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


def random_blocks(kind: GGMLQuantizationType, rows: int, blocks_per_row: int, seed: int = 0) -> np.ndarray:
    """Valid blocks of any type: random bytes with every fp16 field (scales) set to a small finite value."""
    block, type_size = GGML_QUANT_SIZES[kind]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(rows * blocks_per_row, type_size), dtype=np.uint8)
    fp16_fields = {  # byte offsets of fp16 scale fields inside a block, by type
        "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
        "Q2_K": [type_size - 4, type_size - 2], "Q3_K": [type_size - 2], "Q4_K": [0, 2], "Q5_K": [0, 2],
        "Q6_K": [type_size - 2],
    }[kind.name]
    for offset in fp16_fields:
        data[:, offset:offset + 2] = (rng.uniform(0.001, 0.01, size=len(data)).astype(np.float16)).view(np.uint8).reshape(-1, 2)
    return data.reshape(rows, blocks_per_row * type_size)
