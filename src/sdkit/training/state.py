"""A training state on disk without pickle: its tensors in safetensors, everything else in JSON.

``save_state(folder, state)`` writes ``tensors.safetensors`` and ``state.json``; ``load_state``
reads them back equal, value for value (JSON keeps floats exactly; tuples and non-string dict
keys, such as the optimizer's parameter ids, are tagged so they come back as they were).
Neither file can run code when read.
"""

import json
import os
from pathlib import Path

import torch

from ..files import atomic_write

TENSORS_FILE = "tensors.safetensors"
STATE_JSON = "state.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read back; the CLI prints it as one line."""


def _encode(value, tensors):
    """``value`` as JSON-ready data; each tensor goes to ``tensors`` and is replaced by its key."""
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().cpu().contiguous().clone()  # clone: safetensors refuses shared storage
        return {"tensor": key}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {"dict": {k: _encode(v, tensors) for k, v in value.items()}}
        return {"items": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        items = [_encode(v, tensors) for v in value]
        return {"tuple": items} if isinstance(value, tuple) else items
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"a training state holds only tensors, dicts, lists, tuples, numbers, strings and None; "
                    f"got a {type(value).__name__}")


def _decode(data, tensors):
    if isinstance(data, list):
        return [_decode(v, tensors) for v in data]
    if not isinstance(data, dict):
        return data
    (tag, body), = data.items()
    if tag == "tensor":
        return tensors[body]
    if tag == "dict":
        return {k: _decode(v, tensors) for k, v in body.items()}
    if tag == "items":
        return {_decode(k, tensors): _decode(v, tensors) for k, v in body}
    if tag == "tuple":
        return tuple(_decode(v, tensors) for v in body)
    raise ValueError(f"unknown entry {tag!r}")


def save_state(folder, state):
    """Write ``state`` (nested dicts, lists and tuples of tensors and plain values) into ``folder``."""
    from safetensors.torch import save_file

    tensors = {}
    text = json.dumps(_encode(state, tensors))
    atomic_write(os.path.join(folder, TENSORS_FILE), lambda p: save_file(tensors, p))  # a plain open()'s mode
    atomic_write(os.path.join(folder, STATE_JSON), lambda p: Path(p).write_text(text))


def load_state(folder):
    """The state ``save_state`` wrote in ``folder``; a damaged or foreign one is a CheckpointError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.path.join(folder, STATE_JSON)
    try:
        tensors = load_file(os.path.join(folder, TENSORS_FILE))
        with open(path) as f:
            return _decode(json.load(f), tensors)
    except (OSError, SafetensorError, ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"cannot read the checkpoint in {folder} ({type(e).__name__}: {e}); it is damaged "
                              f"or was not written by sdkit: delete it or pass --no-resume to start over") from None
