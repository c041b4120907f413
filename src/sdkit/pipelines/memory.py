"""How much memory a call needs, how much there is, and the largest image size that fits.

``estimate_bytes`` counts what a call holds at its peak beyond the loaded weights: the latents,
the UNet's activations (the skip connections it keeps plus the largest working set of one
block, for the whole batch, doubled by classifier-free guidance; AND prompts, which add a batch
per part, are not counted) and the VAE's (``vae_bytes``: decoding, or encoding an init image, at
the image size). The two are added, as allocators keep part of the UNet's memory when the VAE
runs. It assumes memory-efficient attention (torch's ``scaled_dot_product_attention`` does not
build the tokens x tokens matrix on CPU, measured, nor with CUDA's memory-efficient kernels), so
it grows with the number of pixels. A pipeline call refuses a size whose estimate exceeds
``available_bytes`` unless ``allow_large=True``.
"""

import os

# Peak live activations of one block, in multiples of (channels x pixels) of its level: a spatial
# transformer holds q, k, v and their head-split copies, the GEGLU's 8c projection and 4c products and
# its residuals (a whole test UNet measured 33-35c on CPU, skips included); a resnet its input, norm,
# SiLU, conv outputs, shortcut and sum (up blocks read 2c); a VAE resnet the same in its wider
# channel count (two test VAEs measured 3.7c at 1024 x 1024).
WORK_ATTENTION = 40
WORK_RESNET = 8
WORK_VAE = 5
IMAGE_COPIES = 24  # float32 RGB copies of the decoded images (decode, clamp, numpy, uint8, PIL)


def _bytes_per_value(module):
    return next(module.parameters()).element_size()


def _per_level(value, n):
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * n


def unet_bytes(config, h, w, batch, value_bytes):
    """Peak UNet activations for ``batch`` latents of h x w: the skips kept plus one block's work."""
    channels = config["block_out_channels"]
    n = len(channels)
    layers = _per_level(config["layers_per_block"], n)
    attention = ["CrossAttn" in kind for kind in config["down_block_types"]]
    area = [h * w / 4 ** i for i in range(n)]  # latent pixels at each level
    skips = channels[0] * area[0] + sum(layers[i] * channels[i] * area[i] for i in range(n)) \
        + sum(channels[i] * area[i + 1] for i in range(n - 1))
    work = max((WORK_ATTENTION if attention[i] else WORK_RESNET) * channels[i] * area[i] for i in range(n))
    return int(batch * value_bytes * (skips + work))


def vae_bytes(config, height, width, batch, value_bytes):
    """Peak VAE activations decoding (or encoding) ``batch`` images of height x width pixels.

    The largest level is the full-size one, where the resnets read the next level's channels.
    """
    channels = config["block_out_channels"]
    n = len(channels)
    work = 0
    for i in range(n):  # level i works at 1 / 4**i of the pixels, reading channels[i + 1] at most
        widest = max(channels[i], channels[min(i + 1, n - 1)])
        work = max(work, WORK_VAE * widest * height * width / 4 ** i)
    return int(batch * (value_bytes * work + IMAGE_COPIES * height * width))


def estimate_bytes(pipe, height, width, batch_size, guided=True, decode=True):
    """Bytes a call of ``batch_size`` images of height x width needs beyond the loaded weights."""
    f = pipe.vae_scale_factor
    h, w = height // f, width // f
    unet_batch = batch_size * (2 if guided else 1)
    latents = 8 * unet_batch * pipe.unet.config["in_channels"] * h * w * 4  # latents, noise, predictions
    unet = unet_bytes(pipe.unet.config, h, w, unet_batch, _bytes_per_value(pipe.unet))
    vae = vae_bytes(pipe.vae.config, height, width, batch_size, _bytes_per_value(pipe.vae)) if decode else 0
    return latents + unet + vae


def _cgroup_room():
    """Bytes the cgroup (a container's memory limit) still allows, or None when unlimited."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            with open(usage_file) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:
            return max(int(limit) - usage, 0)
    return None


def _address_space_room():
    """Bytes an address-space limit (``ulimit -v``) still allows, or None when unlimited."""
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        if limit == resource.RLIM_INFINITY:
            return None
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        return max(limit - used, 0)
    except (ImportError, OSError, ValueError):
        return None


def available_bytes(device):
    """Memory a call on ``device`` can still use, or None when it cannot be told (then no limit applies).

    CUDA: the device's free memory plus what torch has cached but not allocated. CPU: the
    available RAM, lowered by a container (cgroup) limit or an address-space limit.
    """
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    try:
        import psutil

        room = [psutil.virtual_memory().available]
    except ImportError:
        room = []
    room += [r for r in (_cgroup_room(), _address_space_room()) if r is not None]
    return min(room) if room else None


def largest_fitting(needs, height, width, budget, factor):
    """The largest (height, width), multiples of ``factor`` in the proportions of height x width, whose
    ``needs(height, width)`` fits ``budget``; None when not even factor x factor fits."""
    def size(scale):
        return (max(factor, int(height * scale) // factor * factor),
                max(factor, int(width * scale) // factor * factor))

    low, high = 0.0, 1.0
    if needs(*size(low)) > budget:
        return None
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (mid, high) if needs(*size(mid)) <= budget else (low, mid)
    return size(low)


def format_bytes(n):
    """'1.5 GiB', or '300 MiB' under 1 GiB."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def size_error(pipe, height, width, batch_size, guided=True, decode=True, device=None):
    """Why height x width x batch_size will not fit in memory (None if it fits or memory is unknown).

    The message names the estimate, the memory at hand and the largest size that fits; the
    caller adds how to override it.
    """
    budget = available_bytes(device if device is not None else pipe.device)
    needed = estimate_bytes(pipe, height, width, batch_size, guided, decode)
    if budget is None or needed <= budget:
        return None

    def needs(h, w):
        return estimate_bytes(pipe, h, w, batch_size, guided, decode)

    f = pipe.vae_scale_factor
    same_shape = largest_fitting(needs, height, width, budget, f)
    side = max(height, width)
    square = largest_fitting(needs, side, side, budget, f)
    if not (same_shape and square):
        fits = "not even the smallest image fits"
    elif height == width:
        fits = f"the largest that fits is about {square[1]}x{square[0]}"
    else:
        fits = (f"the largest that fits is about {same_shape[1]}x{same_shape[0]} (width x height) in these "
                f"proportions, {square[1]}x{square[0]} square")
    batch = f" x {batch_size} images" if batch_size > 1 else ""
    return (f"{width}x{height}{batch} needs about {format_bytes(needed)} (estimated: latents, UNet activations, "
            f"VAE decode) but {format_bytes(budget)} is available; {fits}")
