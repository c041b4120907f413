"""Prompt encoding with transformers' CLIP tokenizer and text encoder, as Stable Diffusion does it.

Prompts are padded (and truncated) to ``tokenizer.model_max_length`` and the UNet is conditioned
on the text encoder's ``last_hidden_state`` (Rombach et al. 2022, LDM). Tokenizers that pad with
"!" (SD 2, OpenCLIP) read prompts as OpenCLIP does (``clip_vocab.prepare``). Tokenization holds a
lock: a fast (Rust) tokenizer shared between threads otherwise fails with "Already borrowed".
Textual-inversion embeddings (``sdkit.embeddings``) replace their trigger words' tokens by their
vectors when the call passes their ``Triggers``.
"""

import threading
import warnings

import torch

from .clip_vocab import prepare
from .per_call import token_vectors

_TOKENIZER_LOCK = threading.Lock()


def tokenize(tokenizer, texts):
    """Token ids (B, model_max_length) for a list of strings; warns when a prompt is cut short."""
    max_length = tokenizer.model_max_length
    texts, options = prepare(tokenizer, texts)
    with _TOKENIZER_LOCK:
        ids = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                        return_tensors="pt", **options).input_ids
        full = tokenizer(texts, padding="longest", return_tensors="pt", **options).input_ids
        if full.shape[-1] > max_length:
            removed = tokenizer.batch_decode(full[:, max_length - 1:-1])
    if full.shape[-1] > max_length:
        cut = [r for r in removed if r.strip()]
        warnings.warn(f"Prompt truncated: the text encoder reads at most {max_length} tokens, so "
                      f"this part was dropped: {cut}. Shorten the prompt to keep it.", stacklevel=3)
    return ids


def token_ids(tokenizer, texts):
    """The token ids of each text, without BOS, EOS or truncation (lists), read under the tokenizer lock."""
    texts, options = prepare(tokenizer, texts)
    with _TOKENIZER_LOCK:
        return tokenizer(texts, truncation=False, add_special_tokens=False, verbose=False, **options)["input_ids"]


def tokenize_with_embeddings(tokenizer, texts, triggers):
    """(ids (B, model_max_length), per row ((position, (n, D) vectors), ...)) with the embeddings' trigger
    words replaced by their placeholders, cut to the window as ``tokenize`` cuts; None when no text
    uses an embedding."""
    rows = [triggers.substitute(tokens) for tokens in token_ids(tokenizer, list(texts))]
    if not any(fixes for _, fixes in rows):
        return None
    keep = tokenizer.model_max_length - 2  # the window less BOS and EOS
    ids, all_fixes, cut = [], [], 0
    for tokens, fixes in rows:
        cut = max(cut, len(tokens) - keep)
        tokens = tokens[:keep]
        padding = [tokenizer.pad_token_id] * (keep - len(tokens))
        ids.append([tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id, *padding])
        all_fixes.append(tuple((1 + p, triggers.vectors(e)) for p, e in fixes if p < keep))
    if cut > 0:
        warnings.warn(f"Prompt truncated: the text encoder reads at most {keep + 2} tokens, so the last {cut} "
                      f"(embedding vectors counted) were dropped. Shorten the prompt to keep them.", stacklevel=4)
    return torch.tensor(ids), tuple(all_fixes)


def text_root(text_encoder):
    """The CLIP text transformer (transformers 4 wraps it as ``text_model``; 5 does not)."""
    return getattr(text_encoder, "text_model", text_encoder)


def hidden_states(text_encoder, ids, layer=1, attention_mask=None):
    """(B, T, D) text features: the last layer's (``layer=1``), else hidden state ``-layer`` put
    through the final layer norm, as both A1111 (``CLIP_stop_at_last_layers``) and the reference
    (``clip_skip + 1``) take an earlier layer."""
    if layer == 1:
        return text_encoder(ids, attention_mask=attention_mask).last_hidden_state
    out = text_encoder(ids, attention_mask=attention_mask, output_hidden_states=True)
    norm = text_root(text_encoder).final_layer_norm
    return norm(out.hidden_states[-layer])


def check_layer(text_encoder, layer, what):
    """Raise unless hidden state ``-layer`` is a transformer layer's output (1 .. num_hidden_layers)."""
    layers = text_encoder.config.num_hidden_layers
    if not 1 <= layer <= layers:
        raise ValueError(f"{what} asks for layer {layer} from the end, but this text encoder has {layers} "
                         f"layers.")


def encode_text(text_encoder, tokenizer, texts, device=None, dtype=None, clip_skip=None, triggers=None):
    """(B, T, D) hidden states of the text encoder's last layer (``clip_skip`` layers earlier) for a list
    of strings; ``triggers`` (``embeddings.Triggers``) puts textual-inversion vectors in."""
    found = tokenize_with_embeddings(tokenizer, texts, triggers) if triggers else None
    ids, fixes = found if found else (tokenize(tokenizer, list(texts)), ())
    encoder_device = next(text_encoder.parameters()).device
    mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        if found:  # BOS, the text and the first EOS
            eos = ids == tokenizer.eos_token_id
            mask = (eos.cumsum(1) - eos.int() == 0).long().to(encoder_device)
        else:
            texts, options = prepare(tokenizer, texts)
            with _TOKENIZER_LOCK:
                mask = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt", **options).attention_mask.to(encoder_device)
    with token_vectors(text_root(text_encoder).embeddings.token_embedding, fixes):
        hidden = hidden_states(text_encoder, ids.to(encoder_device), (clip_skip or 0) + 1, mask)
    return hidden.to(device=device or encoder_device,
                     dtype=dtype or next(text_encoder.parameters()).dtype)


def encode_prompts(text_encoder, tokenizer, prompts, negative_prompts=None, num_images_per_prompt=1,
                   guidance=True, device=None, dtype=None, clip_skip=None, triggers=None):
    """(cond, uncond): (N, T, D) embeddings of the prompts and, with guidance, of the negative prompts.

    N = len(prompts) * num_images_per_prompt, each prompt's rows consecutive. Negative prompts
    default to the empty string (the unconditional embedding of classifier-free guidance); without
    guidance ``uncond`` is None. ``clip_skip`` (the reference's meaning: layers skipped, 1 = the
    penultimate layer) applies to the prompts only: the reference encodes negative prompts from
    the last layer whatever ``clip_skip`` is, and so does sdkit, to give its pixels. ``triggers``:
    the call's textual-inversion embeddings, in prompts and negative prompts.
    """
    cond = encode_text(text_encoder, tokenizer, prompts, device, dtype, clip_skip, triggers)
    cond = cond.repeat_interleave(num_images_per_prompt, dim=0)  # (N, T, D)
    if not guidance:
        return cond, None
    negatives = negative_prompts if negative_prompts is not None else [""] * len(prompts)
    uncond = encode_text(text_encoder, tokenizer, negatives, device, dtype, triggers=triggers)
    return cond, uncond.repeat_interleave(num_images_per_prompt, dim=0)
