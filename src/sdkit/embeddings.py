"""Textual-inversion embeddings (Gal et al. 2022, arXiv 2208.01618): the files, and their trigger words in a prompt.

An embedding is n vectors of the text encoder's width that stand for n token positions. A prompt
uses it by its trigger word, matched as A1111 matches it (``modules/textual_inversion``,
``sd_hijack_clip.py``): as the word's token sequence, the longest match first; the matched tokens
become n placeholder tokens whose token embeddings are replaced by the vectors inside the text
encoder for that call only (``per_call.token_vectors``).

Files: A1111 ``.pt`` (``string_to_param: {"*": (n, D)}``) and ``.safetensors`` (``emb_params``),
which kohya writes too, and diffusers' ``learned_embeds`` (``{token: (D,) or (n, D)}``). The trigger
is ``token=``, else the file stem (A1111's rule), for diffusers' files their key. ``.pt``/``.bin``
are pickles: read only with ``allow_pickle=True``, through ``torch.load(weights_only=True)``.
"""

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .files import cached_read
from .text import token_ids

EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
PLACEHOLDER = 0  # the token id A1111 puts where an embedding's vectors go
_CACHE, _CACHE_LOCK, _CACHE_SIZE = OrderedDict(), threading.Lock(), 256


@dataclass(frozen=True, eq=False)
class Embedding:
    """A textual-inversion embedding: its trigger word and vectors."""

    name: str  # the trigger word
    vectors: torch.Tensor  # (n, D) float32
    path: Optional[str] = None  # the file it came from


def _vectors(data, what):
    """(vectors, name the data gives or None) of an embedding file's contents, in any known format."""
    if isinstance(data, torch.Tensor):
        return data, None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{what} holds no embedding (found {type(data).__name__}).")
    if "string_to_param" in data:  # A1111 .pt
        params = dict(data["string_to_param"].items())
        if len(params) != 1:
            raise ValueError(f"{what} holds {len(params)} embeddings in string_to_param; A1111 files hold one.")
        return next(iter(params.values())), data.get("name")
    if "emb_params" in data:  # A1111 / kohya .safetensors
        return data["emb_params"], None
    if "clip_l" in data or "clip_g" in data:
        raise ValueError(f"{what} is an SDXL embedding (clip_l / clip_g); sdkit's pipelines are SD 1.x and 2.x.")
    if len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):  # diffusers learned_embeds
        return next(iter(data.values())), next(iter(data))
    raise ValueError(f"{what} is not a textual-inversion embedding: expected string_to_param (A1111 .pt), "
                     f"emb_params (A1111 / kohya .safetensors) or one {{token: vectors}} entry (diffusers); "
                     f"found the keys {sorted(map(str, data))[:5]}.")


def read_embedding(source, token=None, allow_pickle=False):
    """The :class:`Embedding` of a file path or its loaded contents (dict or tensor)."""
    from .models.single_file import read_file

    path = None
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.suffix.lower() not in EMBEDDING_SUFFIXES:
            raise ValueError(f"{path}: embeddings are .safetensors, .pt or .bin files.")
        data = read_file(path, allow_pickle)
    else:
        data = source
    what = str(path) if path else "the embedding given"
    vectors, given_name = _vectors(data, what)
    if not isinstance(vectors, torch.Tensor) or vectors.ndim not in (1, 2) or not vectors.numel():
        raise ValueError(f"{what}: the embedding must be a (vectors, width) tensor, got "
                         f"{tuple(getattr(vectors, 'shape', ()))}.")
    from_file = path is not None and ("string_to_param" in data or "emb_params" in data)
    name = token or (path.stem if from_file else given_name) or (path.stem if path else None)
    if not name:
        raise ValueError(f"{what} does not say its trigger word: pass token='...'.")
    vectors = vectors.detach().float().cpu().reshape(-1, vectors.shape[-1])  # (n, D)
    return Embedding(name, vectors, None if path is None else str(path))


def read_cached(path, allow_pickle=False):
    """read_embedding of a file, kept while the file is unchanged (the embeddings folders of calls)."""
    return cached_read(_CACHE, _CACHE_LOCK, _CACHE_SIZE, path,
                       lambda p: read_embedding(p, allow_pickle=allow_pickle))


@dataclass(frozen=True, eq=False)
class EmbeddingFile:
    """An embedding in an embeddings folder: known by its file stem, read when a prompt uses it."""

    name: str
    path: str
    allow_pickle: bool = False

    @property
    def vectors(self):
        return read_cached(self.path, self.allow_pickle).vectors


def folder_embeddings(folders, allow_pickle=False):
    """An :class:`EmbeddingFile` per embedding file under the folders (searched recursively, as A1111
    does); a stem found twice keeps the first folder's, the first in sorted order."""
    found = {}
    for folder in folders:
        if not os.path.isdir(folder):
            raise ValueError(f"embeddings folder {folder} does not exist.")
        for root, dirs, files in os.walk(folder):
            dirs.sort()
            for file in sorted(files):
                stem, suffix = os.path.splitext(file)
                if suffix.lower() in EMBEDDING_SUFFIXES:
                    found.setdefault(stem, EmbeddingFile(stem, os.path.join(root, file), allow_pickle))
    return list(found.values())


class Triggers:
    """The trigger words of some embeddings as token sequences of one tokenizer, for one text encoder
    width: what a prompt's tokens are matched against (A1111's ``find_embedding_at_position``)."""

    def __init__(self, embeddings, tokenizer, width):
        self.width = width
        self._by_first = {}
        embeddings = list(embeddings)
        for embedding, ids in zip(embeddings, token_ids(tokenizer, [e.name for e in embeddings])):
            if ids:
                self._by_first.setdefault(ids[0], []).append((tuple(ids), embedding))
        for candidates in self._by_first.values():
            candidates.sort(key=lambda c: len(c[0]), reverse=True)  # longest first; ties keep load order

    def __bool__(self):
        return bool(self._by_first)

    def find(self, tokens, position):
        """(embedding, tokens its trigger takes) of the trigger starting at ``tokens[position]``, or None."""
        for ids, embedding in self._by_first.get(tokens[position], ()):
            if tuple(tokens[position:position + len(ids)]) == ids:
                return embedding, len(ids)
        return None

    def vectors(self, embedding):
        """(n, D) vectors of an embedding, checked against the text encoder's width."""
        v = embedding.vectors
        if v.shape[1] != self.width:
            where = f" ({embedding.path})" if embedding.path else ""
            raise ValueError(f"embedding {embedding.name!r}{where} has {v.shape[1]}-wide vectors but this text "
                             f"encoder is {self.width} wide: it was made for another model (SD 1.x: 768, "
                             f"SD 2.x: 1024).")
        return v

    def used(self, tokenizer, texts, a1111=True):
        """The names of the embeddings the texts use, in order of first use (A1111's "TI hashes"): their
        trigger words in the token ids of each emphasis piece ("a1111") or of the whole text."""
        from .prompts import BREAK, extra_network_tags, parse_emphasis

        pieces = [text for whole in texts for text, w in parse_emphasis(extra_network_tags(whole)[0])
                  if (text, w) != BREAK] if a1111 else texts
        names = []
        for tokens in token_ids(tokenizer, list(pieces)):
            for position in range(len(tokens)):
                found = self.find(tokens, position)
                if found and found[0].name not in names:
                    names.append(found[0].name)
        return names

    def substitute(self, tokens):
        """(tokens with each trigger replaced by its placeholders, ((position, embedding), ...))."""
        out, fixes, position = [], [], 0
        while position < len(tokens):
            found = self.find(tokens, position)
            if found is None:
                out.append(tokens[position])
                position += 1
                continue
            embedding, length = found
            fixes.append((len(out), embedding))
            out += [PLACEHOLDER] * len(self.vectors(embedding))
            position += length
        return out, tuple(fixes)
