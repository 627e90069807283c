"""The pool's wire: authenticated frames of data; forged, altered, replayed frames and pickles are refused."""

from __future__ import annotations

import os
import pickle
import socket
import struct
import threading

import pytest
import torch
from PIL import Image

from omni_core import DecodeOptions, GenerationRequest
from omni_core.cache.teacache import TeaCache
from omni_core.parallel.messages import Done, RankError, RunRequest, Step
from omni_core.parallel.wire import Channel, WireError, decode, encode
from omni_core.preview import PreviewSettings

SECRET = b"s" * 32


def _pair(host_secret=SECRET, worker_secret=SECRET):
    """(host channel or its error, worker channel or its error) over a real loopback connection."""
    server = socket.create_server(("127.0.0.1", 0))
    results = {}

    def accept():
        sock, _ = server.accept()
        try:
            results["host"] = Channel.accept(sock, host_secret, timeout=5)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            results["host"] = exc
            sock.close()

    thread = threading.Thread(target=accept)
    thread.start()
    try:
        results["worker"] = Channel.connect(server.getsockname(), worker_secret, timeout=5)
    except Exception as exc:  # noqa: BLE001
        results["worker"] = exc
    thread.join(10)
    server.close()
    return results["host"], results["worker"]


def test_messages_round_trip_with_tensors_pictures_and_recipe_entries():
    image = Image.new("RGB", (5, 3), (200, 10, 30))
    request = GenerationRequest(prompt="a red circle", seed=7, steps=3, width=64, height=32, images=(image,))
    message = RunRequest(3, (TeaCache(rel_l1_thresh=0.3, coefficients=(1.0, -2.0)),), request,
                         PreviewSettings("decoded", 0.0))
    back = decode(encode(message))
    assert back == message and isinstance(back.entries, tuple) and back.entries[0].coefficients == (1.0, -2.0)
    assert back.request.images[0].tobytes() == image.tobytes()
    latent = torch.randn(1, 4, 2, 3, 5)
    done = decode(encode(Done(3, 0, latent, {"counters": {"steps": 3, 7: [1, 2]}, "x": float("nan")}, 12)))
    assert torch.equal(done.latent, latent) and done.report["counters"][7] == [1, 2] and done.tokens_in_first_block == 12
    assert done.report["x"] != done.report["x"], "NaN travels as NaN"
    error = RankError.of(1, ValueError("boom"))
    assert decode(encode(error)) == error and decode(encode(DecodeOptions(tile_size=64))) == DecodeOptions(tile_size=64)


def test_only_this_packages_messages_entries_and_requests_are_built():
    body = b'{"$object":"os:system","fields":{"command":"touch /tmp/pwned"}}'
    for name in ("os:system", "omni_core.store:ModelStore", "omni_core.errors:InvalidInput", "subprocess:Popen",
                 "omni_core.parallel.wire:Channel", "omni_core.cache.teacache:TeaCache.applied"):
        data = struct.pack("<II", len(body.replace(b"os:system", name.encode())), 0) + body.replace(b"os:system", name.encode())
        with pytest.raises(WireError, match="refused to build"):
            decode(data)
    with pytest.raises(WireError):
        encode(object())  # nothing that is not data can be sent either
    with pytest.raises(WireError):
        decode(pickle.dumps(Step(1, 1, 2)))


def test_a_channel_needs_the_secret_on_both_sides():
    host, worker = _pair()
    worker.send(Step(1, 2, 3))
    assert host.recv() == Step(1, 2, 3)
    host.send(Step(1, 4, 5))
    assert worker.recv() == Step(1, 4, 5)
    host.close(), worker.close()
    host, worker = _pair(worker_secret=b"x" * 32)
    assert isinstance(host, WireError) and "does not hold the pool's secret" in str(host)
    assert isinstance(worker, (EOFError, OSError, WireError))
    host, worker = _pair(host_secret=b"x" * 32)
    assert isinstance(worker, (WireError, EOFError, OSError))


def test_forged_altered_and_replayed_frames_end_the_connection():
    host, worker = _pair()
    sent = []

    class Recording:  # the worker's socket, keeping what it sends
        def __init__(self, sock):
            self.sock = sock

        def sendall(self, data):
            sent.append(data)
            self.sock.sendall(data)

    real = worker.sock
    worker.sock = Recording(real)
    worker.send(Step(1, 1, 9))
    assert host.recv() == Step(1, 1, 9)
    real.sendall(sent[0])  # replayed: its sequence number is spent
    with pytest.raises(WireError, match="failed authentication"):
        host.recv()
    host.close(), real.close()
    host, worker = _pair()
    payload = encode(Step(1, 1, 9))
    altered = struct.pack("<Q", len(payload)) + os.urandom(32) + payload  # no valid MAC without the session key
    worker.sock.sendall(altered)
    with pytest.raises(WireError, match="failed authentication"):
        host.recv()
    host.close(), worker.close()
