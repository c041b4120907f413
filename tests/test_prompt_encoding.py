"""A1111 prompt encoding against a hand-built computation (the tokens of every chunk listed here),
calls with prompt_syntax="a1111" against the same call with those embeddings, per-step prompts
against manual loops, and the reference's prompt_embeds= and clip_skip paths against diffusers."""

import os
import tempfile

import diffusers
import pytest
import torch
from helpers import WORDS, build_reference_pipeline, perturb, sample_image, sample_mask
from transformers import CLIPTextConfig, CLIPTextModel

import sdkit
from sdkit import InpaintPipeline, StableDiffusionPipeline
from sdkit.pipelines import ScheduledPromptEmbeds
from sdkit.pipelines.denoising import classifier_free_guidance
from sdkit.schedulers.schedules import randn
from sdkit.text_chunks import encode_texts
from sdkit.training.tokenizer import build_clip_tokenizer

STEPS = 2


def _folder(path, kind, length):
    """A tiny reference folder whose text encoder's norms are perturbed too: a freshly initialised
    final layer norm gives features of mean ~0, where A1111's rescale to the mean says nothing."""
    build_reference_pipeline(path, kind, model_max_length=length)
    te = perturb(CLIPTextModel.from_pretrained(os.path.join(path, "text_encoder")), seed=5, scale=0.5)
    te.save_pretrained(os.path.join(path, "text_encoder"))
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {name: _folder(str(tmp_path_factory.mktemp(name)), kind, length)
            for name, kind, length in (("sd1", "sd1", 16), ("sd1-77", "sd1", 77), ("inpaint", "inpaint", 16))}


def _load(cls, folder):
    pipe = cls.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(folders):
    return _load(StableDiffusionPipeline, folders["sd1"])


@pytest.fixture(scope="module")
def pipe77(folders):
    return _load(StableDiffusionPipeline, folders["sd1-77"])


@pytest.fixture(scope="module")
def bundled():
    return _load(StableDiffusionPipeline, sdkit.TINY_MODEL)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# -- the hand-built computation ----------------------------------------------------------------

def words(text, weight=1.0):
    """(token, weight) of each space-separated word of a text: the chunk contents listed by hand."""
    return [(w + "</w>", weight) for w in text.split()]


def hand_encode(pipe, rows, layer=1):
    """(len(rows), chunks * (L + 2), D): each row a list of chunks, each chunk a list of (token, weight).

    Every chunk is BOS + its tokens + EOS up to L + 2 ids; chunk k of all rows goes through the
    text encoder together; its hidden state (-layer, then the final layer norm; the last layer's
    output for layer 1) is multiplied by the weights and rescaled to the unweighted mean.
    """
    tok, te = pipe.tokenizer, pipe.text_encoder
    L = tok.model_max_length - 2
    out = []
    for k in range(max(len(r) for r in rows)):
        ids, weights = [], []
        for row in rows:
            chunk = row[k] if k < len(row) else []
            assert len(chunk) <= L
            ids.append([tok.bos_token_id] + tok.convert_tokens_to_ids([t for t, _ in chunk])
                       + [tok.eos_token_id] * (L + 1 - len(chunk)))
            weights.append([1.0] + [w for _, w in chunk] + [1.0] * (L + 1 - len(chunk)))
        with torch.no_grad():
            hidden = te(torch.tensor(ids), output_hidden_states=True)
            z = hidden.last_hidden_state if layer == 1 else te.final_layer_norm(hidden.hidden_states[-layer])
        weighted = z * torch.tensor(weights)[..., None]
        out.append(weighted * (z.mean() / weighted.mean()))
    return torch.cat(out, dim=1)


def _same_images(pipe, prompt, negative, **options):
    """The a1111 call's images, and the images of the call with encode_prompt's embeddings."""
    kwargs = dict(num_inference_steps=STEPS, output_type="pt", **options)
    text = pipe(prompt, negative_prompt=negative, prompt_syntax="a1111", generator=gen(), **kwargs).images
    pe, ne = pipe.encode_prompt(prompt, negative, prompt_syntax="a1111", num_inference_steps=STEPS,
                                **{k: v for k, v in options.items() if k in ("clip_stop_at_last_layers",
                                                                             "comma_padding_backtrack")})
    embeds = pipe(prompt_embeds=pe, negative_prompt_embeds=ne, generator=gen(),
                  **{k: v for k, v in kwargs.items() if k not in ("clip_stop_at_last_layers",
                                                                  "comma_padding_backtrack")}).images
    return text, embeds


# prompt, its chunks worked by hand (L = 14 tokens: the tiny tokenizer's 16 less BOS and EOS)
CASES = {
    "weighted": ("a (red:1.5) [circle], ((large))",
                 [words("a") + words("red", 1.5) + words("circle", 1 / 1.1) + [(",</w>", 1.0)]
                  + words("large", 1.1 * 1.1)]),
    "escaped": ("a \\(red\\) circle \\[x\\]",
                [words("a ( red ) circle [ x ]")]),
    "break": ("a red circle BREAK a blue square",
              [words("a red circle"), words("a blue square")]),
    "long": ("a red circle on the left of a blue square on the right of a green triangle",
             [words("a red circle on the left of a blue square on the right of"), words("a green triangle")]),
    "empty": ("", [[]]),
}


@pytest.mark.parametrize("name", CASES)
def test_encode_prompt_equals_the_hand_built_chunks(pipe, name):
    prompt, chunks = CASES[name]
    pe, ne = pipe.encode_prompt(prompt, prompt_syntax="a1111")
    assert pe.shape == (1, 16 * len(chunks), 32)
    torch.testing.assert_close(pe, hand_encode(pipe, [chunks]), rtol=0, atol=1e-6)
    # the negative prompt is the empty one, padded with empty chunks to the prompt's length
    torch.testing.assert_close(ne, hand_encode(pipe, [[[]] * len(chunks)]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", CASES)
def test_an_a1111_call_equals_the_call_with_its_prompt_embeds(pipe, name):
    text, embeds = _same_images(pipe, CASES[name][0], "blurry dark", guidance_scale=5.0)
    assert torch.equal(text, embeds)


@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
def test_img2img_and_inpaint_take_a1111_prompts_and_their_embeds(pipe, folders, kind):
    from sdkit import Img2ImgPipeline

    p = Img2ImgPipeline.from_pipe(pipe) if kind == "img2img" else _load(InpaintPipeline, folders["inpaint"])
    images = dict(image=sample_image(), **({"mask_image": sample_mask()} if kind == "inpaint" else {}))
    prompt = "a (red:1.2) circle BREAK [on the left:on the right:0.5]"
    kwargs = dict(num_inference_steps=4, strength=0.75, output_type="pt", **images)
    text = p(prompt, prompt_syntax="a1111", generator=gen(), **kwargs).images
    pe, ne = p.encode_prompt(prompt, prompt_syntax="a1111", num_inference_steps=4)
    assert torch.equal(text, p(prompt_embeds=pe, negative_prompt_embeds=ne, generator=gen(), **kwargs).images)
    with pytest.warns(UserWarning, match="Prompt truncated"):  # the plain reading: one window of 16 tokens
        assert (text - p(prompt, generator=gen(), **kwargs).images).abs().max() > 1e-3


def test_clip_skip_takes_an_earlier_layer_through_the_final_norm(pipe):
    pe, ne = pipe.encode_prompt("a (red:1.2) circle", "blurry", prompt_syntax="a1111", clip_stop_at_last_layers=2)
    chunk = words("a") + words("red", 1.2) + words("circle")
    torch.testing.assert_close(pe, hand_encode(pipe, [[chunk]], layer=2), rtol=0, atol=1e-6)
    torch.testing.assert_close(ne, hand_encode(pipe, [[words("blurry")]], layer=2), rtol=0, atol=1e-6)
    assert not torch.allclose(pe, pipe.encode_prompt("a (red:1.2) circle", prompt_syntax="a1111")[0], atol=1e-3)
    text, embeds = _same_images(pipe, "a (red:1.2) circle", "blurry", clip_stop_at_last_layers=2)
    assert torch.equal(text, embeds)


def test_the_negative_prompt_is_padded_with_empty_chunks(pipe):
    pe, ne = pipe.encode_prompt("a red circle BREAK a blue square BREAK green", "blurry", prompt_syntax="a1111")
    assert pe.shape == ne.shape == (1, 48, 32)
    torch.testing.assert_close(ne, hand_encode(pipe, [[words("blurry"), [], []]]), rtol=0, atol=1e-6)
    pe, ne = pipe.encode_prompt("red", "a red circle BREAK blurry", prompt_syntax="a1111")
    torch.testing.assert_close(pe, hand_encode(pipe, [[words("red"), []]]), rtol=0, atol=1e-6)


# 75-token chunks of a 77-position encoder: the comma back-off moves what follows a comma among
# the last 20 tokens of a full chunk to the next one
LONG = {
    "comma near the end": (" ".join(["red"] * 70) + ", " + " ".join(["blue"] * 10), 20,
                           [words(" ".join(["red"] * 70)) + [(",</w>", 1.0)], words(" ".join(["blue"] * 10))]),
    "back-off off": (" ".join(["red"] * 70) + ", " + " ".join(["blue"] * 10), 0,
                     [words(" ".join(["red"] * 70)) + [(",</w>", 1.0)] + words(" ".join(["blue"] * 4)),
                      words(" ".join(["blue"] * 6))]),
    "comma too far back": (" ".join(["red"] * 50) + ", " + " ".join(["blue"] * 30), 20,
                           [words(" ".join(["red"] * 50)) + [(",</w>", 1.0)] + words(" ".join(["blue"] * 24)),
                            words(" ".join(["blue"] * 6))]),
}


@pytest.mark.parametrize("name", LONG)
def test_prompts_over_75_tokens(pipe77, name):
    prompt, backtrack, chunks = LONG[name]
    pe, _ = pipe77.encode_prompt(prompt, prompt_syntax="a1111", comma_padding_backtrack=backtrack)
    assert pe.shape == (1, 154, 32)
    torch.testing.assert_close(pe, hand_encode(pipe77, [chunks]), rtol=0, atol=1e-6)
    text, embeds = _same_images(pipe77, prompt, None, comma_padding_backtrack=backtrack)
    assert torch.equal(text, embeds)


def test_a_schedule_s_texts_share_the_emphasis_rescaling(pipe):
    pe, _ = pipe.encode_prompt("[a (red:1.4) circle:a blue square:0.5]", prompt_syntax="a1111", num_inference_steps=10)
    assert isinstance(pe, ScheduledPromptEmbeds) and pe.steps == 10
    (weight, schedule), = pe.prompts[0]
    assert weight == 1.0 and schedule.ends == (5, 10)
    # A1111 encodes the texts of one schedule as one batch: the mean is taken over both
    both = hand_encode(pipe, [[words("a") + words("red", 1.4) + words("circle")], [words("a blue square")]])
    torch.testing.assert_close(schedule.embeds, both, rtol=0, atol=1e-6)


def test_emphasis_rescaling_keeps_features_whose_mean_is_exactly_zero(pipe, monkeypatch):
    """A1111's z * (mean / weighted mean) is 0 / 0 when the features' mean sums to exactly 0 (a final
    layer norm without bias: random test models hit it on some CPUs, and every image came out NaN)."""
    import sdkit.text_chunks as text_chunks

    z = torch.tensor([[[1.0, -1.0], [2.0, -2.0], [0.5, -0.5]]])  # mean exactly 0, weighted too
    monkeypatch.setattr(text_chunks, "hidden_states", lambda *args, **kwargs: z.clone())
    chunk = text_chunks.Chunk(tokens=(0, 1, 2), weights=(1.0, 1.1, 1.0), fixes=())
    out = text_chunks.encode_chunks(pipe.text_encoder, pipe.tokenizer, [chunk])
    assert torch.equal(out, z * torch.tensor([1.0, 1.1, 1.0])[None, :, None])
    shifted = z + 1.0  # a nonzero mean: rescaled to the unweighted mean, as A1111 does
    monkeypatch.setattr(text_chunks, "hidden_states", lambda *args, **kwargs: shifted.clone())
    out = text_chunks.encode_chunks(pipe.text_encoder, pipe.tokenizer, [chunk])
    weighted = shifted * torch.tensor([1.0, 1.1, 1.0])[None, :, None]
    assert torch.equal(out, weighted * (shifted.mean() / weighted.mean()))


def test_sd2_open_clip_pads_after_the_first_eos_and_ignores_clip_skip():
    tok = build_clip_tokenizer(WORDS, tempfile.mkdtemp(prefix="sdkit-tok-"), model_max_length=16)
    tok.pad_token = "!"  # SD 2's tokenizer pads with "!" (id 0 in its vocabulary)
    pad = tok.pad_token_id
    assert pad != tok.eos_token_id
    torch.manual_seed(0)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                                      vocab_size=len(tok), max_position_embeddings=16, hidden_act="gelu"))
    te = perturb(te, scale=0.5)
    ids = [tok.bos_token_id] + tok.convert_tokens_to_ids(["a</w>", "red</w>", "circle</w>"]) + [tok.eos_token_id]
    with torch.no_grad():
        expected = te(torch.tensor([ids + [pad] * (16 - len(ids))])).last_hidden_state
        torch.testing.assert_close(encode_texts(te, tok, ["a red circle"]), expected, rtol=0, atol=1e-6)
    from sdkit.pipelines.prompting import encode_prompt

    with pytest.warns(UserWarning, match="no effect on this SD 2"), torch.no_grad():
        pe, _ = encode_prompt(te, tok, "a red circle", prompt_syntax="a1111", clip_stop_at_last_layers=2)
    torch.testing.assert_close(pe, expected, rtol=0, atol=1e-6)


# -- per-step prompts on the bundled model -----------------------------------------------------

def test_model_call_i_uses_the_schedule_entry_in_force_at_step_i(pipe):
    from sdkit.pipelines.prompting import _Request, conditioning

    request = _Request(["[a red circle:a blue square:0.3]"], None, prompt_syntax="a1111", steps=10)
    steps = conditioning(pipe.text_encoder, pipe.tokenizer, request, 1, torch.device("cpu"), torch.float32)
    red, blue = (pipe.encode_prompt(t, prompt_syntax="a1111")[0] for t in ("a red circle", "a blue square"))
    # int(0.3 * 10) = 3: calls 0-3 (img2img too: its first call is index 0) then the rest; calls
    # past the schedule (PNDM's warm-up makes more calls than steps) keep its last entry
    for index, expected in [(0, red), (3, red), (4, blue), (9, blue), (12, blue)]:
        torch.testing.assert_close(steps.at(index).cond, expected, rtol=0, atol=1e-6)


def manual_run(pipe, contexts, steps, scale=3.0, rescale=0.7, seed=0):
    """A denoising loop written out: model call i is conditioned on contexts[i] (each (cond, uncond))."""
    scheduler = pipe.scheduler
    state = scheduler.set_timesteps(steps)
    f = pipe.vae_scale_factor
    x = randn((1, 4, 64 // f, 64 // f), gen(seed), torch.device("cpu"), torch.float32) * state.init_noise_sigma
    with torch.no_grad():
        for i, t in enumerate(state.timesteps):
            cond, uncond = contexts[i]
            x_in = scheduler.scale_model_input(x, t, state)
            eps = pipe.unet(torch.cat([x_in, x_in]), t, torch.cat([uncond, cond]))
            out = scheduler.step(classifier_free_guidance(eps, scale, rescale), t, x, state, generator=gen(seed))
            x, state = out.prev_sample, out.state
        return (pipe.vae.decode(x / pipe.vae.config.scaling_factor) * 0.5 + 0.5).clamp(0, 1)


def _texts(pipe, *texts):
    return {t: pipe.encode_prompt(t, prompt_syntax="a1111") for t in texts}


def test_prompt_editing_switches_at_a1111_s_step(bundled):
    steps = 10
    # A1111: [from:to:0.5] over 10 steps holds "from" up to step int(0.5 * 10) = 5, and its step
    # counter starts at 0 with the first model call: calls 0-5 see "from", calls 6-9 "to"
    e = _texts(bundled, "a red circle", "a blue square")
    contexts = [e["a red circle"] if i <= 5 else e["a blue square"] for i in range(steps)]
    expected = manual_run(bundled, contexts, steps)
    got = bundled("[a red circle:a blue square:0.5]", prompt_syntax="a1111", num_inference_steps=steps,
                  guidance_scale=3.0, guidance_rescale=0.7, guidance_end=1.0, generator=gen(), output_type="pt").images
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    for other in (6, 4):  # a switch one call later or earlier gives another image
        moved = [e["a red circle"] if i <= other else e["a blue square"] for i in range(steps)]
        assert (manual_run(bundled, moved, steps) - got).abs().max() > 1e-3


def test_alternation_changes_the_prompt_every_step(bundled):
    steps = 6
    # A1111's schedule for [red|blue] is red at steps 1, 3, 5 and blue at 2, 4, 6; call i looks up
    # step max(i, 1): calls 0, 1 red, 2 blue, 3 red, 4 blue, 5 red
    e = _texts(bundled, "a red circle", "a blue circle")
    by_hand = ["red", "red", "blue", "red", "blue", "red"]
    expected = manual_run(bundled, [e[f"a {c} circle"] for c in by_hand], steps)
    got = bundled("a [red|blue] circle", prompt_syntax="a1111", num_inference_steps=steps, guidance_scale=3.0,
                  guidance_rescale=0.7, guidance_end=1.0, generator=gen(), output_type="pt").images
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (manual_run(bundled, [e["a red circle"]] * steps, steps) - got).abs().max() > 1e-3
    pe, ne = bundled.encode_prompt("a [red|blue] circle", prompt_syntax="a1111", num_inference_steps=steps)
    again = bundled(prompt_embeds=pe, negative_prompt_embeds=ne, num_inference_steps=steps, guidance_scale=3.0,
                    guidance_rescale=0.7, guidance_end=1.0, generator=gen(), output_type="pt").images
    assert torch.equal(got, again)


# -- AND: composable diffusion -----------------------------------------------------------------

def test_and_is_composable_diffusion(pipe):
    scale, steps = 5.0, 3
    (c1, u), (c2, _) = pipe.encode_prompt("a red circle", prompt_syntax="a1111"), \
        pipe.encode_prompt(" a blue square", prompt_syntax="a1111")
    scheduler = pipe.scheduler
    state = scheduler.set_timesteps(steps)
    x = randn((1, 4, 8, 8), gen(), torch.device("cpu"), torch.float32) * state.init_noise_sigma
    with torch.no_grad():
        for t in state.timesteps:
            x_in = scheduler.scale_model_input(x, t, state)
            e_u, e_1, e_2 = pipe.unet(torch.cat([x_in] * 3), t, torch.cat([u, c1, c2])).chunk(3)
            eps = e_u + scale * (1.0 * (e_1 - e_u) + 0.5 * (e_2 - e_u))  # Liu et al. 2022, eq. 10
            out = scheduler.step(eps, t, x, state)
            x, state = out.prev_sample, out.state
    got = pipe("a red circle AND a blue square:0.5", prompt_syntax="a1111", num_inference_steps=steps,
               guidance_scale=scale, generator=gen(), output_type="latent").images
    torch.testing.assert_close(got, x, rtol=0, atol=1e-5)
    plain = pipe("a red circle", prompt_syntax="a1111", num_inference_steps=steps, guidance_scale=scale,
                 generator=gen(), output_type="latent").images
    assert (plain - got).abs().max() > 1e-3


def test_and_in_a_batch_and_with_inpainting_channels(pipe, folders):
    # two halves of one prompt add up to the prompt; prompts with fewer parts get zero-weight ones
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=4.0, output_type="latent")
    batch = pipe(["a red circle:0.5 AND a red circle:0.5", "a blue square"], prompt_syntax="a1111",
                 generator=[gen(1), gen(2)], **kwargs).images
    for k, (prompt, seed) in enumerate([("a red circle", 1), ("a blue square", 2)]):
        alone = pipe(prompt, prompt_syntax="a1111", generator=gen(seed), **kwargs).images
        torch.testing.assert_close(batch[k:k + 1], alone, rtol=0, atol=1e-5)
    inpaint = _load(InpaintPipeline, folders["inpaint"])
    images = dict(image=sample_image(), mask_image=sample_mask())
    halves = inpaint("a red circle:0.5 AND a red circle:0.5", prompt_syntax="a1111", generator=gen(), **images,
                     **kwargs).images
    whole = inpaint("a red circle", prompt_syntax="a1111", generator=gen(), **images, **kwargs).images
    torch.testing.assert_close(halves, whole, rtol=0, atol=1e-5)


def test_and_needs_guidance(pipe):
    with pytest.raises(ValueError, match="needs guidance_scale > 1"):
        pipe("a AND b", prompt_syntax="a1111", guidance_scale=1.0, num_inference_steps=1)


# -- the reference's paths: prompt_embeds= and clip_skip ------------------------------------------

@pytest.fixture(scope="module")
def reference(folders):
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folders["sd1"], safety_checker=None,
                                                            requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref


def _np(out):
    return out.images


@pytest.mark.parametrize("negative", ["embeds", "text", "none"])
def test_prompt_embeds_match_the_reference(pipe, reference, negative):
    g = torch.Generator().manual_seed(3)
    pe, ne = torch.randn(2, 16, 32, generator=g), torch.randn(2, 16, 32, generator=g)
    kwargs = dict(prompt_embeds=pe, num_inference_steps=3, guidance_scale=6.0, num_images_per_prompt=2,
                  output_type="np")
    # (a list: the reference mishandles one negative string for a batch of prompt_embeds)
    kwargs.update({"embeds": dict(negative_prompt_embeds=ne), "text": dict(negative_prompt=["blurry dark", "red"]),
                   "none": {}}[negative])
    ours = pipe(generator=[gen(i) for i in range(4)], **kwargs).images
    theirs = reference(generator=[gen(i) for i in range(4)], **kwargs).images
    assert abs(ours - theirs).max() <= 2e-3


def test_clip_skip_matches_the_reference(pipe, reference):
    # the reference reaches the final norm as text_encoder.text_model (transformers 4's layout)
    object.__setattr__(reference.text_encoder, "text_model", reference.text_encoder)
    kwargs = dict(negative_prompt="blurry", num_inference_steps=3, output_type="np")
    ours = pipe("a red circle", clip_skip=1, generator=gen(), **kwargs).images
    theirs = reference("a red circle", clip_skip=1, generator=gen(), **kwargs).images
    assert abs(ours - theirs).max() <= 2e-3
    assert abs(ours - pipe("a red circle", generator=gen(), **kwargs).images).max() > 1e-3
    pe, ne = pipe.encode_prompt("a red circle", "blurry", clip_skip=1)
    with torch.no_grad():
        ref_pe, ref_ne = reference.encode_prompt("a red circle", "cpu", 1, True, "blurry", clip_skip=1)
    torch.testing.assert_close(pe, ref_pe, rtol=0, atol=1e-6)
    torch.testing.assert_close(ne, ref_ne, rtol=0, atol=1e-6)  # the reference's negative ignores clip_skip


def test_plain_encode_prompt_matches_the_reference(pipe, reference):
    pe, ne = pipe.encode_prompt(["a red circle", "a blue square"])
    with torch.no_grad():
        ref_pe, ref_ne = reference.encode_prompt(["a red circle", "a blue square"], "cpu", 1, True)
    torch.testing.assert_close(pe, ref_pe, rtol=0, atol=1e-6)
    torch.testing.assert_close(ne, ref_ne, rtol=0, atol=1e-6)


# -- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt="a <lora:style:0.8> cat", prompt_syntax="a1111"),
     r"<lora:style:0.8>: no LoRA named 'style': loaded adapters: none; no lora_dirs given"),
    (dict(prompt="a <lyco:grain:0.5:0.2>", prompt_syntax="a1111"), r"<lyco:grain:0.5:0.2>: no LoRA named 'grain'"),
    (dict(prompt="a <hypernet:h:1>", prompt_syntax="a1111"), r"no 'hypernet' extra networks"),
    (dict(prompt="a", prompt_syntax="a1111", clip_skip=1), r"clip_stop_at_last_layers=2"),
    (dict(prompt="a", clip_stop_at_last_layers=2), r"with 'plain' pass clip_skip=1"),
    (dict(prompt="a", prompt_syntax="a1111", clip_stop_at_last_layers=3), r"this text encoder has 2 layers"),
    (dict(prompt="a", clip_skip=2), r"this text encoder has 2 layers"),
    (dict(prompt="a", comma_padding_backtrack=5), r"only applies to prompt_syntax='a1111'"),
    (dict(prompt="a", prompt_syntax="A1111"), r"prompt_syntax='A1111' is not one of"),
    (dict(prompt="a", prompt_embeds=torch.zeros(1, 16, 32)), r"prompt or prompt_embeds, not both"),
    (dict(prompt_embeds=torch.zeros(1, 16, 32), negative_prompt_embeds=torch.zeros(1, 32, 32)),
     r"must have the same shape"),
    (dict(prompt_embeds=torch.zeros(16, 32)), r"\(batch, tokens, dim\) tensor"),
    (dict(prompt_embeds=torch.zeros(1, 32, 32)), r"pass both with the same shape"),
    (dict(prompt_embeds=torch.zeros(1, 16, 32), clip_skip=1), r"come as embeddings"),
])
def test_bad_prompt_options_are_clear_errors(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe(num_inference_steps=1, **kwargs)


def test_scheduled_embeddings_keep_their_step_count(pipe):
    with pytest.raises(ValueError, match=r"depend on the step count: pass num_inference_steps"):
        pipe.encode_prompt("[a:b:0.5]", prompt_syntax="a1111")
    pe, ne = pipe.encode_prompt("[a:b:0.5]", prompt_syntax="a1111", num_inference_steps=4)
    with pytest.raises(ValueError, match=r"scheduled for 4 steps but the call runs num_inference_steps=3"):
        pipe(prompt_embeds=pe, negative_prompt_embeds=ne, num_inference_steps=3)


# -- the CLI reads A1111 syntax by default ------------------------------------------------------

def test_cli_defaults_to_a1111_syntax_and_writes_a1111_s_fields(folders, tmp_path, capsys):
    from PIL import Image

    from sdkit.cli import main, parse_parameters

    def run(*argv):
        code = main(["generate", *argv, "--model", folders["sd1"], "--steps", "2", "--seed", "1", "-q",
                     "--enlarge", "1"])
        return code, capsys.readouterr().err

    prompt = "a (red:1.3) circle BREAK [a:b:0.5]"
    assert run(prompt, "-o", str(tmp_path / "a.png"))[0] == 0
    with pytest.warns(UserWarning, match="Prompt truncated"):  # plain: one window of 16 tokens
        assert run(prompt, "-o", str(tmp_path / "b.png"), "--prompt-syntax", "plain")[0] == 0
    text = Image.open(tmp_path / "a.png").info["parameters"]
    assert text == Image.open(tmp_path / "b.png").info["parameters"]  # no field names the syntax
    assert "Clip skip" not in parse_parameters(text)
    pipe = _load(StableDiffusionPipeline, folders["sd1"])
    a1111 = pipe(prompt, prompt_syntax="a1111", num_inference_steps=2, guidance_scale=7.5, generator=gen(1)).images[0]
    assert list(Image.open(tmp_path / "a.png").convert("RGB").getdata()) == list(a1111.getdata())
    assert run("a red circle", "-o", str(tmp_path / "c.png"), "--clip-skip", "2")[0] == 0
    assert parse_parameters(Image.open(tmp_path / "c.png").info["parameters"])["Clip skip"] == "2"
    code, err = run("a <lora:style:0.5> cat", "-o", str(tmp_path / "d.png"))
    assert code == 2 and err.count("\n") == 1 and "<lora:style:0.5>" in err
    assert not os.path.exists(tmp_path / "d.png")
