"""A1111's seeds: the noise of a batch drawn image by image from seeds, as A1111 1.10 draws it.

A1111 (``modules/rng.py``, ``modules/processing.py``) gives image k of a batch its own generator
seeded with ``seed + k``. The first draw of each is the image's initial noise; a variation seed
(``subseed``) blends in a second noise by slerp, and "seed resize from" draws the noise at another
size and pastes it centred. Every later draw (the ancestral and churn noise of the samplers) comes
from the same generators, reseeded with ``seed + k + ENSD`` when an eta noise seed delta is set. The
SDE samplers draw Brownian-tree noise seeded with each image's seed. The random number source is
the CPU generator ("cpu"), the device's generator ("gpu"; the CPU one on a CPU or MPS device), or
Philox ("nv"), which gives an NVIDIA card's ``torch.randn`` numbers on any device.

One :class:`SeedNoise` serves one pipeline call (it holds that call's generators), so concurrent
calls never share random state. Schedulers draw from it through their ``generator`` argument
(``schedules.randn`` calls its ``randn``).
"""

import torch

from .brownian import BrownianNoise
from .philox import PhiloxGenerator

RNG_SOURCES = ("cpu", "gpu", "nv")


def slerp(t, low, high):
    """A1111's variation-seed blend of two (C, H, W) noises: spherical interpolation along dim 1 (Shoemake 1985).

    Near-parallel noises fall back to ``low * t + high * (1 - t)``, weights the other way round
    from the spherical branch, as in A1111.
    """
    low_unit = low / torch.norm(low, dim=1, keepdim=True)
    high_unit = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_unit * high_unit).sum(1)  # (C, W)
    if dot.mean() > 0.9995:
        return low * t + high * (1 - t)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - t) * omega) / so).unsqueeze(1) * low + (torch.sin(t * omega) / so).unsqueeze(1) * high


class _Source:
    """One seeded stream of float32 normal draws from a random number source."""

    def __init__(self, rng, seed, device):
        self.device = device
        if rng == "nv":
            self.philox = PhiloxGenerator(seed)
        else:
            self.philox = None
            self.generator = torch.Generator(device).manual_seed(int(seed))

    def randn(self, shape):
        if self.philox is not None:
            return torch.from_numpy(self.philox.randn(tuple(shape)))
        return torch.randn(tuple(shape), generator=self.generator, device=self.device)


def check_seed(name, value):
    """Raise unless ``value`` is a whole number in [0, 2**64) (what torch generators and Philox take)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64:
        raise ValueError(f"{name} must be a whole number in [0, 2**64), got {value!r}.")


class SeedNoise:
    """The random numbers of one A1111-seeded call: per-image generators, variation seeds, ENSD, Brownian noise.

    seeds: one per image (A1111: ``seed + k``, or the same seed for all when a variation seed is
    blended in); subseeds: one per image, used when ``subseed_strength`` > 0; seed_resize_from:
    (width, height) in pixels the noise was first drawn at (0, 0: off); factor: pixels per latent
    cell; ensd: eta noise seed delta; rng: "cpu", "gpu" or "nv"; device: where noise is used.
    """

    def __init__(self, seeds, rng="cpu", device="cpu", subseeds=None, subseed_strength=0.0,
                 seed_resize_from=(0, 0), factor=8, ensd=0):
        if rng not in RNG_SOURCES:
            raise ValueError(f"rng={rng!r} is not a random number source; use one of {', '.join(RNG_SOURCES)}.")
        self.seeds, self.rng, self.device = list(seeds), rng, torch.device(device)
        self.subseeds = list(subseeds) if subseeds is not None else None
        self.subseed_strength, self.seed_resize_from, self.factor = subseed_strength, seed_resize_from, factor
        self.ensd = ensd
        self.sources = [self._source(seed) for seed in self.seeds]
        self.first_done = False

    @property
    def draw_device(self):
        """Where the generators draw: the CPU unless the source is "gpu" on a device that has its own."""
        if self.rng == "gpu" and self.device.type not in ("cpu", "mps"):
            return self.device
        return torch.device("cpu")

    def _source(self, seed):
        return _Source(self.rng, seed, self.draw_device)

    def randn(self, shape, device=None, dtype=None):
        """(B, C, H, W) noise: the initial noise on the first call, each image's next draw after that."""
        if shape[0] != len(self.seeds):
            raise ValueError(f"this call's seeds make {len(self.seeds)} images, but noise for {shape[0]} was asked.")
        per_image = tuple(shape[1:])
        if self.first_done:
            noise = torch.stack([source.randn(per_image) for source in self.sources])
        else:
            noise = self._first(per_image)
        return noise.to(device=device if device is not None else self.device, dtype=dtype)

    def _first(self, shape):
        """The initial noise of each image, with variation seed and seed resize (A1111's ImageRNG.first)."""
        w, h = self.seed_resize_from
        noise_shape = (shape[0], int(h) // self.factor, int(w) // self.factor) if w > 0 and h > 0 else shape
        resized = noise_shape != shape
        noises = []
        for k, (seed, source) in enumerate(zip(self.seeds, self.sources)):
            subnoise = None
            if self.subseeds is not None and self.subseed_strength != 0:
                subseed = self.subseeds[k] if k < len(self.subseeds) else 0
                subnoise = self._source(subseed).randn(noise_shape)
            noise = self._source(seed).randn(noise_shape) if resized else source.randn(shape)
            if subnoise is not None:
                noise = slerp(self.subseed_strength, noise, subnoise)
            if resized:
                noise = _paste_centred(noise, source.randn(shape))
            noises.append(noise)
        self.first_done = True
        if self.ensd:
            self.sources = [self._source(seed + self.ensd) for seed in self.seeds]
        return torch.stack(noises)

    def brownian(self, sigma_min, sigma_max, like):
        """Brownian-tree noise over [sigma_min, sigma_max], one path per image seeded with its seed."""
        shape = tuple(like.shape[1:])

        def randn(seed):
            return self._source(int(seed)).randn(shape).to(device=like.device, dtype=like.dtype)

        return BrownianNoise(sigma_min, sigma_max, self.seeds, randn, batched=True)

    @property
    def posterior_generators(self):
        """CPU generators for sampling VAE posteriors, one per image, seeded with its seed.

        A1111 samples the img2img posterior from torch's global generator, whose state no infotext
        records; sdkit seeds it from the image's seed instead, so that a run repeats.
        """
        return [torch.Generator().manual_seed(int(seed)) for seed in self.seeds]


def _paste_centred(noise, target):
    """Paste a (C, h, w) noise into the centre of a (C, H, W) one, cropping where it is larger (A1111)."""
    dx, dy = (target.shape[2] - noise.shape[2]) // 2, (target.shape[1] - noise.shape[1]) // 2
    w = noise.shape[2] if dx >= 0 else noise.shape[2] + 2 * dx
    h = noise.shape[1] if dy >= 0 else noise.shape[1] + 2 * dy
    tx, ty = max(dx, 0), max(dy, 0)
    sx, sy = max(-dx, 0), max(-dy, 0)
    target[:, ty:ty + h, tx:tx + w] = noise[:, sy:sy + h, sx:sx + w]
    return target


def a1111_seeds(seed, count, subseed=None, subseed_strength=0.0):
    """(seeds, subseeds) of a batch as A1111 numbers them: seed + k, or seed for all with a variation seed."""
    varied = subseed_strength != 0
    seeds = [seed + (0 if varied else k) for k in range(count)]
    subseeds = [subseed + k for k in range(count)] if subseed is not None else None
    return seeds, subseeds
