"""Random numbers as A1111 draws them: Philox ("NV"), per-image seeds, Brownian-tree noise."""

from .brownian import BrownianNoise, BrownianTree
from .philox import PhiloxGenerator, philox4x32
from .seeds import RNG_SOURCES, SeedNoise, a1111_seeds, check_seed, slerp

__all__ = ["BrownianNoise", "BrownianTree", "PhiloxGenerator", "philox4x32", "RNG_SOURCES", "SeedNoise",
           "a1111_seeds", "check_seed", "slerp"]
