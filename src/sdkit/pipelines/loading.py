"""The parts of a pipeline, and reading and writing diffusers-layout pipeline folders.

A pipeline class declares its parts as a tuple of :class:`Part`; loading, ``components``,
``from_pipe`` and ``save_pretrained`` follow that declaration, so a pipeline with another part
(a ControlNet, a second text encoder) declares one more ``Part`` and edits nothing else.
"""

import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..files import atomic_write, read_json_object
from ..hub import resolve_folder, weights_choice
from ..models.modeling import DIFFUSERS_VERSION, PICKLE_SUFFIXES, check_safetensors
from .recommended import FILE as RECOMMENDED

logger = logging.getLogger(__name__)

MODEL_INDEX = "model_index.json"
# parts of reference pipelines that sdkit does not use; skipped when loading
UNUSED = ("safety_checker", "feature_extractor", "image_encoder")
VOCABULARY = ("vocab.json", "merges.txt")  # a CLIP BPE tokenizer's files (or one tokenizer.json)


@dataclass(frozen=True)
class Part:
    """One part a pipeline class declares: its folder, its library, the classes sdkit reads, its loader."""

    name: str  # attribute and folder name ("unet")
    library: str  # written to model_index.json: "diffusers" or "transformers"
    classes: Optional[tuple]  # class names model_index.json may give (None: the loader decides)
    load: Callable  # load(folder, class_name, torch_dtype, variant) -> the part
    check: Optional[Callable] = None  # check(obj) raises for an object that cannot be this part
    save: Optional[Callable] = None  # save(obj, folder); None: obj.save_pretrained(folder)


def _load_unet(folder, class_name, torch_dtype, variant):
    from ..models import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch_dtype, variant=variant)


def _load_vae(folder, class_name, torch_dtype, variant):
    from ..models import AutoencoderKL

    return AutoencoderKL.from_pretrained(folder, torch_dtype=torch_dtype, variant=variant)


def _transformers_part(folder, load):
    """``load()``, with whatever transformers raises for a broken folder as one ValueError naming it."""
    try:
        return load()
    except Exception as e:  # transformers raises many types (OSError, KeyError, SafetensorError, ...)
        text = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(f"cannot load {folder}: {text}. Download or save this folder again.") from None


def _load_text_encoder(folder, class_name, torch_dtype, variant):
    import transformers

    weights = sorted(folder.glob("*.safetensors"))
    if not weights and not any(folder.glob("*.safetensors.index.json")):
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        found = f"only the pickle file {pickles[0]}, which can run code when loaded" if pickles else "no weights"
        raise ValueError(f"{folder} holds {found}; sdkit reads text encoders from model.safetensors: "
                         f"convert it (transformers' save_pretrained writes safetensors).")
    for path in weights:
        check_safetensors(path)
    kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
    if variant:
        kwargs["variant"] = variant
    model_class = getattr(transformers, class_name)
    return _transformers_part(folder, lambda: model_class.from_pretrained(folder, use_safetensors=True,
                                                                          **kwargs).eval())


def _load_tokenizer(folder, class_name, torch_dtype, variant):
    import transformers

    if not (folder / "tokenizer.json").is_file() and not all((folder / n).is_file() for n in VOCABULARY):
        raise ValueError(f"{folder} has no tokenizer vocabulary (tokenizer.json, or {' and '.join(VOCABULARY)}): "
                         f"the download is incomplete; download the model again.")
    return _transformers_part(folder, lambda: transformers.CLIPTokenizer.from_pretrained(folder))


def save_tokenizer(tokenizer, folder):
    """save_pretrained, plus the vocab.json and merges.txt of a BPE tokenizer if it wrote none.

    transformers 5 writes only tokenizer.json; the slow CLIPTokenizer of transformers 4 (and
    A1111's) reads vocab.json and merges.txt, so the folder gets both.
    """
    tokenizer.save_pretrained(folder)
    folder = Path(folder)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or (folder / "vocab.json").is_file():
        return
    model = json.loads(backend.to_str())["model"]
    if model.get("type") != "BPE":
        return
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "vocab.json").write_text(json.dumps(tokenizer.get_vocab(), ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def _load_scheduler(folder, class_name, torch_dtype, variant):
    from ..schedulers import get_scheduler_class

    try:
        scheduler_class = get_scheduler_class(class_name)
    except ValueError as e:
        raise ValueError(f"{folder.parent / MODEL_INDEX} names the scheduler {class_name!r}, which sdkit "
                         f"does not have. {e} Pass one to from_pretrained(..., scheduler=...).") from None
    return scheduler_class.from_config(folder)


def reference_scheduler(scheduler, owner):
    """The scheduler as the reference's SD pipelines take it: their constructors set steps_offset to 1 and
    clip_sample to False (with a deprecation note), so sdkit's do too, for the reference's pixels."""
    config, fixes = scheduler.config, {}
    if config.get("steps_offset", 1) != 1:
        fixes["steps_offset"] = 1
    if config.get("clip_sample", False) is True:
        fixes["clip_sample"] = False
    if not fixes:
        return scheduler
    changes = ", ".join(f"{k}={config[k]!r} -> {v!r}" for k, v in fixes.items())
    warnings.warn(f"{owner}: the scheduler's {changes}, as the reference's Stable Diffusion pipelines set them "
                  f"(an outdated config); set pipe.scheduler afterwards, or pass scheduler= in the call, to sample with "
                  f"it unchanged.", stacklevel=4)
    return type(scheduler).from_config(config, **fixes)


def check_scheduler(scheduler):
    from ..schedulers import Scheduler

    if not isinstance(scheduler, Scheduler):
        raise TypeError(f"scheduler must be an sdkit scheduler, got {type(scheduler).__module__}."
                        f"{type(scheduler).__name__}; convert one with e.g. "
                        f"sdkit.schedulers.DDIMScheduler.from_config(other.config).")


UNET = Part("unet", "diffusers", ("UNet2DConditionModel",), _load_unet)
VAE = Part("vae", "diffusers", ("AutoencoderKL",), _load_vae)
TEXT_ENCODER = Part("text_encoder", "transformers", ("CLIPTextModel", "CLIPTextModelWithProjection"),
                    _load_text_encoder)
TOKENIZER = Part("tokenizer", "transformers", ("CLIPTokenizer", "CLIPTokenizerFast"), _load_tokenizer,
                 save=save_tokenizer)
SCHEDULER = Part("scheduler", "diffusers", None, _load_scheduler, check_scheduler)
STABLE_DIFFUSION = (UNET, VAE, TEXT_ENCODER, TOKENIZER, SCHEDULER)


def _download_patterns(parts, variant):
    weights = f"*.{variant}.safetensors" if variant else "*.safetensors"
    return [MODEL_INDEX, RECOMMENDED, "*/*.json", "*/*.txt", *(f"{p.name}/{weights}" for p in parts)]


def _resolve(name_or_path, parts, variant, local_files_only, hub=None):
    """A local folder, else the Hub cache, else (online and allowed) a download; ``hub``: revision, cache_dir, token."""
    patterns, hub = _download_patterns(parts, variant), hub or {}
    if local_files_only or os.path.exists(os.fspath(name_or_path)):
        return resolve_folder(name_or_path, allow_patterns=patterns, local_files_only=local_files_only, **hub)
    try:
        return resolve_folder(name_or_path, allow_patterns=patterns, local_files_only=True, **hub)
    except FileNotFoundError:
        return resolve_folder(name_or_path, allow_patterns=patterns, local_files_only=False, **hub)


# the reference's "no safety checker" keywords, at the values that mean it: sdkit has no checker
NO_SAFETY_CHECKER = {"safety_checker": None, "feature_extractor": None, "image_encoder": None,
                     "requires_safety_checker": False}
HUB_KEYWORDS = ("revision", "cache_dir", "token")  # the reference's download keywords, passed to the hub


def reference_keywords(owner, keywords, loading=True):
    """(the rest, hub keywords) of a pipeline's keyword arguments, after the reference's that sdkit takes.

    The "no safety checker" forms (``safety_checker=None``, ``requires_safety_checker=False``, ...)
    change nothing, since sdkit has no checker; any other value of them is an error. When
    ``loading``, ``use_safetensors`` / ``low_cpu_mem_usage`` are checked (``hub.weights_choice``) and
    ``revision`` / ``cache_dir`` / ``token`` go to the download.
    """
    rest = dict(keywords)
    for name, value in NO_SAFETY_CHECKER.items():
        if name in rest and rest.pop(name) is not value:
            raise ValueError(f"{owner}: sdkit has no safety checker (nor feature extractor or image encoder), so "
                             f"it cannot take {name}={keywords[name]!r}; pass {name}={value!r} or leave it out.")
    if not loading:
        return rest, {}
    weights_choice(owner, rest.pop("use_safetensors", None), rest.pop("low_cpu_mem_usage", None))
    return rest, {name: rest.pop(name) for name in HUB_KEYWORDS if name in rest}


def resolve_pipeline_folder(name_or_path, parts=STABLE_DIFFUSION, variant=None, local_files_only=False, hub=None):
    """The local folder (a Path) of a pipeline folder or repo id, with the files ``parts`` need."""
    return _resolve(name_or_path, parts, variant, local_files_only, hub)


def read_model_index(folder):
    path = Path(folder) / MODEL_INDEX
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a pipeline folder in the diffusers layout has a "
                                f"model_index.json beside unet/, vae/, text_encoder/, tokenizer/ and "
                                f"scheduler/. Load single models with UNet2DConditionModel.from_pretrained.")
    return read_json_object(path, "pipeline index")


def component_classes(index, parts, source):
    """{part: class name} for the declared parts; unused or empty entries are skipped."""
    names = {p.name for p in parts}
    classes = {}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, (list, tuple)):
            continue  # metadata such as _class_name or requires_safety_checker
        if len(entry) != 2 or entry[1] is None or name in UNUSED:
            continue
        if name not in names:
            logger.info("%s: skipping pipeline part %r (%s), which sdkit does not use", source, name, entry)
            continue
        classes[name] = entry[1]
    return classes


def load_components(name_or_path, parts=STABLE_DIFFUSION, torch_dtype=None, variant=None,
                    local_files_only=False, skip=(), hub=None):
    """Load the declared ``parts`` of a pipeline folder or repo id (those in ``skip`` are left out)."""
    folder = _resolve(name_or_path, parts, variant, local_files_only, hub)
    index = read_model_index(folder)
    classes = component_classes(index, parts, folder / MODEL_INDEX)
    missing = [p.name for p in parts if p.name not in classes and p.name not in skip]
    if missing:
        raise ValueError(f"{folder / MODEL_INDEX} has no entry for {missing}: this pipeline needs "
                         f"{[p.name for p in parts]}. Pass the missing parts to from_pretrained "
                         f"(e.g. from_pretrained(path, {missing[0]}=...)).")
    loaded = {}
    for part in parts:
        if part.name in skip:
            continue
        class_name, sub = classes[part.name], folder / part.name
        if part.classes is not None and class_name not in part.classes:
            raise ValueError(f"{part.name} class {class_name!r} in {folder / MODEL_INDEX} is not "
                             f"supported; sdkit reads {', '.join(part.classes)}.")
        if not sub.is_dir():
            raise FileNotFoundError(f"{folder / MODEL_INDEX} lists {part.name!r} but {sub} is missing; the "
                                    f"download is incomplete or the folder was moved.")
        loaded[part.name] = part.load(sub, class_name, torch_dtype, variant)
    return loaded


def write_model_index(save_directory, pipeline_class_name, parts, components):
    """model_index.json with the reference class names, loadable by sdkit and by diffusers."""
    index = {"_class_name": pipeline_class_name, "_diffusers_version": DIFFUSERS_VERSION,
             "feature_extractor": [None, None], "image_encoder": [None, None],
             "requires_safety_checker": False, "safety_checker": [None, None]}
    for part in parts:
        index[part.name] = [part.library, type(components[part.name]).__name__]
    text = json.dumps(dict(sorted(index.items())), indent=2) + "\n"
    atomic_write(os.path.join(save_directory, MODEL_INDEX), lambda p: Path(p).write_text(text))
