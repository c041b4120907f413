"""The CompVis / A1111 checkpoint layout (Rombach et al. 2022, LDM) beside sdkit's (diffusers') names.

A single-file Stable Diffusion checkpoint keeps the UNet under ``model.diffusion_model.``, the VAE
under ``first_stage_model.`` and the text encoder under ``cond_stage_model.``: transformers' CLIP
ViT-L names for SD 1 (``cond_stage_model.transformer.[text_model.]``), the OpenCLIP ViT-H text
tower for SD 2 (``cond_stage_model.model.``, q/k/v fused in ``in_proj``). For each part this module
has its modules in both namings (one list, read both ways), its config read from tensor shapes
(the family's conventions where shapes cannot tell), and the renaming. Keys here carry no prefix.
"""

import math

import torch

from .unet import _per_level

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1: transformers' CLIPTextModel
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD 2: the OpenCLIP text tower
EMA_PREFIX = "model_ema."
# the noise schedule CompVis' LatentDiffusion registers as buffers (ddpm.py, register_schedule)
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2")
TRAINING_LEFTOVERS = ("lvlb_weights", "logvar", "scale_factor", "model_ema.decay", "model_ema.num_updates")
OPENCLIP_LOGIT_SCALE = math.log(1 / 0.07)  # OpenCLIP's initial logit scale (unused by SD)


class LayoutError(ValueError):
    """A state dict that is not (or not entirely) in the layout it was read as."""


# -- shared pieces ------------------------------------------------------------------------------

def translate(state_dict, modules, to_ldm=False):
    """(renamed, left): keys renamed module by module; ``left`` holds the keys no module claims.

    ``modules`` lists (LDM prefix, sdkit prefix, inner renames); ``to_ldm`` reads it backwards.
    """
    left, out = dict(state_dict), {}
    for ldm, ours, inner in modules:
        source, target = (ours, ldm) if to_ldm else (ldm, ours)
        pairs = [(b, a) for a, b in inner] if to_ldm else inner
        for key in [k for k in left if k.startswith(source)]:
            rest = key[len(source):]
            for old, new in pairs:
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    break
            out[target + rest] = left.pop(key)
    return out, left


def _indices(keys, prefix):
    """The sorted numbers i of the keys that start with ``prefix + "i."``."""
    found = set()
    for key in keys:
        if key.startswith(prefix):
            head = key[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return sorted(found)


def _count(keys, prefix):
    """How many numbered children ``prefix0.``, ``prefix1.``, ... there are (numbered without gaps)."""
    found = _indices(keys, prefix)
    if found != list(range(len(found))):
        raise LayoutError(f"the keys {prefix}N.* are numbered {found[:8]}, not 0, 1, 2, ...")
    return len(found)


def _shape(state_dict, key):
    if key not in state_dict:
        raise LayoutError(f"the key {key} is missing")
    return tuple(state_dict[key].shape)


def _one(values):
    """A per-level tuple as one int when every level has the same value (the reference's style)."""
    return values[0] if len(set(values)) == 1 else tuple(values)


# -- UNet ---------------------------------------------------------------------------------------

UNET_RESNET = (("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
               ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut."))


def unet_modules(config):
    """(LDM prefix, sdkit prefix, inner renames) of every UNet module, in the LDM order.

    LDM numbers its blocks in one run: ``input_blocks.k`` are conv_in, then per level its resnets
    (each with its spatial transformer as ``.1``) and a downsampler; ``output_blocks.k`` go up.
    """
    n = len(config["block_out_channels"])
    layers = _per_level(config["layers_per_block"], n, "layers_per_block")
    down_attention = [t.startswith("CrossAttn") for t in config["down_block_types"]]
    up_attention = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    modules = [("time_embed.0.", "time_embedding.linear_1.", ()), ("time_embed.2.", "time_embedding.linear_2.", ()),
               ("input_blocks.0.0.", "conv_in.", ())]
    k = 1
    for i in range(n):
        for j in range(layers[i]):
            modules.append((f"input_blocks.{k}.0.", f"down_blocks.{i}.resnets.{j}.", UNET_RESNET))
            if down_attention[i]:
                modules.append((f"input_blocks.{k}.1.", f"down_blocks.{i}.attentions.{j}.", ()))
            k += 1
        if i < n - 1:
            modules.append((f"input_blocks.{k}.0.op.", f"down_blocks.{i}.downsamplers.0.conv.", ()))
            k += 1
    modules += [("middle_block.0.", "mid_block.resnets.0.", UNET_RESNET),
                ("middle_block.1.", "mid_block.attentions.0.", ()),
                ("middle_block.2.", "mid_block.resnets.1.", UNET_RESNET)]
    k = 0
    for u in range(n):
        count = layers[n - 1 - u] + 1
        for j in range(count):
            modules.append((f"output_blocks.{k}.0.", f"up_blocks.{u}.resnets.{j}.", UNET_RESNET))
            if up_attention[u]:
                modules.append((f"output_blocks.{k}.1.", f"up_blocks.{u}.attentions.{j}.", ()))
            if u < n - 1 and j == count - 1:
                slot = 2 if up_attention[u] else 1
                modules.append((f"output_blocks.{k}.{slot}.conv.", f"up_blocks.{u}.upsamplers.0.conv.", ()))
            k += 1
    return modules + [("out.0.", "conv_norm_out.", ()), ("out.2.", "conv_out.", ())]


def _unet_levels(state_dict):
    """The input-block numbers of each resolution level (a downsampler closes a level)."""
    levels = [[]]
    for k in _indices(state_dict, "input_blocks."):
        if k == 0:
            continue
        if f"input_blocks.{k}.0.op.weight" in state_dict:
            levels.append([])
        else:
            levels[-1].append(k)
    if any(not blocks for blocks in levels):
        raise LayoutError("a UNet level has no resnet (input_blocks.*.0.in_layers.*)")
    return levels


def _attention_shape(state_dict, prefix):
    """(depth, context width, linear projections, inner width) of the spatial transformer at ``prefix``."""
    depth = _count(state_dict, prefix + "transformer_blocks.")
    context = _shape(state_dict, prefix + "transformer_blocks.0.attn2.to_k.weight")[1]
    proj_in = _shape(state_dict, prefix + "proj_in.weight")
    return depth, context, len(proj_in) == 2, proj_in[0]


def unet_config(state_dict, family):
    """The diffusers config of an LDM UNet (keys without prefix): shapes, then the family's conventions.

    Shapes give the widths, levels, resnets per level, attention levels and depths, input and
    output channels, context width, linear or 1x1-conv projections and FiLM resnets. Heads:
    8 per level for SD 1, 64-channel heads for SD 2; 32 norm groups; SD 2 upcasts attention.
    """
    c0, in_channels = _shape(state_dict, "input_blocks.0.0.weight")[:2]
    if _shape(state_dict, "time_embed.0.weight") != (4 * c0, c0):
        raise LayoutError(f"the time embedding is {_shape(state_dict, 'time_embed.0.weight')}, not "
                          f"(4 x {c0}, {c0}) as in SD 1.x / 2.x")
    mid_depth, context, linear, _ = _attention_shape(state_dict, "middle_block.1.")
    channels, layers, depths = [], [], []
    for blocks in _unet_levels(state_dict):
        width = _shape(state_dict, f"input_blocks.{blocks[0]}.0.out_layers.3.weight")[0]
        shapes = [_attention_shape(state_dict, f"input_blocks.{k}.1.")
                  if f"input_blocks.{k}.1.proj_in.weight" in state_dict else None for k in blocks]
        if len({s is None for s in shapes}) > 1 or len(set(shapes)) > 1:
            raise LayoutError(f"the attention of the UNet level at input_blocks.{blocks[0]} differs between "
                              f"its blocks: {shapes}")
        if shapes[0] is not None:
            depth, level_context, level_linear, inner = shapes[0]
            if (level_context, level_linear) != (context, linear) or inner != width:
                raise LayoutError(f"the spatial transformer at input_blocks.{blocks[0]} has width {inner}, context "
                                  f"{level_context} and linear={level_linear}; sdkit needs width {width}, "
                                  f"context {context} and linear={linear} (as the middle block)")
        channels.append(width)
        layers.append(len(blocks))
        depths.append(None if shapes[0] is None else shapes[0][0])
    attention = [d is not None for d in depths]
    film = _shape(state_dict, "input_blocks.1.0.emb_layers.1.weight")[0] == 2 * channels[0]
    return dict(
        sample_size=64, in_channels=in_channels, out_channels=_shape(state_dict, "out.2.weight")[0],
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        block_out_channels=tuple(channels), layers_per_block=_one(layers), cross_attention_dim=context,
        transformer_layers_per_block=_depths(depths, mid_depth),
        attention_head_dim=_heads(channels, family), use_linear_projection=linear,
        upcast_attention=family == "sd2", resnet_time_scale_shift="scale_shift" if film else "default")


def _depths(depths, mid_depth):
    """transformer_layers_per_block: one int when all agree; the middle block takes the last level's."""
    known = {d for d in depths if d is not None} | {mid_depth}
    if len(known) == 1:
        return mid_depth
    if depths[-1] not in (None, mid_depth):
        raise LayoutError(f"the middle block has {mid_depth} transformer layers and the last level "
                          f"{depths[-1]}; sdkit gives both the same")
    return tuple(1 if d is None else d for d in depths[:-1]) + (mid_depth,)


def _heads(channels, family):
    """Heads per level where shapes cannot tell: SD 1 has 8; SD 2 has 64-channel heads."""
    if family == "sd1":
        return 8
    return tuple(max(1, c // 64) for c in channels)


def unet_from_ldm(state_dict, config):
    """sdkit names of an LDM UNet state dict; (renamed, keys no module claims)."""
    return translate(state_dict, unet_modules(config))


def unet_to_ldm(state_dict, config):
    """LDM names of an sdkit UNet state dict; (renamed, keys the LDM layout has no place for)."""
    return translate(state_dict, unet_modules(config), to_ldm=True)


# -- VAE ----------------------------------------------------------------------------------------

VAE_RESNET = (("nin_shortcut.", "conv_shortcut."),)
VAE_ATTENTION = (("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."),
                 ("proj_out.", "to_out.0."))
VAE_ATTENTION_WEIGHTS = (".q.weight", ".k.weight", ".v.weight", ".proj_out.weight")  # 1x1 convs in LDM


def _attention_weight(key):
    """True for an LDM VAE attention projection weight (q, k, v, proj_out of ``mid.attn_1``)."""
    return ".attn_1." in key and key.endswith(VAE_ATTENTION_WEIGHTS)


def vae_modules(config):
    """(LDM prefix, sdkit prefix, inner renames) of every VAE module; LDM numbers decoder levels bottom-up."""
    n, layers = len(config["block_out_channels"]), config["layers_per_block"]
    modules = [("quant_conv.", "quant_conv.", ()), ("post_quant_conv.", "post_quant_conv.", ())]
    for side in ("encoder", "decoder"):
        modules += [(f"{side}.conv_in.", f"{side}.conv_in.", ()), (f"{side}.conv_out.", f"{side}.conv_out.", ()),
                    (f"{side}.norm_out.", f"{side}.conv_norm_out.", ()),
                    (f"{side}.mid.block_1.", f"{side}.mid_block.resnets.0.", VAE_RESNET),
                    (f"{side}.mid.attn_1.", f"{side}.mid_block.attentions.0.", VAE_ATTENTION),
                    (f"{side}.mid.block_2.", f"{side}.mid_block.resnets.1.", VAE_RESNET)]
    for i in range(n):
        modules += [(f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.", VAE_RESNET)
                    for j in range(layers)]
        if i < n - 1:
            modules.append((f"encoder.down.{i}.downsample.conv.", f"encoder.down_blocks.{i}.downsamplers.0.conv.", ()))
    for u in range(n):
        i = n - 1 - u
        modules += [(f"decoder.up.{i}.block.{j}.", f"decoder.up_blocks.{u}.resnets.{j}.", VAE_RESNET)
                    for j in range(layers + 1)]
        if u < n - 1:
            modules.append((f"decoder.up.{i}.upsample.conv.", f"decoder.up_blocks.{u}.upsamplers.0.conv.", ()))
    return modules


def vae_config(state_dict):
    """The diffusers config of an LDM VAE (keys without prefix): shapes, then SD's conventions
    (32 norm groups, scaling factor 0.18215)."""
    n = _count(state_dict, "encoder.down.")
    layers = [_count(state_dict, f"encoder.down.{i}.block.") for i in range(n)]
    up_layers = [_count(state_dict, f"decoder.up.{i}.block.") for i in range(_count(state_dict, "decoder.up."))]
    if len(set(layers)) != 1 or up_layers != [layers[0] + 1] * n:
        raise LayoutError(f"the VAE has {layers} resnets per encoder level and {up_layers} per decoder "
                          f"level; sdkit needs the same L per encoder level and L + 1 per decoder level")
    latent = _shape(state_dict, "decoder.conv_in.weight")[1]
    if _shape(state_dict, "encoder.conv_out.weight")[0] != 2 * latent:
        raise LayoutError("the VAE encoder does not output a mean and a log-variance per latent channel")
    return dict(
        in_channels=_shape(state_dict, "encoder.conv_in.weight")[1],
        out_channels=_shape(state_dict, "decoder.conv_out.weight")[0],
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(_shape(state_dict, f"encoder.down.{i}.block.0.conv1.weight")[0] for i in range(n)),
        layers_per_block=layers[0], latent_channels=latent, norm_num_groups=32, sample_size=512,
        scaling_factor=0.18215, use_quant_conv="quant_conv.weight" in state_dict,
        use_post_quant_conv="post_quant_conv.weight" in state_dict,
        mid_block_add_attention="encoder.mid.attn_1.q.weight" in state_dict)


def vae_from_ldm(state_dict, config):
    """sdkit names of an LDM VAE state dict (1x1-conv attention weights become linear); (renamed, left)."""
    state_dict = {k: v.reshape(v.shape[:2]) if _attention_weight(k) and v.ndim == 4 else v
                  for k, v in state_dict.items()}
    return translate(state_dict, vae_modules(config))


def vae_to_ldm(state_dict, config):
    """LDM names of an sdkit VAE state dict (attention weights as 1x1 convs); (renamed, left)."""
    renamed, left = translate(state_dict, vae_modules(config), to_ldm=True)
    renamed = {k: v.reshape(*v.shape, 1, 1) if _attention_weight(k) else v for k, v in renamed.items()}
    return renamed, left


# -- text encoders ------------------------------------------------------------------------------

def clip_from_ldm(state_dict):
    """transformers' CLIPTextModel names (no ``text_model.``) of SD 1 text-encoder keys, in either the
    ``text_model.``-prefixed or the older unprefixed naming; ``position_ids`` (a constant) is dropped."""
    out = {}
    for key, value in state_dict.items():
        name = key[len("text_model."):] if key.startswith("text_model.") else key
        if name != "embeddings.position_ids":
            out[name] = value
    return out


def clip_to_ldm(state_dict):
    """SD 1 text-encoder keys (A1111's ``text_model.`` naming) of CLIPTextModel names."""
    return {f"text_model.{k}": v for k, v in state_dict.items()}


OPENCLIP_LAYER = (("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("attn.out_proj.", "self_attn.out_proj."),
                  ("attn.in_proj_", "self_attn.in_proj_"), ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2."))


def openclip_modules(num_layers):
    """(OpenCLIP name, CLIPTextModel name, inner renames) of the text tower's first ``num_layers`` blocks."""
    return [("token_embedding.", "embeddings.token_embedding.", ()),
            ("positional_embedding", "embeddings.position_embedding.weight", ()),
            ("ln_final.", "final_layer_norm.", ())] + \
        [(f"transformer.resblocks.{i}.", f"encoder.layers.{i}.", OPENCLIP_LAYER) for i in range(num_layers)]


def openclip_from_ldm(state_dict):
    """CLIPTextModel names of an OpenCLIP text tower (SD 2); (renamed, left).

    SD 2 conditions on the penultimate block's output, then ``ln_final`` (FrozenOpenCLIPEmbedder,
    layer="penultimate"), so the text encoder gets one block fewer than a whole tower (one that
    has ``text_projection``); a converted file without it holds only the blocks SD 2 runs.
    """
    blocks = _count(state_dict, "transformer.resblocks.")
    whole = "text_projection" in state_dict
    used = blocks - 1 if whole else blocks
    if used < 1:
        raise LayoutError(f"the OpenCLIP text tower has {blocks} blocks; SD 2 needs at least 2")
    unused = {"text_projection", "logit_scale"} | {k for k in state_dict
                                                    if k.startswith(f"transformer.resblocks.{blocks - 1}.") and whole}
    renamed, left = translate({k: v for k, v in state_dict.items() if k not in unused}, openclip_modules(used))
    return _split_in_proj(renamed), left


def openclip_to_ldm(state_dict):
    """The whole OpenCLIP text tower (SD 2) of CLIPTextModel names; (renamed, left).

    The block after the last one SD 2 runs, ``text_projection`` and ``logit_scale`` are not in a
    CLIPTextModel; they are written as an identity block (zeros: it leaves its input unchanged, so
    readers that run every block get the same result), an identity projection and OpenCLIP's
    initial logit scale, so that OpenCLIP and CompVis load the file strictly.
    """
    layers = _count(state_dict, "encoder.layers.")
    renamed, left = translate(_fuse_in_proj(state_dict), openclip_modules(layers), to_ldm=True)
    last = f"transformer.resblocks.{layers - 1}."
    for key in [k for k in renamed if k.startswith(last)]:
        renamed[f"transformer.resblocks.{layers}." + key[len(last):]] = torch.zeros_like(renamed[key])
    embedding = renamed["token_embedding.weight"]
    renamed["text_projection"] = torch.eye(embedding.shape[1], dtype=embedding.dtype, device=embedding.device)
    renamed["logit_scale"] = torch.tensor(OPENCLIP_LOGIT_SCALE, dtype=embedding.dtype, device=embedding.device)
    return renamed, left


def _split_in_proj(state_dict):
    """OpenCLIP's fused in_proj (3D, D) / (3D,) -> q_proj, k_proj, v_proj (D, D) / (D,)."""
    out = {}
    for key, value in state_dict.items():
        if ".self_attn.in_proj_" not in key:
            out[key] = value
            continue
        head, kind = key.split(".self_attn.in_proj_")  # kind: "weight" or "bias"
        for name, part in zip(("q", "k", "v"), value.chunk(3, dim=0)):
            # a copy with its own memory: safetensors cannot save tensors that share it
            out[f"{head}.self_attn.{name}_proj.{kind}"] = part.clone()
    return out


def _fuse_in_proj(state_dict):
    """q_proj, k_proj, v_proj -> OpenCLIP's fused in_proj, stacked as [q; k; v] along dim 0."""
    out = {}
    for key, value in state_dict.items():
        if ".self_attn.q_proj." in key:
            head, kind = key.split(".self_attn.q_proj.")
            parts = [state_dict[f"{head}.self_attn.{n}_proj.{kind}"] for n in ("q", "k", "v")]
            out[f"{head}.self_attn.in_proj_{kind}"] = torch.cat(parts, dim=0)  # (3D, D) or (3D,)
        elif ".self_attn.k_proj." not in key and ".self_attn.v_proj." not in key:
            out[key] = value
    return out


def text_config(state_dict, family):
    """transformers CLIPTextConfig settings of CLIPTextModel names: shapes, then the family's conventions
    (64-channel heads: 12 for CLIP ViT-L, 16 for OpenCLIP ViT-H; quick GELU for CLIP, GELU for OpenCLIP)."""
    vocab, hidden = _shape(state_dict, "embeddings.token_embedding.weight")
    if hidden % 64:
        raise LayoutError(f"the text encoder is {hidden} wide; CLIP text encoders have 64-channel heads")
    return dict(vocab_size=vocab, hidden_size=hidden, num_attention_heads=hidden // 64,
                intermediate_size=_shape(state_dict, "encoder.layers.0.mlp.fc1.weight")[0],
                num_hidden_layers=_count(state_dict, "encoder.layers."),
                max_position_embeddings=_shape(state_dict, "embeddings.position_embedding.weight")[0],
                hidden_act="gelu" if family == "sd2" else "quick_gelu", layer_norm_eps=1e-5,
                projection_dim=hidden, bos_token_id=49406, eos_token_id=49407,
                pad_token_id=0 if family == "sd2" else 49407)


# -- the noise schedule -------------------------------------------------------------------------

def schedule_buffers(config):
    """The schedule buffers of CompVis' LatentDiffusion for a scheduler config (DDPM, Ho et al. 2020).

    Computed in float64 and stored in float32, as ``register_schedule`` does.
    """
    from ..schedulers.schedules import make_betas, rescale_zero_terminal_snr

    betas = make_betas(config["beta_schedule"], config["num_train_timesteps"], config["beta_start"],
                       config["beta_end"], config.get("trained_betas"), dtype=torch.float64)
    if config.get("rescale_betas_zero_snr"):
        betas = rescale_zero_terminal_snr(betas)
    alphas = 1.0 - betas
    alpha_bar = torch.cumprod(alphas, dim=0)
    alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    posterior_variance = betas * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
    values = (betas, alpha_bar, alpha_bar_prev, alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt(),
              (1.0 - alpha_bar).log(), (1.0 / alpha_bar).sqrt(), (1.0 / alpha_bar - 1).sqrt(), posterior_variance,
              posterior_variance.clamp_min(1e-20).log(), betas * alpha_bar_prev.sqrt() / (1.0 - alpha_bar),
              (1.0 - alpha_bar_prev) * alphas.sqrt() / (1.0 - alpha_bar))
    return {name: v.float() for name, v in zip(SCHEDULE_BUFFERS, values)}
