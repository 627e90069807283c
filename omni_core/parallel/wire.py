"""How the host and its workers talk: authenticated frames of data, never code.

A connection starts with a mutual challenge on the pool's secret (each side proves it holds it without
sending it), which also derives this connection's session key. Every frame after that carries an
HMAC-SHA256 over its direction, its sequence number and its bytes: a frame that was forged, altered,
replayed or reordered ends the connection before its content is looked at.

Content is JSON plus binary blobs, never a pickle: tensors travel as safetensors bytes, pictures as PNG,
and objects only as dataclasses of this package's own, named by module and class and checked against an
allow-list before they are built (their own checks run when they are). So even a peer holding the key can
send data, not code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import importlib
import io
import json
import os
import socket
import struct
from typing import Any

import torch

from ..recipe import Accelerator

_PACKAGE = "omni_core"
# This package's own module name here: the pack is imported by ComfyUI under a name made from its folder,
# by a worker as plain `omni_core`.
_LOCAL_PACKAGE = __name__[: __name__.index(_PACKAGE) + len(_PACKAGE)]
# Classes that may travel besides recipe entries (Accelerator dataclasses) and the pool's messages.
_ALLOWED = {"omni_core.spec:LoadSpec", "omni_core.request:GenerationRequest", "omni_core.vae:DecodeOptions",
            "omni_core.preview:PreviewSettings"}
_MESSAGES_MODULE = "omni_core.parallel.messages"
MAX_FRAME = 8 * 2**30
HANDSHAKE_SECONDS = 10.0


class WireError(ConnectionError):
    """The peer failed authentication, or sent something that is not a valid frame or message."""


# --- content ------------------------------------------------------------------------------------------
def _portable(module: str) -> str:
    index = module.find(_PACKAGE)
    if index < 0 or (index and module[index - 1] != "."):
        raise WireError(f"{module} is not part of {_PACKAGE}")
    return module[index:]


def _class_for(name: str) -> type:
    module_name, _, qualname = name.partition(":")
    if not module_name.startswith(_PACKAGE + ".") or "." in qualname or not qualname.isidentifier():
        raise WireError(f"refused to build '{name}': not a class of {_PACKAGE}")
    module = importlib.import_module(_LOCAL_PACKAGE + module_name[len(_PACKAGE):])
    cls = getattr(module, qualname, None)
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls) and _allowed(cls, name)):
        raise WireError(f"refused to build '{name}': not a message, a recipe entry or a request")
    return cls


def _allowed(cls: type, name: str) -> bool:
    return name in _ALLOWED or name.startswith(_MESSAGES_MODULE + ":") or issubclass(cls, Accelerator)


class _Encoder:
    def __init__(self) -> None:
        self.blobs: list[bytes] = []

    def blob(self, data: bytes) -> int:
        self.blobs.append(data)
        return len(self.blobs) - 1

    def __call__(self, value: Any) -> Any:
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, (int, float)):
            return value
        if isinstance(value, (list, tuple)):
            items = [self(v) for v in value]
            return items if isinstance(value, list) else {"$tuple": items}
        if isinstance(value, dict):
            return {"$dict": [[self(k), self(v)] for k, v in value.items()]}
        if isinstance(value, (frozenset, set)):
            return {"$set": [self(v) for v in sorted(value, key=repr)]}
        if isinstance(value, bytes):
            return {"$bytes": self.blob(value)}
        if isinstance(value, torch.Tensor):
            from safetensors.torch import save

            return {"$tensor": self.blob(save({"t": value.detach().cpu().contiguous()}))}
        if hasattr(value, "item") and type(value).__module__ == "numpy":
            return self(value.item())
        if type(value).__module__.startswith("PIL."):
            buffer = io.BytesIO()
            value.save(buffer, format="PNG")
            return {"$png": self.blob(buffer.getvalue())}
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            cls = type(value)
            name = f"{_portable(cls.__module__)}:{cls.__qualname__}"
            _class_for(name)  # only what the other side would accept
            fields = {f.name: self(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
            return {"$object": name, "fields": fields}
        raise WireError(f"cannot send a {type(value).__name__}")


class _Decoder:
    def __init__(self, blobs: list[bytes]) -> None:
        self.blobs = blobs

    def blob(self, index: Any) -> bytes:
        if not isinstance(index, int) or not 0 <= index < len(self.blobs):
            raise WireError("a reference to a missing blob")
        return self.blobs[index]

    def __call__(self, value: Any) -> Any:
        if isinstance(value, list):
            return [self(v) for v in value]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            (tag, content), = value.items()
            if tag == "$tuple":
                return tuple(self(v) for v in content)
            if tag == "$dict":
                return {self._key(k): self(v) for k, v in content}
            if tag == "$set":
                return frozenset(self(v) for v in content)
            if tag == "$bytes":
                return self.blob(content)
            if tag == "$tensor":
                from safetensors.torch import load

                return load(self.blob(content))["t"]
            if tag == "$png":
                from PIL import Image

                image = Image.open(io.BytesIO(self.blob(content)))
                image.load()
                return image
        if set(value) == {"$object", "fields"} and isinstance(value["fields"], dict):
            cls = _class_for(str(value["$object"]))
            return cls(**{str(k): self(v) for k, v in value["fields"].items()})
        raise WireError("an unknown kind of value")

    def _key(self, key: Any) -> Any:
        key = self(key)
        if isinstance(key, (list, dict)):
            raise WireError("an unhashable dictionary key")
        return key


def encode(message: Any) -> bytes:
    encoder = _Encoder()
    body = json.dumps(encoder(message), allow_nan=True, separators=(",", ":")).encode()
    parts = [struct.pack("<II", len(body), len(encoder.blobs)), body]
    for blob in encoder.blobs:
        parts += [struct.pack("<Q", len(blob)), blob]
    return b"".join(parts)


def decode(data: bytes) -> Any:
    try:
        body_len, count = struct.unpack_from("<II", data, 0)
        offset = 8 + body_len
        body = json.loads(data[8:offset])
        blobs = []
        for _ in range(count):
            (size,) = struct.unpack_from("<Q", data, offset)
            offset += 8
            blobs.append(data[offset:offset + size])
            offset += size
    except (struct.error, ValueError) as exc:
        raise WireError(f"a malformed message ({exc.__class__.__name__})") from None
    if offset != len(data):
        raise WireError("a message with trailing bytes")
    return _Decoder(blobs)(body)


# --- frames ---------------------------------------------------------------------------------------------
def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"".join(parts), hashlib.sha256).digest()


def _read_exactly(sock: socket.socket, count: int) -> bytes:
    chunks, left = [], count
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise EOFError("the connection closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class Channel:
    """One authenticated connection. `send`/`recv` carry messages (see `encode`)."""

    def __init__(self, sock: socket.socket, session: bytes, outgoing: bytes, incoming: bytes):
        self.sock = sock
        self._session = session
        self._out, self._in = outgoing, incoming  # direction labels, so a frame cannot be reflected back
        self._sent = self._received = 0

    @classmethod
    def accept(cls, sock: socket.socket, secret: bytes, timeout: float = HANDSHAKE_SECONDS,
               frame_timeout: float = 120.0) -> "Channel":
        """The host's side of the handshake on an accepted connection. The host reads only when a frame has
        started to arrive: one that does not finish within `frame_timeout` ends the connection."""
        sock.settimeout(timeout)
        nonce = os.urandom(32)
        sock.sendall(nonce)
        proof, their_nonce = _read_exactly(sock, 32), _read_exactly(sock, 32)
        if not hmac.compare_digest(proof, _mac(secret, b"worker", nonce)):
            raise WireError("the peer does not hold the pool's secret")
        sock.sendall(_mac(secret, b"host", their_nonce))
        sock.settimeout(frame_timeout)
        return cls(sock, _mac(secret, b"session", nonce, their_nonce), b"host->worker", b"worker->host")

    @classmethod
    def connect(cls, address: tuple[str, int], secret: bytes, timeout: float = HANDSHAKE_SECONDS) -> "Channel":
        """The worker's side: connect to the host and prove both sides hold the secret."""
        sock = socket.create_connection(address, timeout=timeout)
        try:
            their_nonce = _read_exactly(sock, 32)
            nonce = os.urandom(32)
            sock.sendall(_mac(secret, b"worker", their_nonce) + nonce)
            if not hmac.compare_digest(_read_exactly(sock, 32), _mac(secret, b"host", nonce)):
                raise WireError("the host does not hold the pool's secret")
        except BaseException:
            sock.close()
            raise
        sock.settimeout(None)
        return cls(sock, _mac(secret, b"session", their_nonce, nonce), b"worker->host", b"host->worker")

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, message: Any) -> None:
        data = encode(message)
        header = struct.pack("<Q", len(data))
        mac = _mac(self._session, self._out, struct.pack("<Q", self._sent), header, data)
        self.sock.sendall(header + mac + data)
        self._sent += 1

    def recv(self) -> Any:
        header = _read_exactly(self.sock, 8)
        (size,) = struct.unpack("<Q", header)
        if size > MAX_FRAME:
            raise WireError(f"a frame of {size} bytes")
        mac = _read_exactly(self.sock, 32)
        data = _read_exactly(self.sock, size)
        expected = _mac(self._session, self._in, struct.pack("<Q", self._received), header, data)
        if not hmac.compare_digest(mac, expected):
            raise WireError("a frame failed authentication (forged, altered, replayed or out of order)")
        self._received += 1
        return decode(data)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
