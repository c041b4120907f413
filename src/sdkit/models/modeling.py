"""Config handling and safetensors I/O shared by every sdkit model.

A model is an ``nn.Module`` whose attribute paths equal the diffusers checkpoint keys, built from
a config dataclass whose field names equal the diffusers ``config.json`` keys. Loading checks
every key and shape and names the offenders when anything is off.
"""

import contextlib
import dataclasses
import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from .. import configuration
from ..configuration import Config
from ..files import atomic_write, read_json_object
from ..hub import resolve_folder, weights_choice
from .blocks import Attention, slice_size_for

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
CONFIG_NAME = "config.json"
PICKLE_NAMES = ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.ckpt", "model.ckpt")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
DIFFUSERS_VERSION = "0.42.1"  # the layout we read and write


class OutputTensor(torch.Tensor):
    """A model's output tensor that also answers the reference's ``.sample`` (``unet(...).sample``).

    It is the output itself (no copy); any operation on it gives a plain ``torch.Tensor``, so
    code that takes ``unet(...)`` as a tensor runs as fast as before. ``return_dict=False`` gives
    the reference's one-element tuple instead.
    """

    __torch_function__ = torch._C._disabled_torch_function_impl  # ops return plain tensors, no overhead

    @property
    def sample(self):
        return self.as_subclass(torch.Tensor)

    def __deepcopy__(self, memo):
        return self.as_subclass(torch.Tensor).clone()

    def __reduce_ex__(self, protocol):  # pickled (torch.save) as a plain tensor
        return self.as_subclass(torch.Tensor).__reduce_ex__(protocol)


def model_output(x, return_dict):
    """``x`` as the reference returns it: an OutputTensor (``.sample``), or ``(x,)`` for ``return_dict=False``."""
    return x.as_subclass(OutputTensor) if return_dict else (x,)


def variant_name(name, variant):
    """'a.safetensors' + 'fp16' -> 'a.fp16.safetensors' (the diffusers variant naming)."""
    if not variant:
        return name
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def _damaged(path, error):
    return ValueError(f"Cannot read weights file {path}: {error}. The file is damaged or truncated "
                      f"(an interrupted download?): download or save it again.")


def _read_safetensors(path):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _check_link(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _damaged(path, e) from None


def check_safetensors(path):
    """Raise a ValueError naming ``path`` unless its safetensors header is whole (reads no tensors)."""
    from safetensors import SafetensorError, safe_open

    _check_link(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _damaged(path, e) from None


def _check_link(path):
    """A symlink whose target is missing (or that points at itself) is named as such."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise FileNotFoundError(f"{path} is a symlink to {os.readlink(path)!r}, which does not exist or "
                                f"loops back to itself: replace the link with the weights file.")


def load_weights(folder, variant=None, allow_pickle=False):
    """Read the state dict of a model folder: single file, fp16-style variant, or sharded index."""
    folder = Path(folder)
    names = [variant_name(WEIGHTS_NAME, variant), variant_name(INDEX_NAME, variant)]
    for name in names:
        path = folder / name
        _check_link(path)
        if not path.is_file():
            continue
        if not name.endswith(".json"):
            return _read_safetensors(path)
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"Shard index {path} is not valid ({e}): expected a JSON object with "
                             f"a 'weight_map'.") from None
        state_dict = {}
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).is_file():
                raise FileNotFoundError(f"Shard {folder / shard} listed in {path} is missing.")
            state_dict.update(_read_safetensors(folder / shard))
        return state_dict
    pickles = [folder / variant_name(n, variant) for n in PICKLE_NAMES]
    pickles = [p for p in pickles if p.is_file()]
    if pickles:
        if not allow_pickle:
            raise ValueError(f"{pickles[0]} is a pickle checkpoint, which can run code when loaded. "
                             f"sdkit loads it only with from_pretrained(..., allow_pickle=True) "
                             f"(through torch.load(weights_only=True)); better, convert it to "
                             f"safetensors.")
        return load_pickle(pickles[0])
    hint = f" (variant {variant!r})" if variant else ""
    others = sorted(p.name for p in folder.glob("*.safetensors") if p.is_file())
    raise FileNotFoundError(f"No weights file{hint} in {folder}: expected {names[0]} or "
                            f"{names[1]}" + (f"; found {others}" if others else "") + ".")


class _TrainingCallback:
    """Stands in for the PyTorch Lightning classes a training checkpoint pickles (never called)."""


def harmless_globals():
    """The globals ``torch.load(weights_only=True)`` may meet, beyond its own, in a real ``.ckpt``.

    Exactly what A1111's restricted unpickler (modules/safe.py) allows: numpy scalars, arrays and
    dtypes, ``_codecs.encode``, ``ParameterDict``, the Python 2 ``set``, and PyTorch Lightning's
    ModelCheckpoint (a stand-in class: training metadata, never used). None of these runs code.
    """
    import _codecs

    import numpy as np

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes)
              if n.endswith("DType") and n != "ObjectDType"] if hasattr(np, "dtypes") else []
    named = [(multiarray.scalar, "numpy.core.multiarray.scalar"), (multiarray.scalar, "numpy._core.multiarray.scalar"),
             (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
             (multiarray._reconstruct, "numpy._core.multiarray._reconstruct"),
             (_codecs.encode, "_codecs.encode"), (set, "__builtin__.set"),
             (_TrainingCallback, "pytorch_lightning.callbacks.model_checkpoint"),
             (_TrainingCallback, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint")]
    return [np.dtype, np.ndarray, torch.nn.ParameterDict, *dtypes, *named]


def load_pickle(path):
    """Load a pickle checkpoint with ``weights_only=True`` and :func:`harmless_globals` (no code runs)."""
    safe_globals = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    try:
        with safe_globals(harmless_globals()) if safe_globals else contextlib.nullcontext():
            state_dict = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"Cannot read pickle checkpoint {path}: {_pickle_error(path, e)}") from None
    if isinstance(state_dict, dict) and "state_dict" in state_dict:
        state_dict = state_dict["state_dict"]
    return state_dict


def _pickle_error(path, error):
    """One line on why a pickle was refused: the globals it would import, else torch's first line."""
    scan = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)  # torch >= 2.5
    try:
        allowed = {name for g in harmless_globals() if isinstance(g, tuple) for name in g[1:]}
        refused = sorted(set(scan(str(path))) - allowed) if scan else []
    except Exception:  # not a readable pickle at all: torch's own message says why
        refused = []
    if refused:
        return (f"it imports {', '.join(refused[:5])}, which could run code, so sdkit does not load it. "
                f"Only tensors and harmless training metadata are read; if you trust the file, convert "
                f"it to safetensors with a tool that loads it unrestricted")
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__) + " (the file is damaged, truncated or not a checkpoint)"


def few(items, limit=5):
    """The first ``limit`` items joined, with how many more there are."""
    more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def check_state_dict(expected, state_dict, owner, source):
    """Raise one error naming every missing, unexpected and mis-shaped key of ``state_dict``."""
    expected = {k: tuple(v.shape) for k, v in expected.items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(f"{k}: checkpoint {tuple(state_dict[k].shape)}, model {expected[k]}"
                        for k in set(expected) & set(state_dict)
                        if tuple(state_dict[k].shape) != expected[k])
    if missing or unexpected or mismatched:
        parts = [f"{len(items)} {kind}: {few(items)}" for kind, items in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", mismatched))
                 if items]
        raise ValueError(f"Cannot load {owner} from {source}: " + "; ".join(parts)
                         + ". The checkpoint does not match this config (wrong model type, "
                           "config.json, or a damaged file).")


def parse_size(size):
    """'10GB' / '500MB' / int bytes -> int bytes."""
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = str(size).strip().upper()
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * factor)
    return int(s)


class ModelMixin(nn.Module):
    """from_config / from_pretrained / save_pretrained for a model with a config dataclass.

    Subclasses set ``config_class`` (a dataclass whose ``choice`` fields take a few values),
    ``_fixed`` (reference keys that are not fields, supported only at the listed values) and
    ``_neutral`` (known keys that do not change the architecture).
    """

    config_class = None
    _fixed: dict = {}
    _neutral: tuple = ()

    # -- config ---------------------------------------------------------------------------------
    @classmethod
    def parse_config(cls, config):
        """Our dataclass from a reference config dict; unsupported values raise, unknown keys warn."""
        cfg, ignored = configuration.read_config(cls.__name__, cls.config_class, config, cls._fixed, cls._neutral)
        if ignored:
            warnings.warn(f"{cls.__name__}: ignoring unknown config keys {sorted(ignored)}", stacklevel=3)
        return cfg

    @classmethod
    def from_config(cls, config=None, **overrides):
        """Build a randomly initialised model from a config dict (reference keys), or keywords."""
        config = {**dict(config or {}), **overrides}
        return cls(cls.parse_config(config))

    def _set_config(self, config):
        """Store ``config`` as ``self.config`` (checked: a dataclass may be passed directly)."""
        configuration.check_fields(type(self).__name__, config)
        self.config = Config({"_class_name": type(self).__name__, **dataclasses.asdict(config)})

    @property
    def dtype(self):
        return next(self.parameters()).dtype

    @property
    def device(self):
        return next(self.parameters()).device

    def set_attention_slice(self, slice_size):
        """Attention slicing, a setting of the model: "auto" (half the heads at a time), "max" (one),
        an integer, or None (off). Outputs equal the unsliced ones to float rounding."""
        for module in self.modules():
            if isinstance(module, Attention):
                module.slice_size = slice_size_for(slice_size, module.heads)

    # -- loading --------------------------------------------------------------------------------

    @classmethod
    def convert_state_dict(cls, state_dict):
        """Hook: rename legacy keys before the check (identity by default)."""
        return state_dict

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder=None, torch_dtype=None,
                        variant=None, allow_pickle=False, local_files_only=None, revision=None,
                        cache_dir=None, device=None, use_safetensors=None, low_cpu_mem_usage=None, token=None):
        """Load a model from a diffusers-layout folder (``config.json`` + safetensors) or repo id.

        ``variant="fp16"`` reads ``diffusion_pytorch_model.fp16.safetensors``; sharded checkpoints
        are read through their ``*.safetensors.index.json``. Pickle files (``.bin``, ``.ckpt``)
        load only with ``allow_pickle=True``, and then with ``torch.load(weights_only=True)``.
        Parameters are cast to ``torch_dtype`` (float32 when not given). The reference's
        ``use_safetensors``, ``low_cpu_mem_usage`` and ``token`` are taken (``hub.weights_choice``).
        """
        allow_pickle = weights_choice(cls.__name__, use_safetensors, low_cpu_mem_usage, allow_pickle)
        patterns = None
        if not os.path.exists(os.fspath(pretrained_model_name_or_path)):
            prefix = f"{subfolder}/" if subfolder else ""
            patterns = [f"{prefix}{CONFIG_NAME}", f"{prefix}*.safetensors", f"{prefix}*.json"]
        folder = resolve_folder(pretrained_model_name_or_path, subfolder, allow_patterns=patterns,
                                local_files_only=local_files_only, revision=revision, cache_dir=cache_dir,
                                token=token)
        config_path = folder / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} not found: a {cls.__name__} folder needs a "
                                    f"config.json beside its weights (diffusers layout).")
        config = read_json_object(config_path, f"{cls.__name__} config")
        name = config.get("_class_name")
        if name and name != cls.__name__:
            raise ValueError(f"{config_path} describes {name}, not {cls.__name__}: check the "
                             f"folder (or subfolder) you pass.")
        state_dict = load_weights(folder, variant=variant, allow_pickle=allow_pickle)
        try:
            with torch.device("meta"):
                model = cls.from_config(config)
        except (TypeError, ValueError) as e:  # a bad value: name the file it came from
            raise ValueError(f"{config_path}: {e} Fix the file or download the model again.") from None
        model.load_checked_state_dict(state_dict, source=str(folder), dtype=torch_dtype or torch.float32)
        model.eval()
        return model.to(device) if device is not None else model

    def load_checked_state_dict(self, state_dict, source="state dict", dtype=None):
        """Load every parameter, after checking names and shapes; one error lists all offenders."""
        state_dict = self.convert_state_dict(dict(state_dict))
        check_state_dict(self.state_dict(), state_dict, type(self).__name__, source)
        if dtype is not None:
            state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        on_meta = next(self.parameters()).is_meta
        self.load_state_dict(state_dict, strict=True, assign=on_meta)

    # -- saving ---------------------------------------------------------------------------------
    def save_pretrained(self, save_directory, variant=None, max_shard_size="10GB"):
        """Write ``config.json`` and safetensors weights (sharded above ``max_shard_size``)."""
        from safetensors.torch import save_file

        os.makedirs(save_directory, exist_ok=True)
        config = {**self.config, "_diffusers_version": DIFFUSERS_VERSION}
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
        atomic_write(os.path.join(save_directory, CONFIG_NAME),
                     lambda p: Path(p).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))
        state_dict = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        limit, shards, size = parse_size(max_shard_size), [{}], 0
        for key, tensor in state_dict.items():
            nbytes = tensor.numel() * tensor.element_size()
            if shards[-1] and size + nbytes > limit:
                shards.append({})
                size = 0
            shards[-1][key] = tensor
            size += nbytes
        meta = {"format": "pt"}
        if len(shards) == 1:
            atomic_write(os.path.join(save_directory, variant_name(WEIGHTS_NAME, variant)),
                         lambda p: save_file(shards[0], p, metadata=meta))
            return
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = variant_name(f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors", variant)
            atomic_write(os.path.join(save_directory, name), lambda p, s=shard: save_file(s, p, metadata=meta))
            weight_map.update(dict.fromkeys(shard, name))
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state_dict.values())},
                 "weight_map": weight_map}
        atomic_write(os.path.join(save_directory, variant_name(INDEX_NAME, variant)),
                     lambda p: Path(p).write_text(json.dumps(index, indent=2) + "\n"))
