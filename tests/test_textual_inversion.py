"""Textual-inversion embeddings in every shared format against the vectors put in by hand (a copy of the text
encoder with new token rows) and diffusers' load_textual_inversion; A1111's chunking around them; bad files."""

import copy
import hashlib

import diffusers
import pytest
import safetensors.torch
import torch
from helpers import build_reference_pipeline, one_torch_thread, quiet

from sdkit import StableDiffusionPipeline
from sdkit.embeddings import Embedding, Triggers
from sdkit.text import text_root, token_ids
from sdkit.text_chunks import chunk_text


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny SD 1 and SD 2 folders with the real CLIP vocabulary (SD 2: OpenCLIP's "!" padding), 16 positions."""
    return {kind: build_reference_pipeline(str(tmp_path_factory.mktemp(kind)), kind, seed=3, single_file=True)
            for kind in ("sd1", "sd2")}


@pytest.fixture
def pipe(folders):
    return quiet(StableDiffusionPipeline.from_pretrained(folders["sd1"]))


def vectors(n, width=64, seed=0):
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def by_hand(pipe, before, vecs, after, a1111=False):
    """The text encoder's output for BOS + before + the vectors + after + EOS (padded), computed on a copy
    of the encoder whose vocabulary has one new token row per vector."""
    tok, te = pipe.tokenizer, copy.deepcopy(pipe.text_encoder)
    V = te.config.vocab_size
    te.resize_token_embeddings(V + len(vecs))
    with torch.no_grad():
        text_root(te).embeddings.token_embedding.weight[V:] = vecs
    a, b = token_ids(tok, [before, after]) if after else (token_ids(tok, [before])[0], [])
    body = a + list(range(V, V + len(vecs))) + b
    length = tok.model_max_length
    pad = tok.eos_token_id if a1111 else tok.pad_token_id  # A1111 pads its chunks with EOS
    ids = [tok.bos_token_id, *body, tok.eos_token_id] + [pad] * (length - len(body) - 2)
    ids = torch.tensor([ids])
    if a1111 and pad != tok.pad_token_id:  # OpenCLIP: A1111 sets the positions after EOS to the pad id
        ids[0, len(body) + 2:] = tok.pad_token_id
    with torch.no_grad():
        z = te(ids).last_hidden_state
    return z * (z.mean() / z.mean()) if a1111 else z  # A1111's emphasis rescale with all weights 1


def _formats(tmp_path):
    """(source, token=, allow_pickle, trigger word, vectors) of one embedding per shared format."""
    one, three = vectors(1, seed=1), vectors(3, seed=2)
    a1111_pt, a1111_st = tmp_path / "zqxtrig.pt", tmp_path / "zqxtrig.safetensors"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": three}, "name": "another-name",
                "step": 500, "sd_checkpoint": "abcd", "sd_checkpoint_name": "model"}, a1111_pt)
    old = tmp_path / "multivec.pt"  # the original textual-inversion repository's ParameterDict
    torch.save({"string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(three)}), "name": "x"}, old)
    safetensors.torch.save_file({"emb_params": three}, str(a1111_st))
    kohya = tmp_path / "kohyastyle.safetensors"
    safetensors.torch.save_file({"emb_params": one}, str(kohya))
    learned_bin, learned_st = tmp_path / "learned_embeds.bin", tmp_path / "learned_embeds.safetensors"
    torch.save({"<trig-emb>": one[0]}, learned_bin)
    safetensors.torch.save_file({"<trig-emb>": three}, str(learned_st))
    return {"a1111_pt": (str(a1111_pt), None, True, "zqxtrig", three),
            "a1111_pt_parameter_dict": (str(old), None, True, "multivec", three),
            "a1111_safetensors": (str(a1111_st), None, False, "zqxtrig", three),
            "kohya_safetensors": (str(kohya), None, False, "kohyastyle", one),
            "diffusers_bin": (str(learned_bin), None, True, "<trig-emb>", one),
            "diffusers_safetensors": (str(learned_st), None, False, "<trig-emb>", three),
            "tensor_with_token": (three, "zqxtrig", False, "zqxtrig", three),
            "state_dict_with_token": ({"emb_params": one}, "kohyastyle", False, "kohyastyle", one)}


FORMATS = ["a1111_pt", "a1111_pt_parameter_dict", "a1111_safetensors", "kohya_safetensors", "diffusers_bin",
           "diffusers_safetensors", "tensor_with_token", "state_dict_with_token"]


@pytest.mark.parametrize("name", FORMATS)
def test_each_format_puts_its_vectors_in_for_its_trigger_word(pipe, tmp_path, name):
    source, token, allow_pickle, trigger, vecs = _formats(tmp_path)[name]
    prompt = f"a photo of {trigger} on grass"
    plain = pipe.encode_prompt(prompt)[0]
    pipe.load_textual_inversion(source, token=token, allow_pickle=allow_pickle)
    expected = by_hand(pipe, "a photo of", vecs, "on grass")
    torch.testing.assert_close(pipe.encode_prompt(prompt)[0], expected, atol=1e-6, rtol=1e-6)
    assert (pipe.encode_prompt(prompt)[0] - plain).abs().max() > 0.05
    expected = by_hand(pipe, "a photo of", vecs, "on grass", a1111=True)
    torch.testing.assert_close(pipe.encode_prompt(prompt, prompt_syntax="a1111")[0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_the_reference_s_load_textual_inversion_agrees(folders, tmp_path, kind):
    ours = quiet(StableDiffusionPipeline.from_pretrained(folders[kind]))
    ref = quiet(diffusers.StableDiffusionPipeline.from_pretrained(folders[kind], safety_checker=None,
                                                                  requires_safety_checker=False))
    formats = _formats(tmp_path)
    names = ("a1111_pt", "a1111_safetensors", "kohya_safetensors", "diffusers_bin", "diffusers_safetensors")
    for i, name in enumerate(names):
        source, _, allow_pickle, _, _ = formats[name]
        trigger = f"<zq{i}trig>"  # one trigger word each: the reference cannot unload multi-vector tokens
        ref.load_textual_inversion(source, token=trigger)
        ours.load_textual_inversion(source, token=trigger, allow_pickle=allow_pickle)
        for prompt in (f"a photo of {trigger} on grass", f"{trigger}", "a photo without it"):
            expected = ref.encode_prompt(prompt, "cpu", 1, False)[0]
            torch.testing.assert_close(ours.encode_prompt(prompt)[0], expected, atol=1e-6, rtol=1e-6)
    with torch.no_grad():  # a whole call with the last one
        a = ref(f"a {trigger} circle", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    b = ours(f"a {trigger} circle", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    assert abs(a.images - b.images).max() <= 2e-3


def test_sd2_open_clip_embeddings_by_hand(folders):
    pipe = quiet(StableDiffusionPipeline.from_pretrained(folders["sd2"]))
    vecs = vectors(2, seed=4)
    pipe.load_textual_inversion(vecs, token="zqxtrig")
    torch.testing.assert_close(pipe.encode_prompt("a zqxtrig, on grass")[0],
                               by_hand(pipe, "a", vecs, ", on grass"), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(pipe.encode_prompt("a zqxtrig, on grass", prompt_syntax="a1111")[0],
                               by_hand(pipe, "a", vecs, ", on grass", a1111=True), atol=1e-5, rtol=1e-5)


def test_loading_changes_nothing_for_prompts_without_the_trigger(pipe):
    prompts = ["a red circle", "(a red:1.2) circle BREAK on grass"]
    before = [pipe.encode_prompt(p, prompt_syntax=s)[0] for p in prompts for s in ("plain", "a1111")]
    pipe.load_textual_inversion({"zqxtrig": vectors(2)})
    after = [pipe.encode_prompt(p, prompt_syntax=s)[0] for p in prompts for s in ("plain", "a1111")]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    pipe.unload_textual_inversion("zqxtrig")
    assert torch.equal(pipe.encode_prompt("a zqxtrig")[0], pipe.encode_prompt("a zqxtrig", embedding_dirs=[])[0])


# -- A1111's chunks --------------------------------------------------------------------------------

def _ids(tok, text):
    return token_ids(tok, [text])[0]


def test_a1111_matches_the_longest_trigger_and_starts_a_chunk_when_the_vectors_do_not_fit(pipe):
    tok, L = pipe.tokenizer, 14
    short, long = Embedding("zqx", vectors(2, seed=5)), Embedding("zqxtrig", vectors(3, seed=6))
    triggers = Triggers([short, long], tok, 64)
    words = "one two three four five six seven eight nine ten eleven"  # 11 tokens
    assert len(_ids(tok, words)) == 11
    chunks = chunk_text(tok, f"{words} zqxtrig zqx", L, 0, triggers)
    P, eos = 0, tok.eos_token_id
    # 11 + 3 > 14 is false: zqxtrig fits (positions 11-13); then zqx (2) does not: a new chunk
    assert chunks[0].tokens == (tok.bos_token_id, *_ids(tok, words), P, P, P, eos)
    assert chunks[1].tokens == (tok.bos_token_id, P, P, *[eos] * 12, eos)
    assert [(p, v.shape[0]) for p, v in chunks[0].fixes] == [(12, 3)] and torch.equal(chunks[0].fixes[0][1], long.vectors)
    assert [(p, v.shape[0]) for p, v in chunks[1].fixes] == [(1, 2)] and torch.equal(chunks[1].fixes[0][1], short.vectors)
    chunks = chunk_text(tok, f"{words} one zqxtrig", L, 0, triggers)  # 12 + 3 > 14: the embedding moves on
    assert chunks[0].tokens[-3:] == (eos, eos, eos) and chunks[0].fixes == ()
    assert chunks[1].tokens[:4] == (tok.bos_token_id, P, P, P) and chunks[1].fixes[0][0] == 1
    # the comma back-off moves the embedding's vectors with its placeholders
    chunks = chunk_text(tok, "one two three four five six seven eight nine ten, zqxtrig one two", L, 20, triggers)
    assert chunks[1].tokens[:4] == (tok.bos_token_id, P, P, P) and [p for p, _ in chunks[1].fixes] == [1]
    assert chunks[0].fixes == ()


def test_a1111_prompt_with_weights_and_an_embedding_by_hand(pipe):
    vecs = vectors(2, seed=8)
    pipe.load_textual_inversion(vecs, token="zqxtrig")
    ours = pipe.encode_prompt("a (zqxtrig:1.5) cat", prompt_syntax="a1111")[0]
    hand = by_hand(pipe, "a", vecs, "cat", a1111=True)  # unweighted; then Original emphasis by hand
    tok = pipe.tokenizer
    w = torch.ones(tok.model_max_length)
    w[2:4] = 1.5
    z = hand * w[None, :, None]
    torch.testing.assert_close(ours, z * (hand.mean() / z.mean()), atol=1e-5, rtol=1e-5)


# -- folders and bad inputs ------------------------------------------------------------------------

def test_embedding_dirs_per_call_and_pickles_only_when_allowed(pipe, tmp_path):
    folder = tmp_path / "embeddings"
    (folder / "sub").mkdir(parents=True)
    safetensors.torch.save_file({"emb_params": vectors(2, seed=9)}, str(folder / "sub" / "zqxtrig.safetensors"))
    torch.save({"string_to_param": {"*": vectors(1, seed=10)}, "name": "n"}, folder / "kohyastyle.pt")
    safetensors.torch.save_file({"emb_params": vectors(1, width=768)}, str(folder / "multivec.safetensors"))
    ours = pipe.encode_prompt("a zqxtrig cat", embedding_dirs=str(folder))[0]
    torch.testing.assert_close(ours, by_hand(pipe, "a", vectors(2, seed=9), "cat"), atol=1e-6, rtol=1e-6)
    assert torch.equal(pipe.encode_prompt("a zqxtrig cat")[0], pipe.encode_prompt("a zqxtrig cat", adapters={})[0])
    with pytest.raises(ValueError, match="pickle.*allow_pickle=True"):
        pipe.encode_prompt("a kohyastyle cat", embedding_dirs=[str(folder)])
    assert pipe.encode_prompt("a kohyastyle cat", embedding_dirs=[str(folder)], allow_pickle=True)[0].shape[1] == 16
    with pytest.raises(ValueError, match=r"'multivec' .* 768-wide vectors but this text encoder is 64 wide"):
        pipe("a multivec", embedding_dirs=[str(folder)], num_inference_steps=1)
    with pytest.raises(ValueError, match="embeddings folder .* does not exist"):
        pipe("a cat", embedding_dirs=str(tmp_path / "nowhere"), num_inference_steps=1)


def test_bad_embeddings_are_clear_errors_and_change_nothing(pipe, tmp_path):
    pipe.load_textual_inversion(vectors(1), token="zqxtrig")
    before = pipe.encode_prompt("a zqxtrig kohyastyle")[0]
    pickle = tmp_path / "kohyastyle.pt"
    torch.save({"string_to_param": {"*": vectors(1)}}, pickle)
    safetensors.torch.save_file({"clip_l": vectors(1, 768), "clip_g": vectors(1, 1280)}, str(tmp_path / "xl.safetensors"))
    safetensors.torch.save_file({"a": vectors(1), "b": vectors(1)}, str(tmp_path / "two.safetensors"))
    for source, token, message in (
            (vectors(1, 1024), "kohyastyle", r"'kohyastyle' has 1024-wide vectors but .* 64 wide"),
            (str(pickle), None, r"pickle checkpoint.*allow_pickle=True"),
            (str(tmp_path / "xl.safetensors"), None, "SDXL embedding"),
            (str(tmp_path / "two.safetensors"), None, "not a textual-inversion embedding"),
            (vectors(1), None, "pass token="), (vectors(1), "zqxtrig", "'zqxtrig' is taken")):
        with pytest.raises(ValueError, match=message):
            pipe.load_textual_inversion(source, token=token)
        assert torch.equal(pipe.encode_prompt("a zqxtrig kohyastyle")[0], before)


def test_cli_writes_a1111_s_ti_hashes(folders, tmp_path, capsys):
    from PIL import Image

    from sdkit import infotext
    from sdkit.cli import main

    folder = tmp_path / "embeddings"
    folder.mkdir()
    path = folder / "zqxtrig.safetensors"
    safetensors.torch.save_file({"emb_params": vectors(2)}, str(path))
    safetensors.torch.save_file({"emb_params": vectors(1)}, str(folder / "unused.safetensors"))
    out = tmp_path / "o.png"
    code = main(["generate", "a (zqxtrig:1.1) circle", "-o", str(out), "--model", folders["sd1"], "--steps", "2",
                 "--seed", "1", "-q", "--enlarge", "1", "--embeddings-dir", str(folder)])
    assert code == 0, capsys.readouterr().err
    info = infotext.load(out)
    assert info.get("TI hashes") == (("zqxtrig", hashlib.sha256(path.read_bytes()).hexdigest()[:12]),)
    pipe = quiet(StableDiffusionPipeline.from_pretrained(folders["sd1"]))
    expected = pipe("a (zqxtrig:1.1) circle", num_inference_steps=2, guidance_scale=7.5, prompt_syntax="a1111",
                    embedding_dirs=str(folder), seed=1).images[0]
    assert list(Image.open(out).convert("RGB").getdata()) == list(expected.getdata())
    again = tmp_path / "again.png"  # --from-png reads the trigger word from --embeddings-dir again
    code = main(["generate", "--from-png", str(out), "-o", str(again), "--model", folders["sd1"], "-q",
                 "--enlarge", "1", "--embeddings-dir", str(folder)])
    assert code == 0 and "TI hashes" in capsys.readouterr().err
    assert list(Image.open(again).getdata()) == list(Image.open(out).getdata())
