"""Reading and writing diffusers-layout pipeline folders (``model_index.json`` plus one folder per part)."""

import json
import logging
import os
from pathlib import Path

from ..hub import resolve_folder
from ..models.modeling import DIFFUSERS_VERSION

logger = logging.getLogger(__name__)

MODEL_INDEX = "model_index.json"
REQUIRED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# parts of reference pipelines that sdkit does not use; skipped when loading
UNUSED = ("safety_checker", "feature_extractor", "image_encoder")
TEXT_ENCODERS = ("CLIPTextModel", "CLIPTextModelWithProjection")
TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast")


def _download_patterns(variant):
    weights = f"*.{variant}.safetensors" if variant else "*.safetensors"
    return [MODEL_INDEX, "*/*.json", "*/*.txt", f"unet/{weights}", f"vae/{weights}",
            f"text_encoder/{weights}", "unet/*.index.json", "vae/*.index.json"]


def _resolve(name_or_path, variant, local_files_only):
    """A local folder, else the Hub cache, else (online and allowed) a download."""
    patterns = _download_patterns(variant)
    if local_files_only or os.path.exists(os.fspath(name_or_path)):
        return resolve_folder(name_or_path, allow_patterns=patterns, local_files_only=local_files_only)
    try:
        return resolve_folder(name_or_path, allow_patterns=patterns, local_files_only=True)
    except FileNotFoundError:
        return resolve_folder(name_or_path, allow_patterns=patterns, local_files_only=False)


def read_model_index(folder):
    path = Path(folder) / MODEL_INDEX
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a pipeline folder in the diffusers layout has a "
                                f"model_index.json beside unet/, vae/, text_encoder/, tokenizer/ and "
                                f"scheduler/. Load single models with UNet2DConditionModel.from_pretrained.")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(index, dict):
        raise ValueError(f"{path} should hold a JSON object, found {type(index).__name__}.")
    return index


def component_classes(index, source):
    """{part: class name} for the parts sdkit loads; unused or empty entries are skipped."""
    classes = {}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, (list, tuple)):
            continue  # metadata such as _class_name or requires_safety_checker
        if len(entry) != 2 or entry[1] is None or name in UNUSED:
            continue
        if name not in REQUIRED:
            logger.info("%s: skipping pipeline part %r (%s), which sdkit does not use", source, name, entry)
            continue
        classes[name] = entry[1]
    return classes


def load_components(name_or_path, torch_dtype=None, variant=None, local_files_only=False, skip=()):
    """Load unet, vae, text_encoder, tokenizer and scheduler of a pipeline folder or repo id."""
    import transformers

    from ..models import AutoencoderKL, UNet2DConditionModel
    from ..schedulers import get_scheduler_class

    folder = _resolve(name_or_path, variant, local_files_only)
    index = read_model_index(folder)
    classes = component_classes(index, folder / MODEL_INDEX)
    missing = [n for n in REQUIRED if n not in classes and n not in skip]
    if missing:
        raise ValueError(f"{folder / MODEL_INDEX} has no entry for {missing}: a Stable Diffusion pipeline "
                         f"needs {list(REQUIRED)}. Pass the missing parts to from_pretrained "
                         f"(e.g. from_pretrained(path, {missing[0]}=...)).")
    parts = {}
    for name, cls_name in classes.items():
        if name in skip:
            continue
        sub = folder / name
        if not sub.is_dir():
            raise FileNotFoundError(f"{folder / MODEL_INDEX} lists {name!r} but {sub} is missing; the "
                                    f"download is incomplete or the folder was moved.")
        if name == "unet":
            parts[name] = UNet2DConditionModel.from_pretrained(sub, torch_dtype=torch_dtype, variant=variant)
        elif name == "vae":
            parts[name] = AutoencoderKL.from_pretrained(sub, torch_dtype=torch_dtype, variant=variant)
        elif name == "text_encoder":
            if cls_name not in TEXT_ENCODERS:
                raise ValueError(f"text_encoder class {cls_name!r} in {folder / MODEL_INDEX} is not "
                                 f"supported; sdkit reads {', '.join(TEXT_ENCODERS)}.")
            kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
            if variant:
                kwargs["variant"] = variant
            parts[name] = getattr(transformers, cls_name).from_pretrained(sub, **kwargs).eval()
        elif name == "tokenizer":
            if cls_name not in TOKENIZERS:
                raise ValueError(f"tokenizer class {cls_name!r} in {folder / MODEL_INDEX} is not "
                                 f"supported; sdkit reads {', '.join(TOKENIZERS)}.")
            parts[name] = transformers.CLIPTokenizer.from_pretrained(sub)
        elif name == "scheduler":
            try:
                scheduler_class = get_scheduler_class(cls_name)
            except ValueError as e:
                raise ValueError(f"{folder / MODEL_INDEX} names the scheduler {cls_name!r}, which sdkit "
                                 f"does not have. {e} Pass one to from_pretrained(..., scheduler=...).") from None
            parts[name] = scheduler_class.from_config(sub)
    return parts


def write_model_index(save_directory, pipeline_class_name, components):
    """model_index.json with the reference class names, loadable by sdkit and by diffusers."""
    libraries = {"unet": "diffusers", "vae": "diffusers", "scheduler": "diffusers",
                 "text_encoder": "transformers", "tokenizer": "transformers"}
    index = {"_class_name": pipeline_class_name, "_diffusers_version": DIFFUSERS_VERSION,
             "feature_extractor": [None, None], "image_encoder": [None, None],
             "requires_safety_checker": False, "safety_checker": [None, None]}
    for name, part in components.items():
        index[name] = [libraries[name], type(part).__name__]
    with open(os.path.join(save_directory, MODEL_INDEX), "w") as f:
        json.dump(dict(sorted(index.items())), f, indent=2)
        f.write("\n")
