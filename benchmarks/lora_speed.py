"""What per-call LoRA costs: an SD 1.5-shaped UNet step with a rank-16 LoRA on every attention and
feed-forward layer, applied per call (unfused), fused into the weights, and not at all.

    python benchmarks/lora_speed.py [--size 32] [--batch 2] [--repeats 3] [--threads N]

Rows: no LoRA (plain torch layers); LoRA per call (each of the 160 layers computes with W + m s up @ down
rebuilt for the step, or adds x @ down @ up where that is cheaper); LoRA fused (W + s up @ down once;
the layers still look for the call's changes and find none, as for a LoRA loaded but not used).
Random weights; a CFG batch of ``--batch`` latents of ``--size`` x ``--size`` (64 is SD 1.5's 512 px);
each timing is the median of ``--repeats`` steps after one warm-up.
"""

import argparse
import contextlib
import statistics
import time

import torch

from sdkit.lora import CHANGEABLE
from sdkit.models import UNet2DConditionModel
from sdkit.per_call import using
from sdkit.pipelines.adapters import AdapterLoaderMixin

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")


class UNetOnly(AdapterLoaderMixin):
    """Just enough of a pipeline for the adapter methods: a UNet and no text encoder."""

    def __init__(self, unet):
        self.unet, self.text_encoder = unet, None


def kohya_lora(unet, rank, seed=0):
    """A kohya LoRA of random factors on every attention and feed-forward layer (alpha = rank / 2)."""
    g, sd = torch.Generator().manual_seed(seed), {}
    for path, module in unet.named_modules():
        if path.endswith(TARGETS):
            name = "lora_unet_" + path.replace(".", "_")
            O, I = module.weight.shape
            sd[f"{name}.lora_down.weight"] = torch.randn(rank, I, generator=g) / I ** 0.5
            sd[f"{name}.lora_up.weight"] = torch.randn(O, rank, generator=g) * 0.01
            sd[f"{name}.alpha"] = torch.tensor(rank / 2)
    return sd


def medians(settings, repeats):
    """Median seconds of each setting's function, timed in turn (round robin) after one warm-up each,
    so that a busy machine slows every setting alike."""
    for fn in settings.values():
        fn()
    times = {name: [] for name in settings}
    for _ in range(repeats):
        for name, fn in settings.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


@contextlib.contextmanager
def plain_layers(layers):
    """The layers back in their plain torch classes for a while (the "no LoRA" baseline)."""
    changeable, plain = {layer: type(layer) for layer in layers}, {v: k for k, v in CHANGEABLE.items()}
    for layer in layers:
        layer.__class__ = plain[type(layer)]
    try:
        yield
    finally:
        for layer, cls in changeable.items():
            layer.__class__ = cls


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=32, help="latent side (64 = 512 px images)")
    parser.add_argument("--batch", type=int, default=2, help="UNet batch (2: one image with CFG)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(dict(cross_attention_dim=768, sample_size=64)).eval()
    x = torch.randn(args.batch, 4, args.size, args.size)
    t, context = torch.tensor(500), torch.randn(args.batch, 77, 768)
    pipe = UNetOnly(unet)
    pipe.load_lora_weights(kohya_lora(unet, args.rank), adapter_name="lora")
    per_call = pipe.networks_for_call(adapters={"lora": 1.0}).unet
    start = time.perf_counter()
    pipe.fuse_lora()  # the weights' values do not change the time of the other settings
    fuse_time = time.perf_counter() - start

    def step(plan=None):
        with torch.inference_mode(), using(plan):
            return unet(x, t, context)

    def no_lora():
        with plain_layers(list(per_call)):
            return step()

    rows = medians({"no LoRA": no_lora, f"LoRA per call (unfused, {len(per_call)} layers)": lambda: step(per_call),
                    f"LoRA fused (fuse_lora: {fuse_time:.1f} s once)": step}, args.repeats)
    pipe.unfuse_lora()
    base = rows["no LoRA"]
    print(f"SD 1.5-shaped UNet step, batch {args.batch} x 4 x {args.size} x {args.size}, rank-{args.rank} LoRA, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} (round robin)\n")
    print("| setting | seconds per step | vs no LoRA |")
    print("| --- | --- | --- |")
    for name, seconds in rows.items():
        print(f"| {name} | {seconds:.3f} | {100 * (seconds / base - 1):+.1f}% |")
    print("\nA LoRA loaded but not used by the call costs what the fused row does: its layers find no change.")


if __name__ == "__main__":
    main()
