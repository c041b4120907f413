"""LoRA files as people share them, read and placed on sdkit's UNet and text encoder.

A file holds, per layer it changes, factors of a weight change dW, applied as W + m * s * dW with
the call's multiplier m and the file's scale s = alpha / rank (1 without alpha):

- LoRA and LoCon: dW = up @ down (Hu et al. 2021, arXiv 2106.09685); a conv layer's down is k x k
  and its up 1 x 1, or, with ``lora_mid``, a Tucker core between 1 x 1 factors.
- LoHa: dW = (w1a @ w1b) * (w2a @ w2b), a Hadamard product (Hyeon-Woo et al. 2022, FedPara, arXiv
  2108.06098); with ``hada_t1/t2`` each pair is the Tucker form einsum(t, wa, wb).
- LoKr: dW = kron(w1, w2) (LyCORIS, Yeh et al. 2024, arXiv 2309.14859); w1 and w2 may come as
  factors (w1a @ w1b, w2a @ w2b) and w2 as the Tucker form with ``lokr_t2``. The rank of the
  scale is that of the factors (1 when both are whole, as LyCORIS and A1111 read it).

Key namings: kohya / A1111 (``lora_unet_*`` with the UNet in diffusers' or in the LDM naming of
``models/ldm.py``, ``lora_te_*``, ``.lora_down/.lora_up/.alpha``), LyCORIS (the same names with
``hada_*`` / ``lokr_*`` tensors) and diffusers / PEFT (``unet.<module>.lora_A/lora_B``,
``text_encoder.<module>...``, the older ``lora_linear_layer.down/up`` and attention-processor
names; alpha from ``.alpha`` keys or the file's ``lora_adapter_metadata``, else 1). A key sdkit
cannot place, factors that do not fit together, or a change of another shape than the layer's is
an error naming the keys. Pipelines apply the result per call (``pipelines/adapters.py``).
"""

import dataclasses
import json
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .models import ldm
from .models.modeling import few
from .per_call import changes_for
from .text import text_root

UNET, TEXT_ENCODER = "unet", "text_encoder"
KOHYA_PREFIXES = (("lora_unet_", UNET), ("lora_te_", TEXT_ENCODER))
LOW_RANK = ("lora_down.weight", "lora_up.weight")
LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
SCALARS = ("alpha", "scale")
# diffusers / PEFT key endings -> kohya's role names, longest first
DIFFUSERS_ROLES = ((".lora_linear_layer.down.weight", "lora_down.weight"),
                   (".lora_linear_layer.up.weight", "lora_up.weight"),
                   (".lora.down.weight", "lora_down.weight"), (".lora.up.weight", "lora_up.weight"),
                   ("_lora.down.weight", "lora_down.weight"), ("_lora.up.weight", "lora_up.weight"),
                   (".lora_A.weight", "lora_down.weight"), (".lora_B.weight", "lora_up.weight"),
                   (".alpha", "alpha"))
# the older attention-processor names of diffusers: to_q_lora ... on the UNet's and the text encoder's attention
OLD_ATTENTION = {UNET: {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
                 TEXT_ENCODER: {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}}
OTHER_ARCHITECTURES = (("lora_te1_", "an SDXL LoRA (two text encoders)"), ("lora_te2_", "an SDXL LoRA (two text encoders)"),
                       ("text_encoder_2.", "an SDXL LoRA (two text encoders)"),
                       ("lora_transformer_", "a LoRA for a transformer model (SD 3, Flux, ...)"),
                       ("transformer.", "a LoRA for a transformer model (SD 3, Flux, ...)"),
                       ("double_blocks", "a Flux LoRA"))


# -- the weight changes ---------------------------------------------------------------------------

def _matrix(t):
    """A factor as a (rows, -1) matrix."""
    return t.reshape(t.shape[0], -1)


def tucker(t, wa, wb):
    """einsum(t, wa, wb): a (R, R, k, k) core t between (R, O) and (R, I) factors -> (O, I, k, k)
    (LyCORIS ``rebuild_tucker``, A1111 ``make_weight_cp``)."""
    return torch.einsum("ij...,ip,jr->pr...", t, wa, wb)


def layer_output(x, layer, weight):
    """The layer's own operation (linear or its conv settings) with ``weight`` and no bias."""
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x, weight)


def add_product(y, h, up, m, conv):
    """y + m * up h, accumulated in y's memory by one matrix product (y is the layer's fresh output).

    Linear: y (..., O), h (..., R); conv: y (B, O, H, W), h (B, R, H, W) (a 1 x 1 up); up is (O, R).
    """
    if y.requires_grad or not (y.is_contiguous() and h.is_contiguous()):  # autograd: out of place
        return y + m * (F.conv2d(h, up[:, :, None, None]) if conv else F.linear(h, up))
    O, R = up.shape
    if conv:
        y.view(y.shape[0], O, -1).baddbmm_(up.expand(y.shape[0], O, R), h.view(h.shape[0], R, -1), alpha=m)
    else:
        y.view(-1, O).addmm_(h.view(-1, R), up.T, alpha=m)  # (N, O) += m (N, R) (R, O)
    return y


@dataclass(frozen=True, eq=False)
class LowRank:
    """dW = up @ down (LoRA, Hu et al. 2021); LoCon: a k x k conv down and a 1 x 1 up, or with a
    Tucker core ``mid``: 1 x 1 down, k x k mid, 1 x 1 up (A1111 ``rebuild_cp_decomposition``)."""

    up: torch.Tensor  # (O, R) for a linear layer, (O, R, 1, 1) for a conv
    down: torch.Tensor  # (R, I) or (R, I, kh, kw); (R, I, 1, 1) with mid
    mid: Optional[torch.Tensor] = None  # (R, R, kh, kw)
    scale: float = 1.0  # alpha / R

    @property
    def rank(self):
        return self.down.shape[0]

    def weight(self):
        """dW (O, I[, kh, kw]) without the scale."""
        up, down = _matrix(self.up), _matrix(self.down)  # (O, R), (R, I k k)
        if self.mid is None:
            return (up @ down).reshape(up.shape[0], *self.down.shape[1:])
        return torch.einsum("rs...,or,si->oi...", self.mid, up, down)

    def add_to(self, y, x, layer, m):
        """y + m dW x through the factors (never the whole dW): a linear or conv down (and mid), then up."""
        down, up = self.down.to(x), _matrix(self.up).to(x)
        if isinstance(layer, nn.Linear):
            h = F.linear(x, down)
        elif self.mid is None:
            h = layer_output(x, layer, down)
        else:
            h = layer_output(F.conv2d(x, down), layer, self.mid.to(x))
        return add_product(y, h, up, m, isinstance(layer, nn.Conv2d))

    def first_ranks(self, dyn):
        """The change made of the first ``dyn`` ranks (DyLoRA, A1111's ``dyn=``); the scale stays."""
        if dyn is None or self.mid is not None or dyn >= self.rank:
            return self
        return LowRank(self.up[:, :dyn], self.down[:dyn], None, self.scale)


@dataclass(frozen=True, eq=False)
class Hadamard:
    """dW = (w1a @ w1b) * (w2a @ w2b) (LoHa; FedPara, Hyeon-Woo et al. 2022); with t1 / t2 a pair is
    the Tucker form tucker(t, wa, wb)."""

    w1a: torch.Tensor  # (O, R); (R, O) with t1
    w1b: torch.Tensor  # (R, I k k); (R, I) with t1
    w2a: torch.Tensor
    w2b: torch.Tensor
    t1: Optional[torch.Tensor] = None  # (R, R, kh, kw)
    t2: Optional[torch.Tensor] = None
    scale: float = 1.0

    @property
    def rank(self):
        return self.w1b.shape[0]

    def weight(self):
        """dW without the scale: (O, I, kh, kw) with Tucker cores, else (O, I k k)."""
        def pair(wa, wb, t):
            return _matrix(wa) @ _matrix(wb) if t is None else tucker(t, wa, wb)

        w1, w2 = pair(self.w1a, self.w1b, self.t1), pair(self.w2a, self.w2b, self.t2)
        if w1.shape != w2.shape:  # one Tucker pair and one plain: both as (O, -1)
            w1, w2 = _matrix(w1), _matrix(w2)
        return w1 * w2

    def first_ranks(self, dyn):
        return self  # DyLoRA's dyn= applies to plain LoRA only (as in A1111)


@dataclass(frozen=True, eq=False)
class Kronecker:
    """dW = kron(w1, w2) (LoKr, LyCORIS): w1 = w1a @ w1b and w2 = w2a @ w2b when factored, w2 the
    Tucker form tucker(t2, w2a, w2b) with a core."""

    w1: Optional[torch.Tensor] = None  # (a, c)
    w1a: Optional[torch.Tensor] = None  # (a, R)
    w1b: Optional[torch.Tensor] = None  # (R, c)
    w2: Optional[torch.Tensor] = None  # (b, d[, kh, kw])
    w2a: Optional[torch.Tensor] = None  # (b, R); (R, b) with t2
    w2b: Optional[torch.Tensor] = None  # (R, d[, kh, kw]); (R, d) with t2
    t2: Optional[torch.Tensor] = None  # (R, R, kh, kw)
    scale: float = 1.0

    @property
    def rank(self):
        """The factors' rank (None when w1 and w2 are both whole: the scale is then 1)."""
        if self.w1 is None:
            return self.w1b.shape[0]
        return None if self.w2 is not None else self.w2b.shape[0]

    def weight(self):
        """dW (a b, c d[, kh, kw]) without the scale."""
        w1 = self.w1 if self.w1 is not None else self.w1a @ self.w1b
        if self.w2 is not None:
            w2 = self.w2
        elif self.t2 is not None:
            w2 = tucker(self.t2, self.w2a, self.w2b)
        else:
            w2 = (self.w2a @ _matrix(self.w2b)).reshape(self.w2a.shape[0], *self.w2b.shape[1:])
        w1 = w1.reshape(*w1.shape, *[1] * (w2.ndim - w1.ndim))  # (a, c, 1, 1) beside a conv w2
        return torch.kron(w1, w2.contiguous())

    def first_ranks(self, dyn):
        return self


def placed(delta, weight):
    """``delta`` with its factors on ``weight``'s device and in its dtype; ``delta`` itself when they
    already are (the factors stay as the file gave them until a call runs the layer elsewhere)."""
    moved = {f.name: t.to(weight.device, weight.dtype) for f in dataclasses.fields(delta)
             if torch.is_tensor(t := getattr(delta, f.name))}
    if all(t is getattr(delta, name) for name, t in moved.items()):
        return delta
    return dataclasses.replace(delta, **moved)


# -- layers that a call may change ------------------------------------------------------------------

def changed_forward(layer, x, changes):
    """The layer's output with W + sum_k m_k dW_k: through the low-rank factors when that takes fewer
    multiplications (few tokens: N (I + O) < O I), else with the weight rebuilt for this forward only
    (the UNet's many tokens; LoHa and LoKr always)."""
    W, conv = layer.weight, isinstance(layer, nn.Conv2d)
    fan_in = W[0].numel()  # I (k k)
    tokens = x.numel() // x.shape[1] // math.prod(layer.stride) if conv else x.numel() // fan_in
    if all(isinstance(d, LowRank) for d, _ in changes) and tokens * (fan_in + W.shape[0]) < W.shape[0] * fan_in:
        y = _forward(layer, x, W)
        for delta, m in changes:
            y = delta.add_to(y, x, layer, m)
        return y
    for delta, m in changes:
        W = torch.add(W, delta.weight().to(W).reshape(W.shape), alpha=m)  # a new tensor: the shared W stays
    return _forward(layer, x, W)


def _forward(layer, x, weight):
    """The layer's forward with another weight (its bias and conv settings)."""
    if isinstance(layer, nn.Conv2d):
        return layer._conv_forward(x, weight, layer.bias)
    return F.linear(x, weight, layer.bias)


class _Changeable:
    """Put in a layer's class at load time (its weights and names stay): forward uses the current
    call's changes of the layer (``per_call.changes_for``), and is the plain layer's without them."""

    def forward(self, input):
        changes = changes_for(self)
        if not changes:
            return super().forward(input)
        return changed_forward(self, input, changes)


class Linear(_Changeable, nn.Linear):
    """An nn.Linear that a call may change (lora.make_changeable)."""


class Conv2d(_Changeable, nn.Conv2d):
    """An nn.Conv2d that a call may change (lora.make_changeable)."""


CHANGEABLE = {nn.Linear: Linear, nn.Conv2d: Conv2d}
_CLASS_LOCK = threading.Lock()


def make_changeable(layer):
    """Give a layer the changeable class of its type (once; a forward running meanwhile is unaffected)."""
    with _CLASS_LOCK:
        if type(layer) in CHANGEABLE:
            layer.__class__ = CHANGEABLE[type(layer)]


@dataclass(frozen=True, eq=False)
class LayerChange:
    """One layer's change: where it is, the module, and its factors."""

    part: str  # UNET or TEXT_ENCODER
    path: str  # the module's name in that part (diffusers' / transformers' naming)
    layer: nn.Module  # the nn.Linear or nn.Conv2d
    delta: object  # LowRank, Hadamard or Kronecker
    keys: tuple  # the file's keys for it, for messages


# -- the layers a LoRA can change ------------------------------------------------------------------

def _changeable(module):
    kinds = (nn.Linear, nn.Conv2d, Linear, Conv2d)  # exactly these: subclasses may compute otherwise
    return type(module) in kinds and (not isinstance(module, nn.Conv2d) or (module.groups == 1
                                                                            and module.padding_mode == "zeros"))


def _ldm_names(unet, paths):
    """{LDM module name: sdkit name} of the UNet's layers (models/ldm.py's mapping, read backwards)."""
    try:
        modules = ldm.unet_modules(unet.config)
    except (KeyError, TypeError, ValueError):  # a UNet the LDM layout does not describe
        return {}
    renamed, _ = ldm.translate({f"{p}.weight": p for p in paths}, modules, to_ldm=True)
    return {key[:-len(".weight")]: path for key, path in renamed.items()}


@dataclass(frozen=True)
class Layers:
    """Every layer a LoRA can change, by (part, path), and kohya's names for them."""

    modules: dict  # (part, path) -> nn.Module
    kohya: dict  # kohya name -> (part, path)

    @classmethod
    def of(cls, unet, text_encoder):
        modules, kohya = {}, {}
        unet_paths = [p for p, m in unet.named_modules() if _changeable(m)]
        for path in unet_paths:
            modules[UNET, path] = unet.get_submodule(path)
            kohya["lora_unet_" + path.replace(".", "_")] = (UNET, path)
        for ldm_name, path in _ldm_names(unet, unet_paths).items():
            kohya.setdefault("lora_unet_" + ldm_name.replace(".", "_"), (UNET, path))
        if text_encoder is not None:
            for path, module in text_root(text_encoder).named_modules():
                if _changeable(module):
                    modules[TEXT_ENCODER, path] = module
                    kohya["lora_te_text_model_" + path.replace(".", "_")] = (TEXT_ENCODER, path)
        return cls(modules, kohya)


def _diffusers_place(name, layers):
    """(part, path) of a diffusers / PEFT module name (``unet.``/``text_encoder.`` prefixed, or a bare
    UNet name), the older processor names renamed; None when no layer has it."""
    part, path = UNET, name
    for prefix, which in (("unet.", UNET), ("text_encoder.", TEXT_ENCODER)):
        if name.startswith(prefix):
            part, path = which, name[len(prefix):]
    if part == TEXT_ENCODER and path.startswith("text_model.") and (part, path) not in layers.modules:
        path = path[len("text_model."):]
    path = path.replace(".processor.", ".")
    head, _, last = path.rpartition(".")
    if last in OLD_ATTENTION[part]:
        path = f"{head}.{OLD_ATTENTION[part][last]}"
    return (part, path) if (part, path) in layers.modules else None


def _group(state_dict, layers):
    """({(part, path): {role: (key, tensor)}}, keys no layer takes)."""
    groups, left = {}, []
    for key, value in state_dict.items():
        place = role = None
        if key.startswith("lora_"):
            name, _, role = key.partition(".")
            place = layers.kohya.get(name)
        else:
            for suffix, kohya_role in DIFFUSERS_ROLES:
                if key.endswith(suffix):
                    place, role = _diffusers_place(key[:-len(suffix)], layers), kohya_role
                    break
        if place is None or not isinstance(value, torch.Tensor):
            left.append(key)
        else:
            groups.setdefault(place, {})[role] = (key, value)
    return groups, left


def _what_it_is(keys):
    for fragment, what in OTHER_ARCHITECTURES:
        if any(fragment in k for k in keys):
            return f"; it looks like {what}, and sdkit applies LoRAs to SD 1.x and 2.x"
    return "; it is for another architecture or in a format sdkit does not read (kohya, LyCORIS, diffusers/PEFT)"


# -- scales -------------------------------------------------------------------------------------

def _peft_config(metadata, part):
    """The LoRA settings a diffusers / PEFT file keeps in its ``lora_adapter_metadata`` for ``part``."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError:
        raise ValueError("its lora_adapter_metadata is not valid JSON; save the LoRA again") from None
    prefixed = {k[len(part) + 1:]: v for k, v in config.items() if k.startswith(part + ".")}
    return prefixed or {k: v for k, v in config.items() if "." not in k}


def _peft_alpha(config, path):
    """alpha of a module: its ``alpha_pattern`` entry (PEFT matches the end of the name), else ``lora_alpha``."""
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return alpha
    return config.get("lora_alpha")


def _scale(roles, rank, config, path):
    """s = alpha / rank (PEFT's rsLoRA: alpha / sqrt(rank)); a file's ``scale`` wins; 1 without alpha or rank."""
    if "scale" in roles:
        return float(roles["scale"][1])
    alpha = float(roles["alpha"][1]) if "alpha" in roles else _peft_alpha(config, path)
    if alpha is None or rank is None:
        return 1.0
    return float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)


# -- building one layer's change ---------------------------------------------------------------------

def _fit(t, layer):
    """A LoRA factor shaped for the layer's kind: linear factors 2-D, conv factors 4-D."""
    if isinstance(layer, nn.Linear) and t.ndim == 4 and t.shape[2:] == (1, 1):
        return t.reshape(t.shape[:2])
    if isinstance(layer, nn.Conv2d) and t.ndim == 2:
        return t.reshape(*t.shape, 1, 1)
    return t


def _low_rank(get, layer, name):
    up, down, mid = _fit(get("lora_up.weight"), layer), _fit(get("lora_down.weight"), layer), get("lora_mid.weight")
    if up.shape[1] != down.shape[0]:
        raise ValueError(f"{name}: lora_down has rank {down.shape[0]} but lora_up rank {up.shape[1]} (they must be "
                         f"equal): the file is damaged or mixes two LoRAs")
    if mid is not None and tuple(mid.shape[:2]) != (down.shape[0],) * 2:
        raise ValueError(f"{name}: lora_mid is {tuple(mid.shape)}, not ({down.shape[0]}, {down.shape[0]}, k, k) "
                         f"for rank {down.shape[0]}")
    return LowRank(up, down, mid), down.shape[0]


def _hadamard(get, layer, name):
    delta = Hadamard(*(get(k) for k in LOHA), get("hada_t1"), get("hada_t2"))
    return delta, delta.rank


def _kronecker(get, layer, name):
    delta = Kronecker(*(get(k) for k in LOKR))
    if (delta.w1 is None and delta.w1a is None) or (delta.w2 is None and delta.w2a is None):
        raise ValueError(f"{name}: a LoKr layer needs lokr_w1 (or lokr_w1_a and lokr_w1_b) and lokr_w2 (or "
                         f"lokr_w2_a and lokr_w2_b)")
    return delta, delta.rank


KINDS = ((LOW_RANK, ("lora_mid.weight",), _low_rank), (LOHA, ("hada_t1", "hada_t2"), _hadamard),
         ((), LOKR, _kronecker))


def _change(place, roles, layer, config):
    """The LayerChange of one layer's tensors: its kind read from the roles, shapes checked."""
    keys = tuple(key for key, _ in roles.values())
    name = keys[0].partition(".")[0] if keys[0].startswith("lora_") else place[1]
    present = set(roles) - set(SCALARS)
    for required, optional, build in KINDS:
        if present and set(required) <= present <= set(required) | set(optional):
            break
    else:
        hint = " (DoRA's dora_scale is not supported)" if "dora_scale" in present else ""
        raise ValueError(f"{name}: the tensors {sorted(roles)} are not a LoRA, LoCon, LoHa or LoKr layer sdkit "
                         f"reads{hint}")
    w = layer.weight
    factors = {role: t.to(device=w.device, dtype=w.dtype if w.dtype.is_floating_point else torch.float32)
               for role, (_, t) in roles.items() if role not in SCALARS}
    delta, rank = build(factors.get, layer, name)
    try:
        dW = delta.weight()
    except RuntimeError as e:
        raise ValueError(f"{name}: its factors do not fit together ({e}); the file is damaged") from None
    if dW.shape[0] != w.shape[0] or dW.numel() != w.numel() or (dW.ndim == 4 and dW.shape[2:] != w.shape[2:]):
        raise ValueError(f"{name}: the LoRA changes a {tuple(dW.shape)} weight but this model's {place[1]} is "
                         f"{tuple(w.shape)}: the LoRA is for another model (SD 1 and SD 2 differ in width)")
    scaled = dataclasses.replace(delta, scale=_scale(roles, rank, config, place[1]))
    return LayerChange(place[0], place[1], layer, scaled, keys)


# -- reading -----------------------------------------------------------------------------------------

def read_lora_file(path, allow_pickle=False):
    """(tensors, safetensors metadata) of a LoRA file; pickles only with ``allow_pickle=True``."""
    from .models.single_file import read_file

    path = Path(path)
    state_dict = read_file(path, allow_pickle)
    metadata = {}
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    return state_dict, metadata


def place_lora(state_dict, layers, source, metadata=None):
    """The LayerChanges of a LoRA state dict on ``layers`` (:class:`Layers`); any problem raises ValueError."""
    if not state_dict:
        raise ValueError(f"{source} holds no tensors: it is not a LoRA.")
    groups, left = _group(state_dict, layers)
    if left:
        raise ValueError(f"{source}: {len(left)} of its {len(state_dict)} keys name no layer of this pipeline's UNet "
                         f"or text encoder{_what_it_is(left)}. The keys: {few(sorted(left))}.")
    changes, errors = [], []
    for place, roles in groups.items():
        try:
            changes.append(_change(place, roles, layers.modules[place], _peft_config(metadata, place[0])))
        except ValueError as e:
            errors.append(str(e))
    if errors:
        raise ValueError(f"{source}: {len(errors)} layers cannot be applied: {few(errors, 3)}.")
    return tuple(changes)
