"""A call's prompts as the denoising loop's conditioning: plain text, A1111's syntax, or embeddings.

``prompt_syntax="plain"`` reads prompts as the reference does (one window of
``model_max_length`` tokens, no syntax); ``"a1111"`` reads them as stable-diffusion-webui does
(``sdkit.prompts`` parses, ``sdkit.text_chunks`` encodes):

- Prompt editing ``[from:to:when]`` and alternation ``[a|b]`` make a :class:`PromptSchedule`:
  the embeddings in force up to each step. A1111 counts these steps as its sampler steps and
  moves on one at every model call: the call with index i (0 at the run's first model call,
  also in img2img) uses the first entry whose ``end_at_step`` is >= i, out of a schedule made
  for ``num_inference_steps`` steps. Every sdkit scheduler makes one model call per step, except
  PLMS (its first step runs the model twice, as A1111's PLMS does, so it matches A1111 too) and
  PNDM's Runge-Kutta warm-up (not an A1111 sampler: calls past the schedule keep its last entry).
  A1111 schedules its two-call samplers (Heun, DPM2, DPM++ SDE) over 2 x steps; sdkit has none.
- ``AND`` (and ``text:w`` at the end of a part) is composable diffusion (Liu et al. 2022, arXiv
  2206.01714): :class:`ComposableGuidance` runs the UNet on the unconditional and every part's
  embeddings and guides with eps_u + s * sum_k w_k (eps_k - eps_u).
- A prompt and a negative prompt of different lengths are padded to the longer with the empty
  prompt's chunk, so both run in one UNet batch: A1111 with its "Pad prompt/negative prompt"
  setting on (off by default, where it runs the two lengths as separate UNet batches);
  prompts of one batch (and AND parts) of different lengths repeat their last vector, as A1111 does.
- Extra-network tags (``<lora:name:w>``, ``<lyco:...>``) are cut from the text; the pipeline reads
  the LoRA tags before encoding and applies them per call (``pipelines/adapters.py``); other kinds
  of tag are an error naming them.
- Textual-inversion embeddings reach the text encoders through ``triggers`` (``embeddings.Triggers``),
  in prompts and negative prompts, on both paths.

``pipe.encode_prompt`` returns the embeddings a call would use: tensors when they are the same at
every step, else :class:`ScheduledPromptEmbeds`; both go back in as ``prompt_embeds=`` /
``negative_prompt_embeds=``.
"""

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from .. import prompts as syntax
from ..text import check_layer, encode_prompts, encode_text
from ..text_chunks import (DEFAULT_COMMA_PADDING_BACKTRACK, chunk_length, empty_chunk, encode_chunks, encode_texts,
                           is_open_clip)
from .denoising import ClassifierFreeGuidance, PromptEmbeds, classifier_free_guidance, guidance_for

PROMPT_SYNTAXES = ("plain", "a1111")
LORA_KINDS = ("lora", "lyco")  # applied by the pipeline (adapters.py) before encoding


@dataclass(frozen=True)
class PromptSchedule:
    """One text's embeddings over a run, as A1111's prompt editing makes them.

    Entry k is used by the model calls with index up to ``ends[k]`` (A1111's ``end_at_step``);
    calls past the last end keep the last entry.
    """

    ends: tuple  # ascending; the last is the schedule's step count
    embeds: torch.Tensor  # (len(ends), T, D)

    def entry(self, index):
        """Which entry the model call with this index (0 = the run's first call) uses."""
        return next((k for k, end in enumerate(self.ends) if index <= end), len(self.ends) - 1)

    def at(self, index):
        """(T, D) embeddings for the model call with this index."""
        return self.embeds[self.entry(index)]


@dataclass(frozen=True)
class ScheduledPromptEmbeds:
    """Embeddings of prompts that change during a run or combine with AND (what ``encode_prompt``
    returns for them; pass it back as ``prompt_embeds=`` or ``negative_prompt_embeds=``).

    ``prompts[i]`` is prompt i's parts, each ``(weight, PromptSchedule)`` (one part of weight 1
    without AND). ``steps`` is the ``num_inference_steps`` the schedules were made for (a call
    must use the same); None when every schedule has a single entry. ``empty`` is the empty
    prompt's (L + 2, D) chunk from the same encoder, which pads the shorter of prompt and negative
    prompt at a step.
    """

    prompts: tuple
    steps: Optional[int] = None
    empty: Optional[torch.Tensor] = None

    def __len__(self):
        return len(self.prompts)

    @property
    def composable(self):
        """True when some prompt has several parts or a weight other than 1 (composable diffusion)."""
        return any(len(parts) > 1 or parts[0][0] != 1.0 for parts in self.prompts)

    @classmethod
    def from_tensor(cls, embeds):
        """Each row of a (B, T, D) tensor as a prompt that stays the same at every step."""
        return cls(tuple(((1.0, PromptSchedule((0,), row[None])),) for row in embeds))

    def to(self, device=None, dtype=None):
        def move(x):
            return None if x is None else x.to(device=device, dtype=dtype)

        return ScheduledPromptEmbeds(tuple(tuple((w, PromptSchedule(s.ends, move(s.embeds))) for w, s in parts)
                                           for parts in self.prompts), self.steps, move(self.empty))


@dataclass(frozen=True)
class ComposablePromptEmbeds:
    """The conditioning of one model call with AND parts: K blocks of B rows, block k holding part k."""

    cond: torch.Tensor  # (K * B, T, D) part k of image b at row k * B + b
    weights: torch.Tensor  # (K, B) guidance weight of each part (0 for the parts an image lacks)
    uncond: torch.Tensor  # (B, T, D)


def composed_prediction(prediction, weights):
    """(2B, ...) [uncond; cond] from the (1 + K) B predictions: cond = eps_u + sum_k w_k (eps_k - eps_u)."""
    K, B = weights.shape
    uncond, parts = prediction[:B], prediction[B:].unflatten(0, (K, B))  # (K, B, ...)
    w = weights.to(prediction.dtype).reshape(K, B, *[1] * (prediction.ndim - 1))
    return torch.cat([uncond, uncond + (w * (parts - uncond)).sum(0)])


@dataclass(frozen=True)
class ComposableGuidance(ClassifierFreeGuidance):
    """Classifier-free guidance that also takes AND prompts (composable diffusion, Liu et al. 2022,
    arXiv 2206.01714): the model runs once on [uncond; part 1; ...; part K], each a batch of B, and
    eps = eps_u + s * sum_k w_k (eps_k - eps_u) (guidance rescale then as with one prompt). A call
    without parts is plain classifier-free guidance."""

    def __call__(self, model):
        plain = super().__call__(model)

        def guided(x, call):
            prompt = call.prompt
            if not isinstance(prompt, ComposablePromptEmbeds):
                return plain(x, call)
            blocks = 1 + prompt.weights.shape[0]
            context = torch.cat([prompt.uncond, prompt.cond])  # ((1 + K) B, T, D)
            prediction = model(x.repeat(blocks, *[1] * (x.ndim - 1)), dataclasses.replace(call, context=context))
            return classifier_free_guidance(composed_prediction(prediction, prompt.weights), self.scale, self.rescale)

        return guided


def guidance_for_call(options):
    """The guidance piece of a call: composable for A1111 prompts and scheduled embeddings."""
    a1111 = options.prompt_syntax == "a1111" or isinstance(options.prompt_embeds, ScheduledPromptEmbeds)
    if a1111 and options.guidance_scale > 1.0:
        return ComposableGuidance(options.guidance_scale, options.guidance_rescale)
    return guidance_for(options.guidance_scale, options.guidance_rescale)


# -- assembling the tensors of one call ---------------------------------------------------------

def stack_rows(rows):
    """(N, T, D) from (T_i, D) rows; a shorter row repeats its last vector (A1111's ``stack_conds``)."""
    T = max(r.shape[0] for r in rows)
    return torch.stack([torch.cat([r, r[-1:].expand(T - r.shape[0], -1)]) for r in rows])


def pad_with_empty(x, T, empty):
    """(B, T, D) from (B, t, D), appending copies of the empty prompt's (L + 2, D) chunk."""
    missing = T - x.shape[1]
    if missing % empty.shape[0]:
        raise ValueError(f"Prompt and negative prompt embeddings have {T} and {x.shape[1]} tokens; sdkit pads "
                         f"the shorter with whole chunks of {empty.shape[0]}. Pass embeddings of equal length "
                         f"(encode_prompt returns both).")
    return torch.cat([x, empty.expand(x.shape[0], missing // empty.shape[0], -1, -1).flatten(1, 2)], dim=1)


def pad_pair(cond, uncond, empty):
    """cond and uncond padded with empty chunks to the same length (A1111's pad_cond_uncond)."""
    if uncond is None or cond.shape[1] == uncond.shape[1]:
        return cond, uncond
    T = max(cond.shape[1], uncond.shape[1])
    if empty is None:
        raise ValueError(f"prompt_embeds has {cond.shape[1]} tokens and negative_prompt_embeds {uncond.shape[1]}: "
                         f"pass both with the same shape (encode_prompt returns such a pair).")
    return pad_with_empty(cond, T, empty), pad_with_empty(uncond, T, empty)


class StepConditioning:
    """The loop's conditioning (``.at(index)``) for :class:`ScheduledPromptEmbeds`.

    Each call gets a ``PromptEmbeds`` (no AND) or a :class:`ComposablePromptEmbeds`, rows repeated
    for ``num_images_per_prompt``. Built per pipeline call, so its cache is never shared.
    """

    def __init__(self, cond, uncond, empty, num_images_per_prompt):
        self.cond, self.uncond, self.empty, self.n = cond, uncond, empty, num_images_per_prompt
        self._cache = {}

    def at(self, index):
        sides = [self.cond] + ([self.uncond] if self.uncond is not None else [])
        key = tuple(s.entry(index) for side in sides for parts in side.prompts for _, s in parts)
        if key not in self._cache:
            self._cache = {key: self._build(index)}
        return self._cache[key]

    def _build(self, index):
        n = self.n
        uncond = None
        if self.uncond is not None:
            uncond = stack_rows([parts[0][1].at(index) for parts in self.uncond.prompts]).repeat_interleave(n, dim=0)
        if not self.cond.composable:
            cond = stack_rows([parts[0][1].at(index) for parts in self.cond.prompts]).repeat_interleave(n, dim=0)
            return PromptEmbeds(*pad_pair(cond, uncond, self.empty))
        K, P = max(len(parts) for parts in self.cond.prompts), len(self.cond)
        padded = [parts + ((0.0, parts[0][1]),) * (K - len(parts)) for parts in self.cond.prompts]
        rows = stack_rows([padded[p][k][1].at(index) for k in range(K) for p in range(P)])  # (K * P, T, D)
        cond = rows.unflatten(0, (K, P)).repeat_interleave(n, dim=1).flatten(0, 1)  # (K * B, T, D)
        weights = torch.tensor([[padded[p][k][0] for p in range(P)] for k in range(K)]).repeat_interleave(n, dim=1)
        cond, uncond = pad_pair(cond, uncond, self.empty)
        return ComposablePromptEmbeds(cond, weights.to(cond.device), uncond)


# -- encoding -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class A1111Prompts:
    """A batch of A1111 prompts read (tags cut, AND split, schedules made), not yet encoded."""

    parts: tuple  # per prompt: ((weight, [(end_at_step, text)]), ...)
    tags: tuple  # per prompt: its extra-network tags (sdkit.prompts.ExtraNetworkTag)
    steps: Optional[int]  # the schedules' step count; None when no prompt changes during the run


def read_a1111(prompts, steps, negative=False):
    """Cut the tags and split at AND (positive prompts only, as in A1111), then schedule each part.

    Without ``steps`` a prompt that changes during the run is an error (its schedule needs them).
    """
    parts, tags, scheduled = [], [], False
    for prompt in prompts:
        text, found = (prompt, ()) if negative else syntax.extra_network_tags(prompt)
        schedules = []
        for piece, weight in [(text, 1.0)] if negative else syntax.split_and(text):
            if syntax.has_schedule(piece):
                if steps is None:
                    raise ValueError(f"{piece!r} changes during the run ([from:to:when] or [a|b]), so its "
                                     f"embeddings depend on the step count: pass num_inference_steps.")
                scheduled = True
                schedules.append((weight, syntax.prompt_schedule(piece, steps)))
            else:
                schedules.append((weight, [(steps or 1, piece)]))
        parts.append(tuple(schedules))
        tags.append(found)
    return A1111Prompts(tuple(parts), tuple(tags), steps if scheduled else None)


def check_tags(tags):
    """Raise for extra-network tags other than LoRA's (the pipeline applies those before encoding)."""
    for tag in (t for found in tags for t in found):
        if tag.kind not in LORA_KINDS:
            raise ValueError(f"{tag.text}: sdkit has no '{tag.kind}' extra networks; remove the tag from the "
                             f"prompt.")


def a1111_layer(tokenizer, text_encoder, clip_stop_at_last_layers):
    """The encoder layer A1111 reads: its Clip skip, except on SD 2 (OpenCLIP), where it has no effect."""
    layer = clip_stop_at_last_layers or 1
    if layer > 1 and is_open_clip(tokenizer):
        warnings.warn(f"clip_stop_at_last_layers={layer} has no effect on this SD 2 (OpenCLIP) text encoder, as in "
                      f"A1111; its prompts use the encoder's last layer.", stacklevel=4)
        return 1
    check_layer(text_encoder, layer, f"clip_stop_at_last_layers={layer}")
    return layer


def encode_a1111(text_encoder, tokenizer, read, layer, comma_padding_backtrack, empty, device, dtype,
                 triggers=None):
    """ScheduledPromptEmbeds of read A1111 prompts: each part's schedule texts encoded together."""
    cache, out = {}, []
    for parts in read.parts:
        encoded = []
        for weight, schedule in parts:
            texts = tuple(text for _, text in schedule)
            if texts not in cache:
                cache[texts] = encode_texts(text_encoder, tokenizer, texts, layer, comma_padding_backtrack,
                                            triggers)
            ends = tuple(end for end, _ in schedule)
            encoded.append((weight, PromptSchedule(ends, cache[texts].to(device=device, dtype=dtype))))
        out.append(tuple(encoded))
    return ScheduledPromptEmbeds(tuple(out), read.steps, empty)


def empty_embeds(text_encoder, tokenizer, layer, device, dtype):
    """(L + 2, D) the empty prompt's chunk, which pads the shorter of prompt and negative prompt."""
    chunk = empty_chunk(tokenizer, chunk_length(tokenizer, text_encoder))
    return encode_chunks(text_encoder, tokenizer, [chunk], layer)[0].to(device=device, dtype=dtype)


@dataclass(frozen=True)
class _Request:
    """What to encode, from a call's options or encode_prompt's arguments."""

    prompts: Optional[list]
    negative_prompts: Optional[list]  # None: the empty prompt
    prompt_embeds: object = None
    negative_prompt_embeds: object = None
    prompt_syntax: str = "plain"
    clip_skip: Optional[int] = None
    clip_stop_at_last_layers: Optional[int] = None
    comma_padding_backtrack: int = DEFAULT_COMMA_PADDING_BACKTRACK
    steps: Optional[int] = None
    guidance: bool = True
    triggers: object = None  # the call's textual-inversion embeddings (embeddings.Triggers)


def encode_request(text_encoder, tokenizer, request, device, dtype):
    """(cond, uncond, empty): ScheduledPromptEmbeds (or plain tensors) and the padding chunk."""
    a1111 = request.prompt_syntax == "a1111"
    layer = empty = None
    if a1111:
        layer = a1111_layer(tokenizer, text_encoder, request.clip_stop_at_last_layers)
        empty = empty_embeds(text_encoder, tokenizer, layer, device, dtype)
    elif request.clip_skip:
        check_layer(text_encoder, request.clip_skip + 1, f"clip_skip={request.clip_skip}")

    def side(texts, embeds, negative):
        if embeds is not None:
            return embeds.to(device=device, dtype=dtype)
        if a1111:
            read = read_a1111(texts, request.steps, negative)
            check_tags(read.tags)
            return encode_a1111(text_encoder, tokenizer, read, layer, request.comma_padding_backtrack, empty, device,
                                dtype, request.triggers)
        # the reference's clip_skip applies to the prompts only (text.encode_prompts)
        return encode_text(text_encoder, tokenizer, texts, device, dtype, None if negative else request.clip_skip,
                           request.triggers)

    count = len(request.prompts) if request.prompts is not None else len(request.prompt_embeds)
    cond = side(request.prompts, request.prompt_embeds, False)
    uncond = None
    if request.guidance:
        uncond = side(request.negative_prompts or [""] * count, request.negative_prompt_embeds, True)
    if empty is None:  # embeddings from encode_prompt bring the padding chunk of their encoder
        empty = next((x.empty for x in (cond, uncond) if isinstance(x, ScheduledPromptEmbeds)), None)
    return cond, uncond, empty


def _scheduled(x):
    return x if x is None or isinstance(x, ScheduledPromptEmbeds) else ScheduledPromptEmbeds.from_tensor(x)


def _fixed(x):
    """(B, T, D) embeddings of one side when they hold at every step and need no AND; else None."""
    if x is None or isinstance(x, torch.Tensor):
        return x
    if x.composable or x.steps is not None:
        return None
    return stack_rows([parts[0][1].embeds[0] for parts in x.prompts])


def fixed_pair(cond, uncond, empty):
    """(cond, uncond) tensors padded to one length when both sides hold at every step; else None."""
    c, u = _fixed(cond), _fixed(uncond)
    if c is None or (uncond is not None and u is None):
        return None
    return pad_pair(c, u, empty)


def conditioning(text_encoder, tokenizer, request, num_images_per_prompt, device, dtype):
    """The loop's conditioning for a request: ``PromptEmbeds`` (the same at every step) or a
    :class:`StepConditioning`."""
    if request.prompt_syntax == "plain" and request.prompt_embeds is None and request.negative_prompt_embeds is None:
        if request.clip_skip:
            check_layer(text_encoder, request.clip_skip + 1, f"clip_skip={request.clip_skip}")
        return PromptEmbeds(*encode_prompts(text_encoder, tokenizer, request.prompts, request.negative_prompts,
                                            num_images_per_prompt, request.guidance, device, dtype,
                                            request.clip_skip, request.triggers))
    cond, uncond, empty = encode_request(text_encoder, tokenizer, request, device, dtype)
    fixed = fixed_pair(cond, uncond, empty)
    if fixed is not None:
        return PromptEmbeds(*[None if x is None else x.repeat_interleave(num_images_per_prompt, dim=0)
                              for x in fixed])
    cond, uncond = _scheduled(cond), _scheduled(uncond)
    if cond.composable and uncond is None:
        raise ValueError("AND (or a part weight 'text:w') combines each part's difference from the unconditional "
                         "prediction (composable diffusion), so it needs guidance_scale > 1.")
    return StepConditioning(cond, uncond, empty, num_images_per_prompt)


def request_for_call(options, guidance, triggers=None):
    """What a pipeline call encodes (its options: text or embeddings, syntax, clip skip; its embeddings)."""
    return _Request(options.prompts if options.prompt is not None else None, options.negative_prompts,
                    options.prompt_embeds, options.negative_prompt_embeds, options.prompt_syntax, options.clip_skip,
                    options.clip_stop_at_last_layers, options.comma_padding_backtrack, options.num_inference_steps,
                    guidance, triggers)


def encode_prompt(text_encoder, tokenizer, prompt, negative_prompt=None, prompt_syntax="plain", clip_skip=None,
                  clip_stop_at_last_layers=None, num_inference_steps=None,
                  comma_padding_backtrack=DEFAULT_COMMA_PADDING_BACKTRACK, device=None, dtype=None, triggers=None):
    """(prompt_embeds, negative_prompt_embeds) of ``DiffusionPipeline.encode_prompt``."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
    check_text_options(prompt_syntax, clip_skip, clip_stop_at_last_layers, comma_padding_backtrack)
    request = _Request(prompts, None if negatives is None else list(negatives), None, None, prompt_syntax, clip_skip,
                       clip_stop_at_last_layers, comma_padding_backtrack, num_inference_steps, True, triggers)
    cond, uncond, empty = encode_request(text_encoder, tokenizer, request, device, dtype)
    fixed = fixed_pair(cond, uncond, empty)
    return fixed if fixed is not None else (_scheduled(cond), _scheduled(uncond))


# -- checks -------------------------------------------------------------------------------------

def _is_int(value, low):
    return not isinstance(value, bool) and isinstance(value, int) and value >= low


def check_text_options(prompt_syntax, clip_skip, clip_stop_at_last_layers, comma_padding_backtrack):
    """Raise for a bad prompt syntax, or a clip-skip count on the path where it means something else."""
    if prompt_syntax not in PROMPT_SYNTAXES:
        raise ValueError(f"prompt_syntax={prompt_syntax!r} is not one of {PROMPT_SYNTAXES}.")
    if clip_skip is not None:
        if not _is_int(clip_skip, 0):
            raise ValueError(f"clip_skip must be a whole number of layers >= 0, got {clip_skip!r}.")
        if prompt_syntax == "a1111":
            raise ValueError(f"clip_skip counts layers skipped (the reference's meaning) and goes with "
                             f"prompt_syntax='plain'; with 'a1111' pass clip_stop_at_last_layers={clip_skip + 1} "
                             f"(A1111's 'Clip skip', where 1 is the last layer).")
    if clip_stop_at_last_layers is not None:
        if not _is_int(clip_stop_at_last_layers, 1):
            raise ValueError(f"clip_stop_at_last_layers must be a whole number >= 1 (1 = the last layer), got "
                             f"{clip_stop_at_last_layers!r}.")
        if prompt_syntax != "a1111":
            raise ValueError(f"clip_stop_at_last_layers is A1111's 'Clip skip' and goes with prompt_syntax='a1111'; "
                             f"with 'plain' pass clip_skip={clip_stop_at_last_layers - 1} (layers skipped, the "
                             f"reference's meaning).")
    if not _is_int(comma_padding_backtrack, 0):
        raise ValueError(f"comma_padding_backtrack must be a whole number of tokens >= 0 (0: off), got "
                         f"{comma_padding_backtrack!r}.")
    if comma_padding_backtrack != DEFAULT_COMMA_PADDING_BACKTRACK and prompt_syntax != "a1111":
        raise ValueError("comma_padding_backtrack only applies to prompt_syntax='a1111' (plain prompts are one "
                         "window of tokens, never split at commas).")


def embeds_count(embeds, name):
    """Number of prompts in a (B, T, D) tensor or ScheduledPromptEmbeds; raise for anything else."""
    if isinstance(embeds, ScheduledPromptEmbeds):
        return len(embeds)
    if isinstance(embeds, torch.Tensor) and embeds.ndim == 3:
        return embeds.shape[0]
    raise ValueError(f"{name} must be a (batch, tokens, dim) tensor or the ScheduledPromptEmbeds that "
                     f"encode_prompt returns, got {type(embeds).__name__}"
                     + (f" of shape {tuple(embeds.shape)}" if isinstance(embeds, torch.Tensor) else "") + ".")


def check_prompt_options(options):
    """Check a call's text options (text or embeddings, syntax, clip skip) against each other."""
    check_text_options(options.prompt_syntax, options.clip_skip, options.clip_stop_at_last_layers,
                       options.comma_padding_backtrack)
    pe, ne = options.prompt_embeds, options.negative_prompt_embeds
    if pe is not None and options.prompt is not None:
        raise ValueError("Pass prompt or prompt_embeds, not both.")
    if ne is not None and options.negative_prompt is not None:
        raise ValueError("Pass negative_prompt or negative_prompt_embeds, not both.")
    # the reference's clip_skip never reaches negative prompts; A1111's reaches both
    if pe is not None and (options.clip_skip is not None or (options.clip_stop_at_last_layers and ne is not None)):
        raise ValueError("clip_skip and clip_stop_at_last_layers choose how text is encoded, but this call's prompts "
                         "come as embeddings: pass them to encode_prompt instead.")
    if ne is not None:
        n, expected = embeds_count(ne, "negative_prompt_embeds"), options.prompt_count
        if n != expected:
            raise ValueError(f"negative_prompt_embeds holds {n} prompts for {expected}: pass one per prompt.")
        if isinstance(pe, torch.Tensor) and isinstance(ne, torch.Tensor) and pe.shape != ne.shape:
            raise ValueError(f"prompt_embeds {tuple(pe.shape)} and negative_prompt_embeds {tuple(ne.shape)} must have "
                             f"the same shape (encode_prompt returns such a pair).")
    for name, embeds in (("prompt_embeds", pe), ("negative_prompt_embeds", ne)):
        steps = getattr(embeds, "steps", None)
        if steps is not None and steps != options.num_inference_steps:
            raise ValueError(f"{name} was scheduled for {steps} steps but the call runs num_inference_steps="
                             f"{options.num_inference_steps}: encode it again with num_inference_steps="
                             f"{options.num_inference_steps}.")
