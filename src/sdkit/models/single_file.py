"""Single-file checkpoints (the A1111 / ComfyUI / Civitai ``.safetensors`` and ``.ckpt``) in and out.

Reading places every tensor of the file in a part of a Stable Diffusion pipeline (the layout is in
``ldm.py``) and reads each part's architecture from the tensor shapes; a key that finds no place
and is no known training leftover stops the load with an error that names it and says what the
file looks like. Pickles load only with ``allow_pickle=True``, through
``torch.load(weights_only=True)`` and the harmless globals A1111's restricted unpickler allows.
Writing gives the A1111 layout, safetensors only, atomically.
"""

import dataclasses
import logging
import os
from pathlib import Path

import torch

from ..files import atomic_write
from . import ldm
from .modeling import PICKLE_SUFFIXES, _read_safetensors, check_state_dict, few, load_pickle

logger = logging.getLogger(__name__)

PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction"}  # LDM yaml parameterization -> diffusers
# SD 1.x / 2.x noise schedule, with the sampler of the SD 1.5 and 2-base folders (PNDM/PLMS)
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
V_SAMPLE_SIZE = 96  # SD 2 768-v: 768 px images (64 latents = 512 px otherwise)
# files of other architectures, by a key fragment, for the error that refuses them
OTHER_ARCHITECTURES = (
    ("conditioner.embedders.", "an SDXL checkpoint (conditioner.embedders.*)"),
    ("joint_blocks.", "an SD 3 checkpoint (joint_blocks.*)"),
    ("double_blocks.", "a Flux checkpoint (double_blocks.*)"),
    ("lora_", "a LoRA (lora_* keys), not a whole model"),
    ("string_to_param", "a textual-inversion embedding, not a whole model"),
    ("emb_params", "a textual-inversion embedding, not a whole model"),
    ("control_model.", "a ControlNet (control_model.*)"),
    ("depth_model.", "an SD 2 depth model (depth_model.*)"),
    ("embedder.model.", "an SD 2 unCLIP model (embedder.*)"),
    ("low_scale_model.", "the SD x4 upscaler (low_scale_model.*)"),
    ("cond_stage_model.roberta.", "an AltDiffusion checkpoint (cond_stage_model.roberta.*)"),
    ("label_emb.", "a class- or SDXL-conditioned UNet (label_emb.*)"),
    ("down_blocks.", "a diffusers-layout weights file (down_blocks.*): load its folder with from_pretrained"),
    ("decoder.up.", "a standalone VAE: load it with AutoencoderKL.from_single_file, or pass it as vae="),
)


@dataclasses.dataclass
class Checkpoint:
    """A single file's parts, each in its source naming without prefix (``text`` in CLIPTextModel names)."""

    path: Path
    unet: dict
    vae: dict
    text: dict
    family: str  # "sd1" (CLIP ViT-L text encoder) or "sd2" (OpenCLIP ViT-H)
    alphas_cumprod: torch.Tensor = None  # the file's noise schedule, if it stores one


# -- reading a file -----------------------------------------------------------------------------

def read_file(path, allow_pickle=False):
    """The tensors of a ``.safetensors`` file, or of a pickle (only with ``allow_pickle=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not a file: pass the path of a .safetensors (or .ckpt) checkpoint.")
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ValueError(f"{path} is a pickle checkpoint, which can run code when loaded. sdkit loads it "
                             f"only with allow_pickle=True (sdkit convert --allow-pickle), through "
                             f"torch.load(weights_only=True); better, use a .safetensors file.")
        state_dict = load_pickle(path)
    elif suffix == ".safetensors":
        state_dict = _read_safetensors(path)
    else:
        raise ValueError(f"{path}: sdkit reads .safetensors checkpoints (and {', '.join(PICKLE_SUFFIXES)} "
                         f"pickles with allow_pickle=True); rename or convert the file.")
    if not isinstance(state_dict, dict) or not state_dict:
        raise ValueError(f"{path} holds no tensors (found {type(state_dict).__name__}): it is not a checkpoint.")
    return state_dict


def what_it_is(keys, all_keys=()):
    """What a file that is not SD 1.x / 2.x looks like: from the keys sdkit could not place, else all."""
    for candidates in (keys, all_keys):
        for fragment, what in OTHER_ARCHITECTURES:
            if any(fragment in k for k in candidates):
                return what
    return "not an SD 1.x / 2.x checkpoint in the CompVis / A1111 layout"


def cannot_place(path, keys, all_keys):
    """The error for keys no part takes."""
    return ValueError(f"Cannot load {path}: it is {what_it_is(keys, all_keys)}; sdkit supports SD 1.x and 2.x. "
                      f"{len(keys)} keys it could not place: {few(sorted(keys))}.")


def _sd2_turbo_names(state_dict):
    """SD 2.1 Turbo keeps its OpenCLIP tower under conditioner.embedders.0. (SGM): A1111's rename."""
    key = "conditioner.embedders.0.model.ln_final.weight"
    if key not in state_dict or state_dict[key].shape[0] != 1024 or \
            any(k.startswith("conditioner.embedders.1.") for k in state_dict):
        return state_dict
    old = "conditioner.embedders.0."
    return {"cond_stage_model." + k[len(old):] if k.startswith(old) else k: v for k, v in state_dict.items()}


def place(state_dict, path, use_ema=False):
    """Split a whole checkpoint into a :class:`Checkpoint`; any key no part takes is an error."""
    state_dict = _sd2_turbo_names(state_dict)
    prefixes = (ldm.UNET_PREFIX, ldm.VAE_PREFIX, ldm.CLIP_PREFIX, ldm.OPENCLIP_PREFIX)
    groups, ema, unplaced = {p: {} for p in prefixes}, {}, []
    for key, value in state_dict.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if not torch.is_tensor(value):
            unplaced.append(key)
        elif prefix is not None:
            groups[prefix][key[len(prefix):]] = value
        elif key.startswith(ldm.EMA_PREFIX) and key not in ldm.TRAINING_LEFTOVERS:
            ema[key] = value
        elif key not in ldm.SCHEDULE_BUFFERS + ldm.TRAINING_LEFTOVERS:
            unplaced.append(key)
    if groups[ldm.CLIP_PREFIX] and groups[ldm.OPENCLIP_PREFIX]:
        unplaced += [ldm.OPENCLIP_PREFIX + k for k in groups[ldm.OPENCLIP_PREFIX]]
    if not unplaced and not groups[ldm.UNET_PREFIX]:
        raise ValueError(f"{path} has no UNet (model.diffusion_model.* keys): it is {what_it_is(state_dict)}; "
                         f"sdkit reads whole SD 1.x / 2.x checkpoints (or a UNet or VAE alone, with "
                         f"UNet2DConditionModel / AutoencoderKL.from_single_file).")
    if groups[ldm.OPENCLIP_PREFIX] and not groups[ldm.CLIP_PREFIX]:
        text, left = _read_layout(ldm.openclip_from_ldm, groups[ldm.OPENCLIP_PREFIX], path, "text encoder")
        unplaced += [ldm.OPENCLIP_PREFIX + k for k in left]
        family = "sd2"
    else:
        text, family = ldm.clip_from_ldm(groups[ldm.CLIP_PREFIX]), "sd1"
    if unplaced:
        raise cannot_place(path, unplaced, state_dict)
    unet = groups[ldm.UNET_PREFIX]
    if use_ema:
        unet = ema_weights(unet, ema, path)
    elif ema:
        logger.info("%s also holds EMA weights (model_ema.*); use_ema=True reads them", path)
    return Checkpoint(Path(path), unet, groups[ldm.VAE_PREFIX], text, family, state_dict.get("alphas_cumprod"))


def ema_weights(unet, ema, path):
    """The UNet's EMA copies: CompVis' LitEma keeps ``model_ema.<name without dots>`` per parameter."""
    if not ema:
        raise ValueError(f"{path} has no EMA weights (model_ema.*): load it with use_ema=False.")
    names = {k: ldm.EMA_PREFIX + f"diffusion_model.{k}".replace(".", "") for k in unet}
    missing = [k for k, name in names.items() if name not in ema]
    if missing:
        raise ValueError(f"{path} has EMA weights, but not for {len(missing)} UNet keys: {few(missing)}; "
                         f"load it with use_ema=False.")
    return {k: ema[name] for k, name in names.items()}


def _read_layout(read, state_dict, path, part, *args):
    """``read(state_dict, *args)``, with layout errors naming the file and the part."""
    try:
        return read(state_dict, *args)
    except ldm.LayoutError as e:
        raise ValueError(f"Cannot read the {part} of {path}: {e}.") from None


# -- building the parts -------------------------------------------------------------------------

def build_unet(state_dict, family, path, torch_dtype=None, prefix=ldm.UNET_PREFIX):
    """sdkit's UNet from LDM UNet keys (no prefix), its architecture read from the shapes."""
    from .unet import UNet2DConditionModel

    config = _read_layout(ldm.unet_config, state_dict, path, "UNet", family)
    return _build(UNet2DConditionModel, config, ldm.unet_from_ldm, state_dict, path, torch_dtype, prefix)


def build_vae(state_dict, path, torch_dtype=None, prefix=ldm.VAE_PREFIX):
    """sdkit's VAE from LDM VAE keys (no prefix), its architecture read from the shapes."""
    from .vae import AutoencoderKL

    config = _read_layout(ldm.vae_config, state_dict, path, "VAE")
    return _build(AutoencoderKL, config, ldm.vae_from_ldm, state_dict, path, torch_dtype, prefix)


def _build(model_class, config, rename, state_dict, path, torch_dtype, prefix):
    renamed, left = rename(state_dict, config)
    if left:
        raise cannot_place(path, [prefix + k for k in left], state_dict)
    with torch.device("meta"):
        model = model_class.from_config(config)
    model.load_checked_state_dict(renamed, source=str(path), dtype=torch_dtype or torch.float32)
    return model.eval()


def build_text_encoder(state_dict, family, path, torch_dtype=None):
    """transformers' CLIPTextModel from CLIPTextModel names, its architecture read from the shapes."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(**_read_layout(ldm.text_config, state_dict, path, "text encoder", family))
    with torch.device("meta"):
        expected = CLIPTextModel(config).state_dict()
    prefix = _text_prefix(expected)
    state_dict = {prefix + k: v for k, v in state_dict.items()}
    check_state_dict(expected, state_dict, "CLIPTextModel", str(path))
    model = CLIPTextModel.from_pretrained(None, config=config, state_dict=state_dict,
                                          dtype=torch_dtype or torch.float32)
    return model.eval()


def _text_prefix(state_dict):
    """The prefix of CLIPTextModel's weights: ``text_model.`` before transformers 5.6, none since."""
    return "text_model." if any(k.startswith("text_model.") for k in state_dict) else ""


def build_tokenizer(text_encoder, family, path):
    """The CLIP BPE tokenizer of the family (SD 2 pads with "!"), as many tokens long as the encoder has positions."""
    from ..clip_vocab import OPENCLIP_PAD, SD1_PAD, VOCAB_SIZE, clip_tokenizer

    vocab = text_encoder.config.vocab_size
    if vocab != VOCAB_SIZE:
        raise ValueError(f"The text encoder of {path} has {vocab} token embeddings, not CLIP's {VOCAB_SIZE}: "
                         f"sdkit's CLIP tokenizer cannot feed it; pass its own as tokenizer=.")
    pad = OPENCLIP_PAD if family == "sd2" else SD1_PAD
    return clip_tokenizer(pad, text_encoder.config.max_position_embeddings)


def build_scheduler(prediction_type):
    """The SD 1.x / 2.x noise schedule (scaled_linear betas 0.00085-0.012) with PNDM/PLMS sampling."""
    from ..schedulers import PNDMScheduler

    return PNDMScheduler.from_config({**SD_SCHEDULER, "prediction_type": prediction_type})


# -- prediction type ----------------------------------------------------------------------------

def prediction_type_before_loading(path, given, family, in_channels):
    """(prediction type, where it came from); (None, ...) when A1111's SD 2 test must decide.

    The order: ``prediction_type=``; a ``.yaml`` beside the file (A1111's convention:
    ``model.params.parameterization``); for a 4-channel SD 2 model, A1111's test; else epsilon.
    """
    if given is not None:
        if given not in PREDICTION_TYPES.values():
            raise ValueError(f"prediction_type={given!r}: use 'epsilon' or 'v_prediction' (or None to detect it).")
        return given, "prediction_type="
    yaml_path = Path(path).with_suffix(".yaml")
    if yaml_path.is_file():
        return yaml_parameterization(yaml_path), f"{yaml_path.name} beside the file"
    if family == "sd2" and in_channels == 4:
        return None, "A1111's SD 2 test"
    return "epsilon", f"the default for {'SD 2 inpainting' if family == 'sd2' else 'SD 1.x'}"


def yaml_parameterization(path):
    """The prediction type in an LDM config YAML (``model.params.parameterization``, default "eps")."""
    import yaml

    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"Cannot read {path} ({type(e).__name__}: {e}); fix or remove it, or pass "
                         f"prediction_type=.") from None
    model = config.get("model") if isinstance(config, dict) else None
    params = model.get("params") if isinstance(model, dict) else None
    value = params.get("parameterization", "eps") if isinstance(params, dict) else "eps"
    if value not in PREDICTION_TYPES:
        raise ValueError(f"{path} has parameterization {value!r}; sdkit supports 'eps' and 'v'. Fix the file "
                         f"or pass prediction_type=.")
    return PREDICTION_TYPES[value]


def a1111_v_test(unet):
    """A1111's v-prediction test for SD 2 (modules/sd_models_config.py): the mean of
    unet(x, 999, c) - x for x = 0.5 (1, 4, 8, 8) and c = 0.5 (1, 2, context), in float32; v below -1."""
    p = next(unet.parameters())
    context = unet.config.cross_attention_dim
    context = context if isinstance(context, int) else context[0]
    x = torch.full((1, unet.config.in_channels, 8, 8), 0.5, device=p.device)
    c = torch.full((1, 2, context), 0.5, device=p.device)
    with torch.no_grad():
        return (unet(x, torch.tensor([999], device=p.device), c) - x).mean().item()


def _with_sample_size(unet, sample_size):
    """The UNet with another default latent size (a config value only)."""
    unet._set_config(type(unet).parse_config({**unet.config, "sample_size": sample_size}))
    return unet


def unet_and_prediction_type(checkpoint, given, torch_dtype, unet=None):
    """(UNet, prediction type): the file's UNet unless ``unet`` is given. A1111's test runs on the
    file's UNet in float32, before the cast to ``torch_dtype`` (or on the given UNet as it is)."""
    built = unet is None
    in_channels = _read_layout(ldm._shape, checkpoint.unet, checkpoint.path, "UNet", "input_blocks.0.0.weight")[1] \
        if built else unet.config.in_channels
    prediction_type, source = prediction_type_before_loading(checkpoint.path, given, checkpoint.family, in_channels)
    test = prediction_type is None
    if built:
        unet = build_unet(checkpoint.unet, checkpoint.family, checkpoint.path, torch.float32 if test else torch_dtype)
    if test:
        score = a1111_v_test(unet)
        prediction_type = "v_prediction" if score < -1 else "epsilon"
        source += f": mean(output - input) = {score:.3g}, v below -1"
    if built:
        unet.to(torch_dtype or torch.float32)
        if prediction_type == "v_prediction" and checkpoint.family == "sd2":
            unet = _with_sample_size(unet, V_SAMPLE_SIZE)
    logger.info("%s: prediction_type=%s (%s)", checkpoint.path.name, prediction_type, source)
    return unet, prediction_type


def check_schedule(checkpoint):
    """Warn when the file's alphas_cumprod is not SD's schedule (which sdkit uses)."""
    import warnings

    stored = checkpoint.alphas_cumprod
    if stored is None or not stored.is_floating_point():
        return
    expected = ldm.schedule_buffers(SD_SCHEDULER)["alphas_cumprod"]
    rtol = max(1e-4, 2 * torch.finfo(stored.dtype).eps)  # a half-precision file rounds it
    if stored.shape != expected.shape or not torch.allclose(stored.float(), expected, rtol=rtol, atol=1e-6):
        warnings.warn(f"{checkpoint.path} stores a noise schedule (alphas_cumprod) other than SD's scaled_linear "
                      f"0.00085-0.012, which sdkit uses; pass scheduler= to use another.", stacklevel=4)


# -- whole pipelines ----------------------------------------------------------------------------

def load_parts(path, names, prediction_type=None, torch_dtype=None, allow_pickle=False, use_ema=False,
               given=None):
    """The parts ``names`` of a pipeline from one checkpoint file; ``given`` parts are used instead.

    ``given["vae"]`` may be a path: a standalone VAE file (:func:`load_vae`).
    """
    given = dict(given or {})
    unknown = [n for n in names if n not in PARTS and n not in given]
    if unknown:
        raise ValueError(f"A single-file checkpoint holds {', '.join(PARTS)}; pass the other parts "
                         f"({', '.join(unknown)}) as keywords.")
    if "scheduler" in given:
        predicts = given["scheduler"].config.prediction_type
        if prediction_type not in (None, predicts):
            raise ValueError(f"prediction_type={prediction_type!r} but the given scheduler predicts "
                             f"{predicts!r}: pass one of them.")
        prediction_type = predicts
    if isinstance(given.get("vae"), (str, os.PathLike)):
        given["vae"] = load_vae(given["vae"], torch_dtype, allow_pickle)
    checkpoint = place(read_file(path, allow_pickle), path, use_ema)
    parts = dict(given)
    parts["unet"], predicted = unet_and_prediction_type(checkpoint, prediction_type, torch_dtype, given.get("unet"))
    if "vae" not in parts:
        if not checkpoint.vae:
            raise ValueError(f"{path} has no VAE (first_stage_model.* keys): pass one, e.g. "
                             f"vae='vae-ft-mse-840000-ema-pruned.safetensors'.")
        parts["vae"] = build_vae(checkpoint.vae, path, torch_dtype)
    if "text_encoder" not in parts:
        if not checkpoint.text:
            raise ValueError(f"{path} has no text encoder (cond_stage_model.* keys): pass text_encoder= and "
                             f"tokenizer=.")
        parts["text_encoder"] = build_text_encoder(checkpoint.text, checkpoint.family, path, torch_dtype)
    if "tokenizer" not in parts:
        parts["tokenizer"] = build_tokenizer(parts["text_encoder"], checkpoint.family, path)
    if "scheduler" not in parts:
        check_schedule(checkpoint)
        parts["scheduler"] = build_scheduler(predicted)
    return {n: parts[n] for n in names}


def load_unet(path, torch_dtype=None, allow_pickle=False, use_ema=False):
    """The UNet of a whole checkpoint (``model.diffusion_model.*``) or of a bare LDM UNet file."""
    state_dict = read_file(path, allow_pickle)
    if any(k.startswith(ldm.UNET_PREFIX) for k in state_dict):
        checkpoint = place(state_dict, path, use_ema)
        return build_unet(checkpoint.unet, checkpoint.family, path, torch_dtype)
    if not any(k.startswith("input_blocks.") for k in state_dict):
        raise cannot_place(path, list(state_dict), state_dict)
    family = "sd2" if any(k.endswith("proj_in.weight") and v.ndim == 2 for k, v in state_dict.items()) else "sd1"
    return build_unet(state_dict, family, path, torch_dtype, prefix="")


def load_vae(path, torch_dtype=None, allow_pickle=False):
    """The VAE of a whole checkpoint, or a standalone A1111 VAE file (``encoder.*``, ``decoder.*``,
    ``quant_conv``, ``post_quant_conv``, no prefix; training leftovers ``loss.*`` are skipped)."""
    state_dict = read_file(path, allow_pickle)
    if any(k.startswith(ldm.UNET_PREFIX) for k in state_dict):  # a whole checkpoint, checked as one
        return build_vae(place(state_dict, path).vae, path, torch_dtype)
    prefix = ldm.VAE_PREFIX if any(k.startswith(ldm.VAE_PREFIX) for k in state_dict) else ""
    vae = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix) and
           k[len(prefix):].split(".", 1)[0] in ("encoder", "decoder", "quant_conv", "post_quant_conv")}
    left = [k for k in state_dict if not (k.startswith(prefix) and k[len(prefix):] in vae)
            and not k.startswith("loss.") and k not in ldm.TRAINING_LEFTOVERS]
    if left or not vae:
        raise cannot_place(path, left or list(state_dict), state_dict)
    return build_vae(vae, path, torch_dtype, prefix=prefix)


# -- writing ------------------------------------------------------------------------------------

# no effect on float32 outputs (or, for the heads of the pooled-prompt embedding, refused with its keys)
UNCOMPARED = ("sample_size", "upcast_attention", "dropout", "force_upcast", "addition_embed_type_num_heads")
TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "max_position_embeddings", "hidden_act", "layer_norm_eps")


def pipeline_state_dict(components):
    """The A1111-layout state dict of a pipeline's parts (no copy of the weights where none is needed).

    Refuses parts the layout cannot carry or that a reader would build differently (checked by
    reading the result back with the same inference that loading uses).
    """
    from ..schedulers import Scheduler
    from .unet import UNet2DConditionModel
    from .vae import AutoencoderKL

    unet, vae, text_encoder = components["unet"], components["vae"], components["text_encoder"]
    for name, part, kind in (("unet", unet, UNet2DConditionModel), ("vae", vae, AutoencoderKL),
                             ("scheduler", components["scheduler"], Scheduler)):
        if not isinstance(part, kind):
            raise TypeError(f"save_single_file needs an sdkit {kind.__name__} as {name}, got {type(part).__name__}.")
    if type(text_encoder).__name__ != "CLIPTextModel":
        raise TypeError(f"save_single_file needs transformers' CLIPTextModel as text_encoder, got "
                        f"{type(text_encoder).__name__}.")
    family = "sd2" if text_encoder.config.hidden_act == "gelu" else "sd1"
    out = {}
    for prefix, (renamed, left), what in (
            (ldm.UNET_PREFIX, ldm.unet_to_ldm(unet.state_dict(), unet.config), "UNet"),
            (ldm.VAE_PREFIX, ldm.vae_to_ldm(vae.state_dict(), vae.config), "VAE"),
            _text_to_ldm(text_encoder, family)):
        if left:
            raise ValueError(f"The A1111 layout has no place for the {what}'s {few(sorted(left))}: save the "
                             f"pipeline as a folder (save_pretrained) instead.")
        out.update({prefix + k: v for k, v in renamed.items()})
    out.update(ldm.schedule_buffers(components["scheduler"].config))
    _check_readable(out, components, family)
    return out


def _text_to_ldm(text_encoder, family):
    state_dict = text_encoder.state_dict()
    prefix = _text_prefix(state_dict)
    state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    if family == "sd2":
        return ldm.OPENCLIP_PREFIX, ldm.openclip_to_ldm(state_dict), "text encoder"
    return ldm.CLIP_PREFIX, (ldm.clip_to_ldm(state_dict), {}), "text encoder"


def _check_readable(state_dict, components, family):
    """Raise unless reading ``state_dict`` back gives the architecture of ``components``."""
    from ..clip_vocab import OPENCLIP_PAD, SD1_PAD, is_clip_vocabulary
    from .unet import UNet2DConditionModel, _per_level
    from .vae import AutoencoderKL

    back = place(state_dict, "the exported state dict")
    unet, vae, text_encoder = components["unet"], components["vae"], components["text_encoder"]
    n = len(unet.config.block_out_channels)

    def levels(config):  # per-level values compared level by level, however they are written
        return {k: _per_level(v, n, k) if k in ("layers_per_block", "attention_head_dim", "cross_attention_dim",
                                                  "transformer_layers_per_block") else v for k, v in config.items()}

    readers = (
        ("UNet", levels(unet.config),
         lambda: levels(dataclasses.asdict(UNet2DConditionModel.parse_config(ldm.unet_config(back.unet, family))))),
        ("VAE", vae.config, lambda: dataclasses.asdict(AutoencoderKL.parse_config(ldm.vae_config(back.vae)))),
        ("text encoder", {k: getattr(text_encoder.config, k) for k in TEXT_FIELDS},
         lambda: ldm.text_config(back.text, family)))
    advice = "Save the pipeline as a folder (save_pretrained) instead."
    for part, ours, read in readers:
        try:
            read = read()
        except ldm.LayoutError as e:
            raise ValueError(f"The A1111 layout cannot record this {part}: {e}. {advice}") from None
        differ = [f"{key}={ours[key]!r} (readers would assume {read[key]!r})"
                  for key in sorted(set(read) & set(ours) - set(UNCOMPARED)) if ours[key] != read[key]]
        if differ:
            raise ValueError(f"The A1111 layout cannot record the {part}'s {', '.join(differ)}: the file has no "
                             f"place for them, and readers follow the {'SD 2' if family == 'sd2' else 'SD 1'} "
                             f"conventions. {advice}")
    tokenizer = components["tokenizer"]
    pad = OPENCLIP_PAD if family == "sd2" else SD1_PAD
    if not is_clip_vocabulary(tokenizer) or tokenizer.pad_token != pad:
        raise ValueError(f"A single file stores no tokenizer: readers use CLIP's 49,408-token BPE padded with "
                         f"{pad!r}, but this pipeline's tokenizer has {len(tokenizer)} tokens and pads with "
                         f"{tokenizer.pad_token!r}. {advice}")


def save_pipeline(components, path, dtype=None):
    """Write the A1111-layout ``.safetensors`` file of a pipeline's parts, atomically (no partial file)."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    if not path.lower().endswith(".safetensors"):
        raise ValueError(f"{path}: save_single_file writes .safetensors files only (pickles can run code).")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"Cannot write {path}: the folder {directory} does not exist.")
    tensors = plain_tensors(pipeline_state_dict(components), dtype)
    atomic_write(path, lambda p: save_file(tensors, p, metadata={"format": "pt"}))


def plain_tensors(state_dict, dtype=None):
    """CPU, contiguous tensors, none sharing memory (as safetensors needs); the weights' floats cast
    to ``dtype`` (the noise-schedule buffers stay float32, as CompVis registers them)."""
    out, seen = {}, set()
    for key, value in state_dict.items():
        value = value.detach().to("cpu")
        if dtype is not None and value.is_floating_point() and key not in ldm.SCHEDULE_BUFFERS:
            value = value.to(dtype)
        value = value.contiguous()
        pointer = value.untyped_storage().data_ptr()
        if pointer in seen or value.untyped_storage().nbytes() != value.numel() * value.element_size():
            value = value.clone()
        seen.add(value.untyped_storage().data_ptr())
        out[key] = value
    return out


def convert_file(source, target, allow_pickle=False, dtype=None):
    """A checkpoint file as ``.safetensors``, its tensors as they are (floats cast to ``dtype``).

    The file must be an SD 1.x / 2.x checkpoint sdkit can read (checked before anything is written).
    """
    from safetensors.torch import save_file

    if not os.fspath(target).lower().endswith(".safetensors"):
        raise ValueError(f"{target}: sdkit writes .safetensors files only.")
    state_dict = read_file(source, allow_pickle)
    place(state_dict, source)
    tensors = plain_tensors({k: v for k, v in state_dict.items() if torch.is_tensor(v)}, dtype)
    atomic_write(os.fspath(target), lambda p: save_file(tensors, p, metadata={"format": "pt"}))
