"""The CLIP byte-pair vocabulary shipped with sdkit, and the tokenizers Stable Diffusion uses with it.

``assets/clip/bpe_simple_vocab_16e6.txt.gz`` is OpenAI CLIP's BPE file (Radford et al. 2021), as
open-clip-torch distributes it (MIT; ``assets/clip/LICENSE``). From it, offline, sdkit builds the
49,408-token vocabulary and merges of transformers' ``CLIPTokenizer`` (what a ``tokenizer/``
folder's vocab.json and merges.txt hold). SD 1 (CLIP ViT-L) pads prompts with the end token;
SD 2 (OpenCLIP ViT-H) pads with "!" (id 0) and cleans text as OpenCLIP does (ftfy, HTML
entities), so that its ids equal ``open_clip.tokenize``.
"""

import functools
import gzip
import html
import os

BPE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "clip", "bpe_simple_vocab_16e6.txt.gz")
NUM_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48,894 merges of the file
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
SD1_PAD = EOS  # CLIP ViT-L (SD 1.x) pads with the end token
OPENCLIP_PAD = "!"  # OpenCLIP (SD 2.x) pads with zeros, the id of "!"
VOCAB_SIZE = 49408


def byte_alphabet():
    """GPT-2/CLIP's reversible byte -> printable unicode map, in byte order (Radford et al. 2019)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


@functools.lru_cache(maxsize=None)
def vocabulary():
    """(vocab {token: id}, merges [(left, right)]) of CLIP: bytes, bytes + </w>, merges, BOS, EOS."""
    try:
        lines = gzip.open(BPE_PATH).read().decode("utf-8").split("\n")
    except OSError as e:
        raise FileNotFoundError(f"The CLIP vocabulary {BPE_PATH} is missing or damaged ({e}): "
                                f"reinstall sdkit.") from None
    merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]
    alphabet = sorted(byte_alphabet(), key=ord)  # CLIP's vocabulary order: printable bytes first
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer(pad_token=SD1_PAD, model_max_length=77):
    """transformers' CLIPTokenizer on the CLIP vocabulary; ``pad_token`` "!" for SD 2 (OpenCLIP)."""
    from transformers import CLIPTokenizer

    vocab, merges = vocabulary()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length,
                         bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=pad_token)


def is_clip_vocabulary(tokenizer):
    """True when ``tokenizer`` has exactly CLIP's 49,408 tokens with CLIP's ids."""
    return len(tokenizer) == VOCAB_SIZE and tokenizer.get_vocab() == vocabulary()[0]


def is_open_clip(tokenizer):
    """True for SD 2's OpenCLIP tokenizers, whose padding ("!", id 0) is not the end token."""
    return tokenizer.pad_token_id != tokenizer.eos_token_id


def openclip_clean(text):
    """OpenCLIP's text cleaning before BPE: ftfy.fix_text, HTML entities twice, outer spaces."""
    import ftfy

    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def prepare(tokenizer, texts):
    """(texts, tokenizer keywords): OpenCLIP tokenizers get cleaned texts, and "!" in a prompt is text.

    "!" is the pad token of SD 2 tokenizers; transformers would otherwise read every "!" of a
    prompt as padding, which OpenCLIP (what SD 2 was trained with, and A1111 reads SD 2 prompts
    with) does not.
    """
    if not is_open_clip(tokenizer):
        return list(texts), {}
    return [openclip_clean(t) for t in texts], {"split_special_tokens": True}
