"""Messages between the ComfyUI process and its workers: pickles over a multiprocessing connection.

Two things differ from `Connection.send`:
- tensors travel by value: the ForkingPickler it uses shares them through file descriptors that only a
  parent and its forked children can open, and these peers are separate programs (or Ray actors);
- this pack's classes are named by `omni_core....`: ComfyUI imports the pack under a module name made from
  its folder path, which a worker (importing `omni_core` from the pack's folder) cannot import.
"""

from __future__ import annotations

import importlib
import io
import pickle
import types

_PACKAGE = "omni_core"


def _portable_module(name: str) -> str:
    index = name.find("." + _PACKAGE)
    return name[index + 1:] if index >= 0 and not name.startswith(_PACKAGE) else name


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj):
        if isinstance(obj, types.ModuleType):
            return importlib.import_module, (_portable_module(obj.__name__),)
        if isinstance(obj, (type, types.FunctionType)):
            module = getattr(obj, "__module__", None) or ""
            portable = _portable_module(module)
            if portable != module:
                return getattr, (importlib.import_module(module), obj.__qualname__)
        return NotImplemented


def send(conn, message: tuple) -> None:
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(message)
    conn.send_bytes(buffer.getvalue())


def recv(conn) -> tuple:
    return pickle.loads(conn.recv_bytes())
