"""Brownian-tree noise for the SDE samplers, the same increments as torchsde's ``BrownianTree``.

A Brownian path on [t0, t1] is drawn coarse to fine: the root holds W(t1) - W(t0), and each node
splits at its (rounded) midpoint with the Brownian bridge (Revuz & Yor 1999, ch. I.3; Kidger et al.
2021, "Efficient and accurate gradients for neural SDEs", arXiv 2105.13493, section 4). Every
node's normal draw is seeded from the path's entropy and the node's place in the tree
(``numpy.random.SeedSequence``), so an increment depends only on the entropy and on the two times
asked, never on earlier queries. The tree shape (halfway splits, times rounded to 6 decimals,
entropy pool of 24 words) is torchsde 0.2.6's ``BrownianTree``, which k-diffusion's
``BrownianTreeNoiseSampler`` (and A1111's DPM++ SDE samplers) use.

| code         | meaning                                                   |
| ------------ | --------------------------------------------------------- |
| W            | the path's increment over a node's interval               |
| s, m, e      | a node's start, midpoint and end                          |
| mean, var    | the bridge's mean and variance of the left half's W       |
| key, depth   | the node's place in the tree: its entropy spawn key       |
"""

import math
from collections import OrderedDict

import numpy as np
import torch

POOL_SIZE = 24  # torchsde BrownianTree's entropy pool
DIGITS = 6  # its tolerance 1e-6: times are rounded to 6 decimals
CACHE_SIZE = 64  # node increments kept (recomputed from the root when dropped)


class BrownianTree:
    """One Brownian path on [t0, t1] with fixed ``entropy``; ``tree(ta, tb)`` is W(tb) - W(ta).

    ``randn(seed)`` draws one standard normal tensor of the path's shape for an integer seed (the
    random number source: a CPU or device generator, or Philox).
    """

    def __init__(self, t0, t1, entropy, randn):
        self.t0, self.t1 = float(t0), float(t1)
        if not self.t0 < self.t1:
            raise ValueError(f"a Brownian tree needs t0 < t1, got {self.t0} and {self.t1}.")
        self.entropy, self.randn = int(entropy), randn
        seed_W = np.random.SeedSequence(entropy=self.entropy, pool_size=POOL_SIZE).generate_state(3)[0]
        self.root = (round(self.t0, DIGITS), round(self.t1, DIGITS), 0, 0)  # (s, e, key, depth)
        self.cache = OrderedDict({self.root: randn(seed_W) * math.sqrt(self.t1 - self.t0)})

    def __call__(self, ta, tb):
        """W(tb) - W(ta) for t0 <= ta <= tb <= t1 (outside times are clamped, as torchsde does)."""
        s, e = self.root[:2]
        ta, tb = min(max(float(ta), s), e), min(max(float(tb), s), e)
        if ta > tb:
            raise ValueError(f"Brownian increments need ta <= tb, got {ta} and {tb}.")
        if ta == tb:
            return torch.zeros_like(self.cache[self.root])
        nodes = []
        self._cover(self.root, round(ta, DIGITS), round(tb, DIGITS), nodes)
        W = self._W(nodes[0])
        for node in nodes[1:]:
            W = W + self._W(node)
        return W

    @staticmethod
    def _children(node):
        """The two halves of a node, split at its midpoint rounded to the tree's resolution."""
        s, e, key, depth = node
        m = round(0.5 * (e + s), DIGITS)
        return (s, m, 2 * key, depth + 1), (m, e, 2 * key + 1, depth + 1)

    def _cover(self, node, ta, tb, out):
        """Append, left to right, the largest tree nodes whose union is [ta, tb]."""
        s, e = node[:2]
        if ta == s and tb == e:
            out.append(node)
            return
        left, right = self._children(node)
        m = left[1]
        if m in (s, e):
            raise ValueError(f"Brownian query [{ta}, {tb}] is finer than the tree's resolution 1e-{DIGITS}.")
        if tb <= m:
            self._cover(left, ta, tb, out)
        elif ta >= m:
            self._cover(right, ta, tb, out)
        else:
            self._cover(left, ta, m, out)
            self._cover(right, m, tb, out)

    def _W(self, node):
        """A node's increment: from its parent's by the Brownian bridge, the parent's seeds by its place."""
        if node in self.cache:
            self.cache.move_to_end(node)
            return self.cache[node]
        s_child, e_child, key, depth = node
        parent_key = key // 2
        parent = self._parent(node)
        W_parent = self._W(parent)
        s, e = parent[:2]
        m = self._children(parent)[0][1]
        seed = np.random.SeedSequence(entropy=self.entropy, spawn_key=(parent_key, depth - 1),
                                      pool_size=POOL_SIZE).generate_state(4)[0]
        h_reciprocal = 1 / (e - s)
        left_diff, right_diff = m - s, e - m
        mean = left_diff * W_parent * h_reciprocal
        var = left_diff * right_diff * h_reciprocal
        W_left = mean + math.sqrt(var) * self.randn(seed)
        W = W_left if key % 2 == 0 else W_parent - W_left
        self.cache[node] = W
        if len(self.cache) > CACHE_SIZE:
            oldest = next(k for k in self.cache if k != self.root)
            del self.cache[oldest]
        return W

    def _parent(self, node):
        """The parent of a node, found by walking down from the root along the node's key bits."""
        _, _, key, depth = node
        parent = self.root
        for level in range(depth - 2, -1, -1):
            parent = self._children(parent)[(key >> (level + 1)) & 1]
        return parent


class BrownianNoise:
    """Unit-variance noise between two noise levels from Brownian paths (k-diffusion's BrownianTreeNoiseSampler).

    ``noise(sigma, sigma_next)`` is (W(sigma_next) - W(sigma)) / sqrt|sigma_next - sigma|: with one
    path per image (``batched``) each image's noise depends on its own seed only.
    """

    def __init__(self, sigma_min, sigma_max, entropies, randn, batched):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.trees = [BrownianTree(sigma_min, sigma_max, entropy, randn) for entropy in entropies]
        self.batched = batched

    def __call__(self, sigma, sigma_next):
        """Noise for the step from ``sigma`` to ``sigma_next`` (0-d tensors), shaped like the sample."""
        a, b = sorted((sigma, sigma_next))
        sign = 1 if sigma < sigma_next else -1
        W = torch.stack([tree(a, b) for tree in self.trees]) * sign  # (B, ...) or (1, B, ...)
        W = W if self.batched else W[0]
        return W / (sigma_next - sigma).abs().sqrt()
