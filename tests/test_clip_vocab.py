"""sdkit's CLIP tokenizer against OpenCLIP's (the tokenizer SD 2 was trained with)."""

import hashlib
import json
import os
import warnings

import pytest
import torch
from oracles import open_clip_tokenizer

from sdkit.clip_vocab import (BPE_PATH, OPENCLIP_PAD, SD1_PAD, VOCAB_SIZE, clip_tokenizer, openclip_clean,
                              vocabulary)
from sdkit.text import tokenize

PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "Café crème brûlée, naïve façade, über straße, l'été à Paris",
    "日本語のテキストと中文",
    "emoji 🐱🚀 👍🏽 flags 🇺🇸 🏳️‍🌈",
    "!!!???...,,,;;;:::",
    "((masterpiece)), [best quality:1.2], <lora:style:0.5>, {a|b}",
    "“curly quotes”, ‘single’ — dashes… and ellipses",
    "ﬁne ligatures and ＦＵＬＬＷＩＤＴＨ letters",
    "mojibake cafÃ© and HTML &amp; entities &lt;b&gt;",
    "UPPER lower MiXeD CaSe",
    "don't won't it's we're they've I'm you'll he'd",
    "tab\tnew\nline   and   spaces",
    "1234567890 3.14159 1e-5 -42 +7",
    "#hashtag @user https://example.com/a?b=c&d=e",
    "Ω≈ç√∫˜µ≤≥÷ ∑∏ ∞ ≠ ± ° ©®™",
    "    leading and trailing spaces    ",
    "",
    "hi!",
    "<|endoftext|> and <|startoftext|> written in the prompt",
    "a very long prompt " + " ".join(f"word{i}" for i in range(120)),
    "a,b,c,d,e,f,g,h,i,j,k,l,m,n,o,p,q,r,s,t,u,v,w,x,y,z," * 5,
    "Ελληνικά, русский текст, עברית, العربية",
]


@pytest.fixture(scope="module")
def oracle():
    return open_clip_tokenizer()


def _ids(tokenizer, prompts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the over-long prompts warn that they are cut
        return tokenize(tokenizer, prompts)


def test_the_shipped_vocabulary_is_open_clips_file(oracle):
    with open(BPE_PATH, "rb") as ours, open(oracle.default_bpe(), "rb") as reference:
        assert hashlib.sha256(ours.read()).digest() == hashlib.sha256(reference.read()).digest()
    licence = open(os.path.join(os.path.dirname(BPE_PATH), "LICENSE")).read()
    assert "MIT License" in licence and "Copyright (c) 2021 OpenAI" in licence and "Ilharco" in licence


def test_vocabulary_equals_open_clips(oracle):
    vocab, merges = vocabulary()
    theirs = oracle.SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    assert len(vocab) == VOCAB_SIZE == len(theirs.encoder)
    assert vocab == {names.get(t, t): i for t, i in theirs.encoder.items()}
    assert {m: i for i, m in enumerate(merges)} == theirs.bpe_ranks


def test_sd2_ids_equal_open_clip_tokenize(oracle):
    """SD 2 (pad "!" = 0): ids equal open_clip.tokenize on ordinary, accented, emoji, punctuation-heavy,
    HTML-escaped and over-long prompts."""
    assert len(PROMPTS) >= 20
    ours = _ids(clip_tokenizer(OPENCLIP_PAD), PROMPTS)
    reference = oracle.tokenize(PROMPTS)
    for prompt, a, b in zip(PROMPTS, reference, ours):
        assert torch.equal(a, b), f"{prompt!r}: open_clip {a[:12].tolist()}, sdkit {b[:12].tolist()}"
    assert ours[-3, -1] == 49407  # an over-long prompt keeps the end token last
    assert (ours[0] == 0).sum() > 0  # padded with "!" (id 0)


def test_sd1_pads_with_the_end_token(oracle):
    """SD 1 (CLIP ViT-L, as transformers reads it): the same ids as OpenCLIP's up to the end token, then
    the end token as padding; text OpenCLIP would clean (ftfy, HTML entities) is left as it is."""
    plain = [p for p in PROMPTS if openclip_clean(p) == p.strip() and "<|" not in p]
    assert len(plain) >= 12
    ours = _ids(clip_tokenizer(SD1_PAD), plain)
    reference = oracle.tokenize(plain)
    for prompt, a, b in zip(plain, reference, ours):
        n = int((a != 0).sum())
        assert torch.equal(a[:n], b[:n]), prompt
        assert (b[n:] == 49407).all(), prompt


def test_tokenizer_files_round_trip(tmp_path):
    """A saved tokenizer folder holds vocab.json and merges.txt (built offline from the shipped file),
    which transformers reads back to the same ids, from them alone too."""
    from transformers import CLIPTokenizer

    from sdkit.pipelines.loading import save_tokenizer

    tokenizer = clip_tokenizer(OPENCLIP_PAD, 77)
    save_tokenizer(tokenizer, tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    merges = (tmp_path / "merges.txt").read_text(encoding="utf-8").strip().split("\n")
    assert vocab == vocabulary()[0] and merges[0] == "#version: 0.2" and len(merges) == 1 + 48894
    again = CLIPTokenizer.from_pretrained(tmp_path)
    assert again.pad_token == "!" and again.model_max_length == 77
    only = tmp_path / "vocab-and-merges-only"
    only.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (only / name).write_bytes((tmp_path / name).read_bytes())
    from_files = CLIPTokenizer.from_pretrained(only, pad_token="!", model_max_length=77)
    expected = _ids(tokenizer, PROMPTS)
    assert torch.equal(_ids(again, PROMPTS), expected) and torch.equal(_ids(from_files, PROMPTS), expected)


def test_a1111_chunks_of_sd2_prompts_are_open_clips_tokens(oracle):
    """A1111 reads SD 2 prompts with OpenCLIP's tokenizer (sd_hijack_open_clip): sdkit's A1111 chunker
    on the SD 2 tokenizer gives OpenCLIP's token ids, "!" and HTML entities included."""
    from sdkit.text_chunks import chunk_text

    tokenizer, reference = clip_tokenizer(OPENCLIP_PAD), oracle.SimpleTokenizer()
    plain = [p for p in PROMPTS if not any(c in p for c in "()[]\\:") and "BREAK" not in p]
    assert len(plain) >= 15 and any("!" in p for p in plain) and any("&amp;" in p for p in plain)
    for prompt in plain:
        tokens = [t for chunk in chunk_text(tokenizer, prompt, 75)  # every chunk's text tokens, in order
                  for t in chunk.tokens[1:chunk.tokens.index(49407)]]
        assert tokens == reference.encode(prompt), prompt
