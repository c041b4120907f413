"""A CLIP BPE tokenizer whose vocabulary is a given word list (for models trained from scratch).

Writes the ``vocab.json`` + ``merges.txt`` pair that transformers' ``CLIPTokenizer`` loads, so the
bundled model's tokenizer folder looks like any Stable Diffusion ``tokenizer/`` folder. Every
byte is in the vocabulary, so unknown words still tokenize (into pieces).
"""

import json
import os

from ..clip_vocab import byte_alphabet


def _apply_merges(parts, ranks):
    """Byte-pair encoding of one word: repeatedly join the best-ranked adjacent pair (Sennrich 2016)."""
    while len(parts) > 1:
        rank, i = min((ranks.get(pair, float("inf")), i) for i, pair in enumerate(zip(parts, parts[1:])))
        if rank == float("inf"):
            break
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
    return parts


def build_clip_tokenizer(words, save_dir, model_max_length=77):
    """Write a CLIP tokenizer whose whole-word tokens are `words`; return the loaded tokenizer."""
    from transformers import CLIPTokenizer

    alphabet = byte_alphabet()
    vocab = {}
    for token in alphabet + [c + "</w>" for c in alphabet]:
        vocab.setdefault(token, len(vocab))
    merges, ranks = [], {}
    for word in sorted({w.lower() for w in words}):
        if not word.isascii() or not word.isalpha():
            raise ValueError(f"tokenizer words must be ASCII letters only, got {word!r}")
        # segment with the merges so far, then join what is left with new, lowest-priority merges:
        # earlier words keep their single-token segmentation (a new merge never outranks theirs)
        parts = _apply_merges(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        left = parts[0]
        for right in parts[1:]:
            ranks[(left, right)] = len(merges)
            merges.append(f"{left} {right}")
            left = left + right
            vocab.setdefault(left, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    os.makedirs(save_dir, exist_ok=True)
    with open(os.path.join(save_dir, "vocab.json"), "w") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(save_dir, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges],
                        model_max_length=model_max_length)
    tok.save_pretrained(save_dir)
    return CLIPTokenizer.from_pretrained(save_dir)
