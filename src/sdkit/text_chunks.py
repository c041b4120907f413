"""Long, weighted prompts encoded as A1111 encodes them (``modules/sd_hijack_clip.py``).

A prompt text becomes chunks of ``L`` tokens, each sent through the text encoder on its own as
``BOS + L tokens + EOS`` (padded with EOS), and the chunks' features are joined along the
sequence: (len(texts), chunks * (L + 2), D). ``L`` is 75 for CLIP's 77 positions; for a text
encoder with another length it is ``min(tokenizer.model_max_length, max_position_embeddings) - 2``
(14 for the bundled model's 16).

- ``BREAK`` (outside brackets) ends the chunk; the next text starts a new one.
- When a chunk is full and a comma is among its last ``comma_padding_backtrack`` tokens (A1111's
  setting, default 20; 0 turns it off), the tokens after that comma move to the next chunk.
- A batch of texts has as many chunks as its longest; the others get empty chunks (BOS, EOS...).
- Weights ("Original" emphasis): each token's output is multiplied by its weight, then the chunk
  batch is rescaled so its mean equals the unweighted mean (not when the weighted mean is exactly 0).
- OpenCLIP text encoders (SD 2: the tokenizer's pad token is not its EOS) have the positions after
  the first EOS set to the pad id, as A1111's ``sd_hijack_open_clip.py`` does.
- Textual-inversion embeddings (``triggers``, ``sdkit.embeddings``): a trigger word's tokens become n
  placeholders for its n vectors, which start a new chunk when they do not fit in this one (A1111's
  ``tokenize_line``). Where the comma back-off moves text that holds an embedding to the next
  chunk, its vectors move with it; A1111 leaves them at their old positions (in the old chunk's
  padding) and reads the moved placeholders as the token "!".
"""

from dataclasses import dataclass

import torch

from .clip_vocab import is_open_clip
from .embeddings import PLACEHOLDER
from .prompts import BREAK, parse_emphasis
from .per_call import token_vectors
from .text import _TOKENIZER_LOCK, hidden_states, text_root, token_ids

DEFAULT_COMMA_PADDING_BACKTRACK = 20  # A1111's comma_padding_backtrack setting


@dataclass(frozen=True)
class Chunk:
    """One text-encoder input: ``L + 2`` token ids (BOS, text, EOS padding), a weight for each, and the
    embedding vectors that replace placeholder tokens."""

    tokens: tuple
    weights: tuple
    fixes: tuple = ()  # ((position in tokens, (n, D) vectors), ...)


def chunk_length(tokenizer, text_encoder=None):
    """Text tokens per chunk: the encoder's positions less BOS and EOS (75 for CLIP)."""
    positions = tokenizer.model_max_length
    if text_encoder is not None:
        positions = min(positions, text_encoder.config.max_position_embeddings)
    if positions < 3:
        raise ValueError(f"The text encoder reads {positions} positions: too few for BOS, a token and EOS.")
    return positions - 2


def _wrap(tokenizer, tokens, weights, L, fixes=()):
    """A :class:`Chunk` of up to L text tokens: padded with EOS to L, then BOS ... EOS around them."""
    pad = L - len(tokens)
    eos = tokenizer.eos_token_id
    return Chunk((tokenizer.bos_token_id, *tokens, *[eos] * pad, eos), (1.0, *weights, *[1.0] * pad, 1.0),
                 tuple((1 + position, vectors) for position, vectors in fixes))


def empty_chunk(tokenizer, L):
    """The chunk of an empty text (BOS then EOS), which pads shorter texts of a batch."""
    return _wrap(tokenizer, (), (), L)


def _token_ids(tokenizer, texts):
    """(token ids of each text, the id of the word-final comma or None), read under the tokenizer lock."""
    ids = token_ids(tokenizer, texts)
    with _TOKENIZER_LOCK:
        return ids, tokenizer.get_vocab().get(",</w>")


def chunk_text(tokenizer, text, L, comma_padding_backtrack=DEFAULT_COMMA_PADDING_BACKTRACK, triggers=None):
    """The chunks of one prompt text (emphasis parsed, ``BREAK`` and comma back-off applied, the
    trigger words of ``triggers`` replaced by their embeddings' placeholders)."""
    pieces = parse_emphasis(text)
    ids, comma = _token_ids(tokenizer, [text for text, _ in pieces])
    chunks, tokens, weights, fixes = [], [], [], []  # fixes: (position in tokens, vectors)
    last_comma = -1  # position in ``tokens`` of the chunk's last comma

    def close():
        nonlocal tokens, weights, fixes, last_comma
        chunks.append(_wrap(tokenizer, tokens, weights, L, fixes))
        tokens, weights, fixes, last_comma = [], [], [], -1

    for piece_ids, piece in zip(ids, pieces):
        if piece == BREAK:
            close()
            continue
        position = 0
        while position < len(piece_ids):
            token = piece_ids[position]
            if token == comma:
                last_comma = len(tokens)
            elif (comma_padding_backtrack and len(tokens) == L and last_comma != -1
                  and len(tokens) - last_comma <= comma_padding_backtrack):
                cut = last_comma + 1
                moved = tokens[cut:], weights[cut:], [(p - cut, v) for p, v in fixes if p >= cut]
                tokens, weights, fixes = tokens[:cut], weights[:cut], [(p, v) for p, v in fixes if p < cut]
                close()
                tokens, weights, fixes = moved
            if len(tokens) == L:
                close()
            found = triggers.find(piece_ids, position) if triggers else None
            if found is None:
                tokens.append(token)
                weights.append(piece[1])
                position += 1
                continue
            embedding, length = found
            vectors = triggers.vectors(embedding)
            if len(vectors) > L:
                raise ValueError(f"embedding {embedding.name!r} has {len(vectors)} vectors, more than the {L} tokens "
                                 f"of a prompt chunk: this text encoder cannot read it.")
            if len(tokens) + len(vectors) > L:
                close()
            fixes.append((len(tokens), vectors))
            tokens += [PLACEHOLDER] * len(vectors)
            weights += [piece[1]] * len(vectors)
            position += length
    if tokens or not chunks:
        close()
    return chunks


def encode_chunks(text_encoder, tokenizer, chunks, layer=1):
    """(B, L + 2, D) features of a batch of chunks, weighted with "Original" emphasis."""
    device = next(text_encoder.parameters()).device
    ids = torch.tensor([c.tokens for c in chunks], device=device)  # (B, L + 2)
    if is_open_clip(tokenizer):
        for row, chunk in zip(ids, chunks):
            row[chunk.tokens.index(tokenizer.eos_token_id) + 1:] = tokenizer.pad_token_id
    with token_vectors(text_root(text_encoder).embeddings.token_embedding, [c.fixes for c in chunks]):
        z = hidden_states(text_encoder, ids, layer)
    weights = torch.tensor([c.weights for c in chunks], device=device)  # (B, L + 2), float32 as in A1111
    mean = z.mean()
    z = z * weights[..., None]
    new_mean = z.mean()
    # A1111 divides as it is; features whose mean sums to exactly 0 (a final layer norm without bias, as
    # in random test models, on some CPUs' summation order) would give 0 / 0 = NaN there: kept unscaled
    return z * torch.where(new_mean != 0, mean / new_mean, torch.ones_like(mean))


def encode_texts(text_encoder, tokenizer, texts, layer=1,
                 comma_padding_backtrack=DEFAULT_COMMA_PADDING_BACKTRACK, triggers=None):
    """(len(texts), chunks * (L + 2), D): the texts encoded together, chunk by chunk, as A1111 does.

    ``layer``: A1111's "Clip skip" (``CLIP_stop_at_last_layers``: 1 = the last layer; N = hidden
    state -N and the final layer norm). Texts encoded together share each chunk's emphasis
    rescaling, as the texts of one prompt's schedule do in A1111. ``triggers``: the call's
    textual-inversion embeddings (``embeddings.Triggers``).
    """
    L = chunk_length(tokenizer, text_encoder)
    per_text = [chunk_text(tokenizer, text, L, comma_padding_backtrack, triggers) for text in texts]
    empty = empty_chunk(tokenizer, L)
    n = max(len(chunks) for chunks in per_text)
    return torch.cat([encode_chunks(text_encoder, tokenizer, [c[k] if k < len(c) else empty for c in per_text],
                                    layer) for k in range(n)], dim=1)
