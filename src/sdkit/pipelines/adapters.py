"""LoRA adapters and textual-inversion embeddings on a pipeline, applied per call.

The reference applies a LoRA by changing the shared model (PEFT layers set on the pipeline, or
fused weights), so two requests with different LoRAs cannot share one pipeline. Here a call
never changes a shared weight: ``load_lora_weights`` reads a file once and makes each layer it
changes read the current call's changes (``lora.make_changeable``, ``sdkit.per_call``); a call
picks its adapters and weights, and sets them around its own text encoding and UNet calls only.
The pipeline keeps the loaded adapters and the default choice (``set_adapters``) under a lock;
each call takes a snapshot when it starts, so loading or deleting an adapter while calls run
changes none of them. ``fuse_lora`` is the one
exception: it adds the changes into the shared weights (faster per step), for a pipeline that
serves one setting; ``unfuse_lora`` restores the weights exactly.

A call's adapters: ``adapters={"name": w}`` (or ``(te_w, unet_w)``) for that call only, else the
``set_adapters`` choice; A1111 prompts' ``<lora:name:w>`` tags add theirs (a loaded adapter of that
name, else ``name.safetensors`` under the call's ``lora_dirs``), replacing that adapter's weights.
As in A1111, the tags of the first prompt of a batch apply to the whole batch (the UNet runs the
batch together); other prompts' differing tags are cut and a warning names them.
"""

import os
import threading
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch

from .. import prompts as syntax
from ..embeddings import Triggers, folder_embeddings, read_embedding
from ..files import cached_read
from ..lora import TEXT_ENCODER, Layers, make_changeable, place_lora, placed, read_lora_file
from ..models.modeling import PICKLE_SUFFIXES, few
from ..per_call import using

LORA_KINDS = ("lora", "lyco")  # A1111's names for LoRA tags (lyco: the LyCORIS extension's, an alias)
LORA_SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES
FILE_CACHE_SIZE = 8  # LoRA files from lora_dirs kept read, per pipeline


@dataclass(frozen=True, eq=False)
class Adapter:
    """A loaded LoRA: its name, its layer changes (``lora.LayerChange``) and its file."""

    name: str
    changes: tuple
    path: Optional[str] = None


@dataclass(frozen=True)
class CallNetworks:
    """What one call uses: the LoRA plans ({layer: ((delta, m * s), ...)}) and the embeddings."""

    text_encoder: Optional[dict] = None  # set while the call encodes text
    unet: Optional[dict] = None  # set around each UNet call
    embeddings: tuple = ()  # embeddings.Embedding / EmbeddingFile

    def triggers(self, tokenizer, text_encoder):
        """The embeddings' trigger words for this tokenizer and text encoder; None without embeddings."""
        if not self.embeddings:
            return None
        return Triggers(self.embeddings, tokenizer, text_encoder.config.hidden_size) or None


NO_NETWORKS = CallNetworks()


def with_adapters(plan):
    """A model piece that applies the call's UNet LoRA plan around each UNet call (nothing when empty)."""

    def piece(model):
        if not plan:
            return model

        def adapted(x, call):
            with using(plan):
                return model(x, call)

        return adapted

    return piece


class _Registry:
    """A pipeline's loaded adapters and embeddings; changed under the lock, read as snapshots."""

    def __init__(self):
        self.lock = threading.Lock()
        self.adapters = {}  # name -> Adapter
        self.weights = {}  # name -> (te weight, unet weight), from set_adapters
        self.active = ()  # names of the default choice
        self.fused = None  # (names, {layer: its weight before fusing})
        self.embeddings = {}  # trigger -> embeddings.Embedding
        self.files = OrderedDict()  # (path, mtime, size) -> Adapter, LoRA files read for tags


# -- checking what a call gives ------------------------------------------------------------------

def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def adapter_weight(value, what):
    """(text-encoder weight, UNet weight) of a number or a pair of numbers."""
    if _is_number(value):
        return float(value), float(value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_number(v) for v in value):
        return float(value[0]), float(value[1])
    raise ValueError(f"{what} must be a number or a pair (text_encoder_weight, unet_weight), got {value!r}.")


def folders(value, what):
    """A tuple of folder paths from None, one path or a list of paths."""
    if value is None:
        return ()
    if isinstance(value, (str, os.PathLike)):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, os.PathLike)) for v in value):
        return tuple(value)
    raise ValueError(f"{what} must be a folder path or a list of them, got {value!r}.")


def check_network_options(options):
    """Check a call's adapters, lora_dirs, embedding_dirs and allow_pickle options."""
    if options.adapters is not None:
        if not isinstance(options.adapters, dict) or not all(isinstance(k, str) for k in options.adapters):
            raise ValueError(f"adapters must be a dict {{adapter name: weight}}, got {options.adapters!r}.")
        for name, weight in options.adapters.items():
            adapter_weight(weight, f"adapters[{name!r}]")
    folders(options.lora_dirs, "lora_dirs")
    folders(options.embedding_dirs, "embedding_dirs")
    if not isinstance(options.allow_pickle, bool):
        raise ValueError(f"allow_pickle must be True or False, got {options.allow_pickle!r}.")


def lora_tags(prompts):
    """A1111's LoRA tags (``prompts.LoraTag``) of a batch: the first prompt's; a warning when others differ."""
    per_prompt = []
    for prompt in prompts:
        tags = syntax.extra_network_tags(prompt)[1]
        for tag in tags:
            if tag.kind not in LORA_KINDS:
                raise ValueError(f"{tag.text}: sdkit has no '{tag.kind}' extra networks; remove the tag from the "
                                 f"prompt.")
        per_prompt.append(tuple(syntax.lora_tag(t) for t in tags))
    first = per_prompt[0] if per_prompt else ()

    def key(tags):
        return sorted((t.name, t.te_multiplier, t.unet_multiplier, t.dyn_dim) for t in tags)

    differing = [tags for tags in per_prompt[1:] if key(tags) != key(first)]
    if differing:
        ignored = ", ".join(t.text for tags in differing for t in tags) or "(none)"
        warnings.warn(f"The prompts of this batch carry different LoRA tags; as in A1111 the first prompt's "
                      f"({', '.join(t.text for t in first) or 'none'}) apply to the whole batch, and these do not: "
                      f"{ignored}. Make one call per setting instead.", stacklevel=5)
    return first


def find_lora_file(name, dirs):
    """The path of the LoRA file whose stem is ``name`` under the folders (searched recursively, as A1111
    does; in a folder .safetensors before pickles), or None."""
    for folder in dirs:
        if not os.path.isdir(folder):
            raise ValueError(f"LoRA folder {folder} does not exist.")
        for root, subdirs, files in os.walk(folder):
            subdirs.sort()
            found = [f for f in files if os.path.splitext(f)[0] == name
                     and os.path.splitext(f)[1].lower() in LORA_SUFFIXES]
            if found:
                found.sort(key=lambda f: LORA_SUFFIXES.index(os.path.splitext(f)[1].lower()))
                return os.path.join(root, found[0])
    return None


def lora_stems(dirs):
    """The stems of the LoRA files under the folders (for messages)."""
    return sorted({os.path.splitext(f)[0] for folder in dirs for _, _, files in os.walk(folder)
                   for f in files if os.path.splitext(f)[1].lower() in LORA_SUFFIXES})


# -- the pipeline API ----------------------------------------------------------------------------

class AdapterLoaderMixin:
    """The LoRA and textual-inversion methods of a pipeline (the reference's names)."""

    @property
    def _networks(self):
        registry = self.__dict__.get("_network_registry")
        if registry is None:
            registry = self.__dict__.setdefault("_network_registry", _Registry())
        return registry

    def _layers(self):
        return Layers.of(self.unet, getattr(self, "text_encoder", None))

    def _read_adapter(self, source, name, allow_pickle):
        """An Adapter from a file path or a state dict, placed on this pipeline's layers (made changeable)."""
        if isinstance(source, (str, os.PathLike)):
            if not os.path.isfile(source):
                raise FileNotFoundError(f"LoRA file {source} does not exist.")
            state_dict, metadata = read_lora_file(source, allow_pickle)
            path, what = str(source), str(source)
        elif isinstance(source, dict):
            state_dict, metadata, path, what = source, {}, None, "the LoRA state dict"
        else:
            raise ValueError(f"load_lora_weights takes a file path or a state dict, got {type(source).__name__}.")
        changes = place_lora(state_dict, self._layers(), what, metadata)
        for change in changes:
            make_changeable(change.layer)
        return Adapter(name, changes, path)

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name=None, allow_pickle=False):
        """Load a LoRA (kohya / A1111, LyCORIS LoCon / LoHa / LoKr, diffusers / PEFT) as ``adapter_name``
        (default: the file stem, or "default_N" for a state dict) and make it the active adapter, as
        the reference does. The shared weights are not changed; pickles need ``allow_pickle=True``."""
        source = pretrained_model_name_or_path_or_dict
        registry = self._networks
        if adapter_name is None:
            if isinstance(source, (str, os.PathLike)):
                adapter_name = os.path.splitext(os.path.basename(source))[0]
            else:
                with registry.lock:
                    adapter_name = next(f"default_{i}" for i in range(len(registry.adapters) + 1)
                                        if f"default_{i}" not in registry.adapters)
        if not isinstance(adapter_name, str) or not adapter_name:
            raise ValueError(f"adapter_name must be a non-empty string, got {adapter_name!r}.")
        with registry.lock:
            if adapter_name in registry.adapters:
                raise ValueError(f"an adapter named {adapter_name!r} is already loaded: pass another adapter_name, "
                                 f"or delete_adapters({adapter_name!r}) first.")
        adapter = self._read_adapter(source, adapter_name, allow_pickle)
        with registry.lock:
            if adapter_name in registry.adapters:
                raise ValueError(f"an adapter named {adapter_name!r} was loaded meanwhile: pass another adapter_name.")
            registry.adapters = {**registry.adapters, adapter_name: adapter}
            registry.weights = {**registry.weights, adapter_name: (1.0, 1.0)}
            registry.active = (adapter_name,)

    def _known(self, registry, names):
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in registry.adapters]
        if unknown:
            raise ValueError(f"no adapter named {', '.join(map(repr, unknown))}; loaded: "
                             f"{', '.join(map(repr, registry.adapters)) or 'none'}.")
        return names

    def set_adapters(self, adapter_names, adapter_weights=None):
        """Choose the adapters calls use by default, with their weights: one for all (a number, or a tuple
        (text_encoder_weight, unet_weight)), or a list with one per adapter; default 1."""
        registry = self._networks
        with registry.lock:
            names = self._known(registry, adapter_names)
            weights = adapter_weights
            if weights is None or _is_number(weights) or isinstance(weights, tuple):  # one weight for all
                weights = [1.0 if weights is None else weights] * len(names)
            if not isinstance(weights, (list, tuple)) or len(weights) != len(names):
                raise ValueError(f"adapter_weights must be one weight, or a list with one per adapter "
                                 f"({len(names)}), got {adapter_weights!r}.")
            pairs = {n: adapter_weight(w, f"the weight of {n!r}") for n, w in zip(names, weights)}
            registry.weights = {**registry.weights, **pairs}
            registry.active = tuple(names)

    def get_active_adapters(self):
        """The names of the adapters calls use by default."""
        with self._networks.lock:
            return list(self._networks.active)

    def get_list_adapters(self):
        """The names of the loaded adapters, per part (as the reference lists them)."""
        registry = self._networks
        with registry.lock:
            out = {}
            for name, adapter in registry.adapters.items():
                for part in sorted({c.part for c in adapter.changes}):
                    out.setdefault(part, []).append(name)
            return out

    def delete_adapters(self, adapter_names):
        """Forget adapters (calls running keep theirs); a fused adapter must be unfused first."""
        registry = self._networks
        with registry.lock:
            names = self._known(registry, adapter_names)
            fused = [n for n in names if registry.fused and n in registry.fused[0]]
            if fused:
                raise ValueError(f"{', '.join(map(repr, fused))} is fused into the weights: call unfuse_lora() "
                                 f"before deleting it.")
            registry.adapters = {n: a for n, a in registry.adapters.items() if n not in names}
            registry.weights = {n: w for n, w in registry.weights.items() if n not in names}
            registry.active = tuple(n for n in registry.active if n not in names)

    def unload_lora_weights(self):
        """Forget every adapter. Fused weights stay fused (as in the reference): unfuse_lora() first to
        get the base weights back."""
        registry = self._networks
        with registry.lock:
            registry.adapters, registry.weights, registry.active, registry.fused = {}, {}, (), None
            registry.files = OrderedDict()

    def fuse_lora(self, lora_scale=1.0, adapter_names=None):
        """Add the adapters' changes (default: the active ones, at their set_adapters weights, times
        ``lora_scale``) into the shared weights: W <- W + m s dW. Faster per step, but every call on
        every thread then uses them; not while calls run. ``unfuse_lora`` restores W exactly."""
        registry = self._networks
        with registry.lock:
            if registry.fused:
                raise ValueError(f"{', '.join(registry.fused[0])} is already fused: call unfuse_lora() first.")
            names = self._known(registry, registry.active if adapter_names is None else adapter_names)
            plan = _plans([(registry.adapters[n], *(lora_scale * w for w in registry.weights[n]), None)
                           for n in names])
            originals = {}
            with torch.no_grad():
                for layer, changes in {**plan[0], **plan[1]}.items():
                    W = layer.weight
                    originals[layer] = W.detach().clone()
                    dW = sum(m * delta.weight().float().reshape(W.shape) for delta, m in changes)
                    W.copy_((W.float() + dW).to(W.dtype))
            registry.fused = (tuple(names), originals)

    def unfuse_lora(self):
        """Put back the weights fuse_lora changed, exactly (nothing when nothing is fused)."""
        registry = self._networks
        with registry.lock:
            if not registry.fused:
                return
            with torch.no_grad():
                for layer, original in registry.fused[1].items():
                    layer.weight.copy_(original)
            registry.fused = None

    def load_textual_inversion(self, pretrained_model_name_or_path, token=None, allow_pickle=False):
        """Load textual-inversion embeddings (a path, a state dict or tensor, or a list of them) for the
        trigger word ``token`` (default: A1111's file stem; diffusers files: their key). Prompts without
        the trigger word are unchanged; pickles (.pt, .bin) need ``allow_pickle=True``."""
        sources = pretrained_model_name_or_path
        sources = list(sources) if isinstance(sources, (list, tuple)) else [sources]
        tokens = list(token) if isinstance(token, (list, tuple)) else [token] * len(sources)
        if len(tokens) != len(sources) or (len(sources) > 1 and None not in tokens and len(set(tokens)) < len(tokens)):
            raise ValueError(f"pass one token per embedding ({len(sources)}), each different; got {token!r}.")
        width = self.text_encoder.config.hidden_size
        loaded = [read_embedding(s, t, allow_pickle) for s, t in zip(sources, tokens)]
        for e in loaded:
            if e.vectors.shape[1] != width:
                raise ValueError(f"embedding {e.name!r} has {e.vectors.shape[1]}-wide vectors but this pipeline's "
                                 f"text encoder is {width} wide: it was made for another model (SD 1.x: 768, "
                                 f"SD 2.x: 1024).")
        registry = self._networks
        with registry.lock:
            taken = [e.name for e in loaded if e.name in registry.embeddings]
            if taken or len({e.name for e in loaded}) < len(loaded):
                raise ValueError(f"the trigger word {(taken or [e.name for e in loaded])[0]!r} is taken: pass another "
                                 f"token=, or unload_textual_inversion it first.")
            registry.embeddings = {**registry.embeddings, **{e.name: e for e in loaded}}

    def unload_textual_inversion(self, tokens=None):
        """Forget the embeddings of these trigger words (default: all)."""
        registry = self._networks
        with registry.lock:
            if tokens is None:
                registry.embeddings = {}
                return
            tokens = [tokens] if isinstance(tokens, str) else list(tokens)
            unknown = [t for t in tokens if t not in registry.embeddings]
            if unknown:
                raise ValueError(f"no embedding with the trigger word {unknown[0]!r}; loaded: "
                                 f"{', '.join(map(repr, registry.embeddings)) or 'none'}.")
            registry.embeddings = {t: e for t, e in registry.embeddings.items() if t not in tokens}

    # -- per call ---------------------------------------------------------------------------------
    def _tag_adapter(self, tag, registry, adapters, dirs, allow_pickle):
        """The Adapter a LoRA tag names: a loaded one of that name, else the file of that stem."""
        if tag.name in adapters:
            return adapters[tag.name]
        path = find_lora_file(tag.name, dirs)
        if path is None:
            where = f"no file {tag.name}.safetensors under {', '.join(map(str, dirs))} (found: " \
                    f"{few(lora_stems(dirs)) or 'none'})" if dirs else "no lora_dirs given (--lora-dir in the CLI)"
            raise ValueError(f"{tag.text}: no LoRA named {tag.name!r}: loaded adapters: "
                             f"{', '.join(map(repr, adapters)) or 'none'}; {where}.")
        try:
            return cached_read(registry.files, registry.lock, FILE_CACHE_SIZE, path,
                               lambda p: self._read_adapter(p, tag.name, allow_pickle))
        except ValueError as e:
            raise ValueError(f"{tag.text}: {e}") from None

    def networks_for_call(self, prompts=None, prompt_syntax="plain", adapters=None, lora_dirs=None,
                          embedding_dirs=None, allow_pickle=False):
        """The :class:`CallNetworks` of a call: its adapters (``adapters=``, else the set_adapters choice,
        plus A1111 prompts' LoRA tags) and its embeddings (loaded ones, then those under ``embedding_dirs``)."""
        registry = self._networks
        with registry.lock:
            loaded, active, weights = registry.adapters, registry.active, registry.weights
            fused, embeddings = (registry.fused[0] if registry.fused else ()), tuple(registry.embeddings.values())
        if adapters is None:
            chosen = {loaded[n]: (*weights[n], None) for n in active if n not in fused}
        else:
            unknown = [n for n in adapters if n not in loaded]
            if unknown:
                raise ValueError(f"adapters names {', '.join(map(repr, unknown))}, which is not loaded; loaded: "
                                 f"{', '.join(map(repr, loaded)) or 'none'} (load_lora_weights first).")
            in_weights = [n for n in adapters if n in fused]
            if in_weights:
                raise ValueError(f"{', '.join(map(repr, in_weights))} is fused into the weights and applies to every "
                                 f"call; unfuse_lora() to choose its weight per call.")
            chosen = {loaded[n]: (*adapter_weight(w, f"adapters[{n!r}]"), None) for n, w in adapters.items()}
        if prompt_syntax == "a1111" and prompts:
            dirs = folders(lora_dirs, "lora_dirs")
            from_tags = {}
            for tag in lora_tags(prompts):
                adapter = self._tag_adapter(tag, registry, loaded, dirs, allow_pickle)
                te, unet, _ = from_tags.get(adapter, (0.0, 0.0, None))
                from_tags[adapter] = (te + tag.te_multiplier, unet + tag.unet_multiplier, tag.dyn_dim)
            chosen.update(from_tags)
        te_plan, unet_plan = _plans([(adapter, *w) for adapter, w in chosen.items()])
        names = {e.name for e in embeddings}
        files = [e for e in folder_embeddings(folders(embedding_dirs, "embedding_dirs"), allow_pickle)
                 if e.name not in names]
        return CallNetworks(te_plan or None, unet_plan or None, embeddings + tuple(files))


_PLACED = weakref.WeakKeyDictionary()  # a loaded change's delta -> {(device, dtype): it placed there}
_PLACED_LOCK = threading.Lock()


def _placed(delta, layer):
    """The delta on its layer's device and dtype, copied there once (after pipe.to() or a half-precision
    load) and kept while the adapter is loaded, instead of moved by every forward."""
    weight = layer.weight
    key = (weight.device, weight.dtype)
    with _PLACED_LOCK:
        copies = _PLACED.setdefault(delta, {})
        if key not in copies:
            copies.clear()  # the layer has moved: the copy for its old place is no longer needed
            moved = placed(delta, weight)
            # None for the delta itself: a value holding its own weak key would keep the entry forever
            copies[key] = None if moved is delta else moved
        moved = copies[key]
        return delta if moved is None else moved


def _plans(entries):
    """({layer: ((delta, m * s), ...)} of the text encoder, of the UNet) for (Adapter, te_m, unet_m, dyn) entries."""
    te, unet = {}, {}
    for adapter, te_weight, unet_weight, dyn in entries:
        for change in adapter.changes:
            on_text = change.part == TEXT_ENCODER
            m = te_weight if on_text else unet_weight
            if m:
                delta = _placed(change.delta, change.layer).first_ranks(dyn)
                (te if on_text else unet).setdefault(change.layer, []).append((delta, m * delta.scale))
    return ({k: tuple(v) for k, v in te.items()}, {k: tuple(v) for k, v in unet.items()})


__all__ = ["Adapter", "AdapterLoaderMixin", "CallNetworks", "NO_NETWORKS", "check_network_options", "with_adapters"]
