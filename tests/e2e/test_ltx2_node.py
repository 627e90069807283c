"""LTX-2 through the real server: the shipped recipe F workflow (Omni Loader -> Sampler -> VAE Tiled Decode ->
Create Video with the Sampler's audio -> Save Video) gives frames and sound equal to plain diffusers' (the frames
read back from ComfyUI's SaveImage, the samples from the tests' AUDIO node), and the saved video file holds an h264 stream of the requested frames
and an AAC stream of the requested length; recipe G (Cache-DiT) skips calls and saves the same kind of file."""

from __future__ import annotations

import io
import json

import av
import numpy as np
import pytest
import torch

from tests.helpers import API_WORKFLOWS, comfy_uint8, png_to_array, reference_pipeline
from tools.comfy_harness import node_text_output


def _shipped(name: str, steps: int) -> dict:
    prompt = json.loads((API_WORKFLOWS / f"{name}.json").read_text())
    sampler = next(node for node in prompt.values() if node["class_type"] == "OmniSampler")
    sampler["inputs"]["steps"] = steps
    return prompt


def _sampler(prompt: dict) -> dict:
    return next(node["inputs"] for node in prompt.values() if node["class_type"] == "OmniSampler")


def _read_video(data: bytes) -> tuple[list[np.ndarray], dict]:
    with av.open(io.BytesIO(data)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        facts = {"codec": video.codec_context.name, "size": (video.codec_context.width, video.codec_context.height),
                 "audio_codec": audio.codec_context.name, "sample_rate": audio.codec_context.sample_rate,
                 "channels": audio.codec_context.channels}
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
        container.seek(0)
        samples = sum(frame.samples for frame in container.decode(audio=0))
    facts["audio_seconds"] = samples / facts["sample_rate"]
    return frames, facts


def test_recipe_f_frames_and_sound_equal_diffusers_and_the_file_holds_both(comfy, model_dirs):
    prompt = _shipped("ltx2", steps=3)
    # Beside the shipped Save Video: every frame saved as PNG by ComfyUI's SaveImage, the AUDIO's samples shown
    # exactly by the tests' node (ComfyUI's SaveAudio needs torchaudio, which the pinned torch has no build of)
    prompt["20"] = {"class_type": "SaveImage", "inputs": {"filename_prefix": "ltx2_frames", "images": ["3", 0]}}
    prompt["21"] = {"class_type": "OmniTestAudioSamples", "inputs": {"audio": ["2", 2]}}
    entry = comfy.run(prompt)
    inputs = _sampler(prompt)
    frames = np.stack([png_to_array(data) for data in comfy.output_files(entry, "20")])
    shown = json.loads(node_text_output(entry, "21")[0])
    sound, rate = np.asarray(shown["samples"]).reshape(shown["shape"])[0], shown["sample_rate"]

    pipe = reference_pipeline(str(model_dirs["tiny-ltx2"]))
    with torch.no_grad():
        video, waveform = pipe(
            prompt=inputs["prompt"], negative_prompt=inputs["negative_prompt"], num_inference_steps=3,
            width=inputs["width"], height=inputs["height"], num_frames=inputs["num_frames"],
            frame_rate=inputs["frame_rate"], guidance_scale=inputs["cfg"], stg_scale=0.0, audio_stg_scale=0.0,
            use_cross_timestep=False, spatio_temporal_guidance_blocks=[2], output_type="np",
            generator=torch.Generator("cpu").manual_seed(inputs["seed"]), return_dict=False)
    assert frames.shape == (25, 96, 128, 3)
    np.testing.assert_array_equal(frames, comfy_uint8(np.asarray(video[0])))
    expected = waveform[0].double().numpy()
    assert rate == 24000 and sound.shape == expected.shape == (2, (4 * round(25 / 24 * 25) - 3) * 240)  # mel hop x vocoder
    assert np.abs(sound - expected).max() <= 1e-6
    assert np.abs(expected).max() > 1e-3

    report = json.loads(node_text_output(entry, "6")[0])
    assert report["family"] == "ltx2" and report["audio"]["sample_rate"] == 24000
    assert report["transformer_calls"] == 3 * 2 == report["expected_transformer_calls"]  # CFG batched + modality

    [mp4] = comfy.output_files(entry, "5")
    decoded, facts = _read_video(mp4)
    assert facts["codec"] == "h264" and facts["size"] == (128, 96) and len(decoded) == 25
    assert facts["audio_codec"] == "aac" and facts["sample_rate"] == 24000 and facts["channels"] == 2
    assert abs(facts["audio_seconds"] - 25 / 24) < 0.1, facts


def test_recipe_g_caches_calls_and_saves_video_with_sound(comfy):
    prompt = _shipped("ltx2_cachedit", steps=12)
    entry = comfy.run(prompt)
    report = json.loads(node_text_output(entry, "6")[0])
    section = report["cache_dit"]
    assert section["calls_cached"] > 0 and section["calls_computed"] + section["calls_cached"] == 12 * 2
    [mp4] = comfy.output_files(entry, "5")
    decoded, facts = _read_video(mp4)
    assert len(decoded) == 25 and facts["audio_codec"] == "aac" and abs(facts["audio_seconds"] - 25 / 24) < 0.1


@pytest.mark.parametrize("bad,name", [({"num_frames": 24}, "num_frames"), ({"audio_cfg": 0.5}, "audio_cfg")])
def test_bad_ltx2_inputs_are_refused_and_the_next_run_works(comfy, bad, name):
    from tools.comfy_harness import ExecutionFailed

    prompt = _shipped("ltx2", steps=2)
    _sampler(prompt).update(bad)
    with pytest.raises(ExecutionFailed) as refused:
        comfy.run(prompt)
    assert refused.value.exception_message.startswith(f"{name}:")
    prompt = _shipped("ltx2", steps=2)
    prompt["5"]["inputs"]["filename_prefix"] = f"after_{name}"
    [mp4] = comfy.output_files(comfy.run(prompt), "5")
    assert len(_read_video(mp4)[0]) == 25
