"""Philox 4x32-10 and the normal draws CUDA's ``torch.randn`` makes from it, on any device.

Philox is the counter-based generator of Salmon et al. 2011 ("Parallel random numbers: as easy as
1, 2, 3", SC'11). CUDA's ``torch.randn`` keys it with the seed, counts draws in the first counter
word and elements in the third, and turns the first two output words into one normal number by
Box-Muller; A1111's "NV" random number source (``modules/rng_philox.py``) does the same on the CPU
with these constants and this float64 arithmetic, so its numbers (and sdkit's) are those of an
NVIDIA card for the same seed.

| code      | paper                                              |
| --------- | -------------------------------------------------- |
| counter   | the 4 x 32-bit counter block (one column per draw)  |
| key       | the 2 x 32-bit key (the seed's low and high words) |
| M0, M1    | the round multipliers                              |
| W0, W1    | the Weyl key increments (golden ratio, sqrt 3 - 1) |
"""

import numpy as np

M0, M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
W0, W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
LOW = np.uint64(0xFFFFFFFF)
# Box-Muller scale factors as float32, as the reference implementation rounds them
TWO_POW32_INV = float(np.float32(2.3283064e-10))
TWO_POW32_INV_2PI = float(np.float32(2.3283064e-10 * 6.2831855))


def philox4x32(counter, key, rounds=10):
    """Philox4x32-R (Salmon et al. 2011, section 4.2): (4, N) counter, (2, N) key words -> (4, N) uint32."""
    c = [np.asarray(w, dtype=np.uint64) for w in counter]
    k0, k1 = (np.asarray(w, dtype=np.uint64) for w in key)
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + W0) & LOW, (k1 + W1) & LOW
        p0, p1 = c[0] * M0, c[2] * M1  # exact 64-bit products of 32-bit words
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & LOW, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & LOW]
    return np.stack(c).astype(np.uint32)


def box_muller(x, y):
    """The first normal of the Box-Muller pair from two uint32 words (Box & Muller 1958), as float32."""
    u = x.astype(np.float64) * TWO_POW32_INV + TWO_POW32_INV / 2
    v = y.astype(np.float64) * TWO_POW32_INV_2PI + TWO_POW32_INV_2PI / 2
    return (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(np.float32)


class PhiloxGenerator:
    """Normal numbers as CUDA's ``torch.randn`` draws them for a seed; each ``randn`` call is one draw."""

    def __init__(self, seed):
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**64:
            raise ValueError(f"a Philox seed must be an integer in [0, 2**64), got {seed!r}.")
        self.seed = int(seed)
        self.offset = 0  # draws made so far: the first counter word

    def randn(self, shape):
        """A float32 array of standard normals of ``shape`` (the generator's next draw)."""
        n = int(np.prod(shape, dtype=np.int64))
        if n >= 2**32:
            raise ValueError(f"one Philox draw holds at most 2**32 numbers, asked for {n}.")
        counter = np.zeros((4, n), dtype=np.uint64)
        counter[0] = self.offset % 2**32
        counter[2] = np.arange(n, dtype=np.uint64)
        key = (np.full(n, self.seed & 0xFFFFFFFF, dtype=np.uint64), np.full(n, self.seed >> 32, dtype=np.uint64))
        self.offset += 1
        words = philox4x32(counter, key)
        return box_muller(words[0], words[1]).reshape(shape)
