import json
import struct

import torch
from safetensors.torch import save_file

from omni_core.weights import open_weights


def safetensors_problem(path):
    return open_weights(path).problem


def _write(path, header: dict, data: bytes):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_sound_file_passes(tmp_path):
    path = tmp_path / "ok.safetensors"
    save_file({"a": torch.zeros(3, 4), "b": torch.ones(5)}, str(path))
    assert safetensors_problem(path) is None


def test_truncated_file_is_reported_with_sizes(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file({"a": torch.zeros(64, 64)}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    problem = safetensors_problem(path)
    assert "16384 bytes" in problem and "16284" in problem and "truncated" in problem


def test_garbage_header_and_tiny_file(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\0" * 20)
    assert "not valid JSON" in safetensors_problem(garbage)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"abc")
    assert "too short" in safetensors_problem(tiny)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    assert "header claims" in safetensors_problem(huge)


def test_bad_offsets(tmp_path):
    path = tmp_path / "bad.safetensors"
    _write(path, {"a": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}}, b"\0" * 8)
    assert "invalid byte range" in safetensors_problem(path)
    _write(path, {"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4)
    assert "no valid data_offsets" in safetensors_problem(path)
