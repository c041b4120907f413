"""A1111's random numbers: Philox ("NV"), per-image seeds, variation seeds, ENSD, Brownian-tree noise."""

import warnings

import numpy as np
import pytest
import torch
from a1111_oracle import ImageRNG, sampling

import sdkit
from sdkit.noise import BrownianNoise, PhiloxGenerator, SeedNoise, a1111_seeds, philox4x32


def words(text):
    return [np.array([int(w, 16)], dtype=np.uint64) for w in text.split()]


@pytest.mark.parametrize("counter, key, output", [
    # Random123's tests/kat_vectors, "philox4x32 10" lines (Salmon et al. 2011; DEShawResearch/random123)
    ("00000000 00000000 00000000 00000000", "00000000 00000000", "6627e8d5 e169c58d bc57ac4c 9b00dbd8"),
    ("ffffffff ffffffff ffffffff ffffffff", "ffffffff ffffffff", "408f276d 41c83b0e a20bc7c6 6d5451fd"),
    ("243f6a88 85a308d3 13198a2e 03707344", "a4093822 299f31d0", "d16cfe09 94fdcceb 5001e420 24126ea1"),
])
def test_philox_known_answer_vectors(counter, key, output):
    out = philox4x32(words(counter), words(key))
    assert " ".join(f"{w[0]:08x}" for w in out) == output


def test_philox_normals_are_a1111s_nv_numbers():
    """Values printed by A1111 1.10's modules/rng_philox.py (Generator(seed).randn((6,)), two draws each), and its
    docstring's seed-0 (3, 4) draw, which is CUDA's torch.randn(3, 4) after torch.manual_seed(0)."""
    a1111 = {
        0: ([-0.924662411, -0.425343961, -2.6438458, 0.145183876, -0.120866507, -0.579725683],
            [0.180825889, -0.552262723, 0.923813403, -0.734970331, 1.37999463, 0.86763072]),
        31337: ([0.601324379, 0.0347847305, 0.0153458705, -1.68544328, -0.0430101678, -0.87787044],
                [-0.603509545, -1.50680315, -0.89391923, 0.49004817, -0.890106261, -0.475942254]),
        4294967301: ([-2.84274745, 1.34049237, 0.272230864, 1.45506287, -0.735296071, -0.502260327],
                     [1.52959394, -0.215323776, 0.0512551256, 1.58821726, -0.946536541, 0.845452845]),
    }
    for seed, draws in a1111.items():
        g = PhiloxGenerator(seed)
        for draw in draws:
            assert np.array_equal(g.randn((6,)), np.array(draw, dtype=np.float32)), seed
    cuda = [[-0.92466259, -0.42534415, -2.6438457, 0.14518388], [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
            [-1.07454231, -0.36314407, -1.67105067, 2.26550497]]
    np.testing.assert_allclose(PhiloxGenerator(0).randn((3, 4)), cuda, rtol=0, atol=1e-6)


@pytest.mark.parametrize("seeds", [[5, 6], [123456]])
def test_brownian_noise_equals_k_diffusions_on_torchsde(seeds):
    """One path per image seed (A1111's create_noise_sampler): the same increments as torchsde's BrownianTree."""
    x = torch.randn(len(seeds), 4, 8, 8)
    sigmas = torch.tensor([14.6146, 9.7, 5.1, 2.2, 1.0, 0.41, 0.0292, 0.0])
    lo, hi = sigmas[sigmas > 0].min(), sigmas.max()
    ref = sampling.BrownianTreeNoiseSampler(x, lo, hi, seed=seeds)

    def randn(seed):
        return torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(int(seed)))

    ours = BrownianNoise(lo, hi, seeds, randn, batched=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchsde's note on the query at sigma_max
        for i in range(len(sigmas) - 2):
            s, s_next = sigmas[i], sigmas[i + 1]
            mid = (s.log().neg() + 0.5 * (s_next.log().neg() - s.log().neg())).neg().exp()
            for a, b in ((s, s_next), (s, mid), (mid, s_next), (s_next, s)):
                assert torch.equal(ours(a, b), ref(a, b))


def test_image_k_draws_from_seed_plus_k_then_ensd():
    """Worked by hand: image k's first draw from Generator(seed + k); later ones from Generator(seed + k + ENSD)."""
    seeds, subseeds = a1111_seeds(100, 3)
    assert seeds == [100, 101, 102] and subseeds is None
    assert a1111_seeds(100, 3, subseed=7, subseed_strength=0.5) == ([100, 100, 100], [7, 8, 9])
    shape = (4, 6, 5)
    noise = SeedNoise([100, 101], ensd=31337)
    first, second, third = (noise.randn((2, *shape)) for _ in range(3))
    for k, seed in enumerate((100, 101)):
        g = torch.Generator().manual_seed(seed)
        assert torch.equal(first[k], torch.randn(shape, generator=g))
        g = torch.Generator().manual_seed(seed + 31337)
        assert torch.equal(second[k], torch.randn(shape, generator=g))
        assert torch.equal(third[k], torch.randn(shape, generator=g))
    plain = SeedNoise([100])
    g = torch.Generator().manual_seed(100)
    assert torch.equal(plain.randn((1, *shape))[0], torch.randn(shape, generator=g))
    assert torch.equal(plain.randn((1, *shape))[0], torch.randn(shape, generator=g))


@pytest.mark.parametrize("subseed_strength, resize", [(0.3, (0, 0)), (0.0, (48, 32)), (0.7, (80, 24)),
                                                      (0.5, (40, 40))])
def test_variation_seed_and_seed_resize_match_a1111s_image_rng(subseed_strength, resize):
    shape = (4, 5, 6)  # a 48 x 40 image
    seeds, subseeds = a1111_seeds(11, 3, subseed=70, subseed_strength=subseed_strength)
    ours = SeedNoise(seeds, subseeds=subseeds, subseed_strength=subseed_strength, seed_resize_from=resize, ensd=9)
    ref = ImageRNG(shape, seeds, subseeds, subseed_strength, seed_resize_from_h=resize[1],
                   seed_resize_from_w=resize[0], ensd=9)
    for _ in range(3):
        assert torch.equal(ours.randn((3, *shape)), ref.next())


def test_nv_source_is_philox_per_image():
    noise = SeedNoise([3, 4], rng="nv", ensd=2)
    first, second = noise.randn((2, 4, 2, 2)), noise.randn((2, 4, 2, 2))
    for k, seed in enumerate((3, 4)):
        assert np.array_equal(first[k].numpy(), PhiloxGenerator(seed).randn((4, 2, 2)))
        assert np.array_equal(second[k].numpy(), PhiloxGenerator(seed + 2).randn((4, 2, 2)))
    gpu_on_cpu, cpu = SeedNoise([3], rng="gpu"), SeedNoise([3])
    assert torch.equal(gpu_on_cpu.randn((1, 4, 2, 2)), cpu.randn((1, 4, 2, 2)))  # a CPU device draws on the CPU


def test_pipeline_seed_options_are_checked():
    pipe = sdkit.StableDiffusionPipeline.from_pretrained(sdkit.TINY_MODEL)
    for kwargs, message in [
        (dict(seed=1, generator=torch.Generator()), "either generator .* or seed"),
        (dict(seed=1, subseed_strength=0.5), "subseed_strength needs a subseed"),
        (dict(seed=1, rng="amd"), "rng='amd' is not a random number source"),
        (dict(subseed=3), "need A1111 seeds: pass seed"),
        (dict(seed=-1), "seed must be a whole number in \\[0, 2\\*\\*64\\)"),
        (dict(seed=1, seed_resize_from_w=-8), "seed_resize_from_w must be a whole number"),
    ]:
        with pytest.raises(ValueError, match=message):
            pipe("a circle", num_inference_steps=1, **kwargs)


def test_a1111_seeds_give_sdkits_generator_noise_on_the_cpu():
    """rng="cpu" without variation: image k's noise is torch.Generator().manual_seed(seed + k)'s, as before."""
    pipe = sdkit.StableDiffusionPipeline.from_pretrained(sdkit.TINY_MODEL)
    pipe.set_progress_bar_config(disable=True)
    call = dict(num_inference_steps=3, num_images_per_prompt=2, output_type="latent")
    by_seed = pipe("a circle", seed=40, **call).images
    by_generators = pipe("a circle", generator=[torch.Generator().manual_seed(40 + k) for k in range(2)], **call).images
    assert torch.equal(by_seed, by_generators)
