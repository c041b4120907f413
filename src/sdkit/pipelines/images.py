"""Image and mask conversion between user inputs (PIL, numpy, torch) and model tensors.

Model-side images are float tensors (B, 3, H, W); the VAE sees them in [-1, 1]. Masks are
(B, 1, H, W) in {0, 1}, 1 where the image is to be repainted (white in a mask picture).
"""

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

ACCEPTED = "a PIL image, a numpy array (H, W, 3) or a torch tensor (3, H, W), or a list or batch of them"
# PIL modes wider than 8 bits, with the value of full white; PIL's own convert() clips them at 255
HIGH_DEPTH = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}


def _as_batch(image, what):
    """A list of single images (PIL images, (H, W, C) arrays or (C, H, W) tensors)."""
    if isinstance(image, (list, tuple)):
        if not image:
            raise ValueError(f"{what} is an empty list: pass {ACCEPTED}.")
        out = []
        for item in image:
            out.extend(_as_batch(item, what))
        return out
    if isinstance(image, np.ndarray) and image.ndim == 4:
        return list(image)
    if isinstance(image, torch.Tensor) and image.ndim == 4:
        return list(image)
    return [image]


def _to_float(array, what):
    """uint8 [0, 255] or float [0, 1] -> float32 [0, 1]; anything else is an error."""
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{what} has dtype {array.dtype}: pass uint8 values in [0, 255] or floats in [0, 1].")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"{what} has NaN or inf values: pass finite values in [0, 1].")
    if array.size and (np.nanmin(array) < 0 or np.nanmax(array) > 1):
        raise ValueError(f"{what} has values in [{array.min():.3g}, {array.max():.3g}]; float images must "
                         f"be in [0, 1] (map a [-1, 1] image with (x + 1) / 2).")
    return array


def to_8bit(image, what="image"):
    """A 16-bit or float PIL image as 8-bit gray ("L"), scaled (65535 or 1.0 -> 255), not clipped.

    Other modes are returned as they are (PIL converts palette, CMYK and alpha itself)."""
    full = HIGH_DEPTH.get(image.mode)
    if full is None:
        return image
    array = np.asarray(image, dtype=np.float64)
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > full:
        raise ValueError(f"{what}: a PIL image of mode {image.mode!r} must hold values in [0, {full:g}], found "
                         f"[{np.nanmin(array):.4g}, {np.nanmax(array):.4g}]; convert it to 8-bit RGB first.")
    return PIL.Image.fromarray(np.round(array * (255 / full)).astype(np.uint8), mode="L")


def _pil_to_array(image, mode, size, what):
    image = to_8bit(image, what)
    if size is not None and image.size != size:
        image = image.resize(size, resample=PIL.Image.LANCZOS)
    try:
        image = image.convert(mode)
    except (ValueError, OSError) as e:
        raise ValueError(f"{what}: cannot convert a PIL image of mode {image.mode!r} to {mode} ({e}); "
                         f"convert it to RGB first.") from None
    return np.asarray(image, dtype=np.float32) / 255.0


def _channels_last(item, what):
    """(H, W, C) float array from a numpy (H, W[, C]) or torch (C, H, W) item."""
    if isinstance(item, torch.Tensor):
        t = item.detach().cpu()
        if t.ndim == 3:
            t = t.permute(1, 2, 0)
        array = t.float().numpy() if t.is_floating_point() else t.numpy()
    elif isinstance(item, np.ndarray):
        array = item
    else:
        raise ValueError(f"{what} has type {type(item).__name__}; pass {ACCEPTED}.")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise ValueError(f"{what} has shape {tuple(item.shape)}; pass {ACCEPTED}.")
    return _to_float(array, what)


def _resize(batch, size, mode):
    """Resize a (B, C, H, W) tensor to size (W, H) when it differs."""
    w, h = size
    if batch.shape[-2:] == (h, w):
        return batch
    if mode == "nearest":
        return F.interpolate(batch, size=(h, w), mode="nearest")
    return F.interpolate(batch, size=(h, w), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def image_size(image):
    """(width, height) of the first image of an input."""
    first = _as_batch(image, "image")[0]
    if isinstance(first, PIL.Image.Image):
        return first.size
    if isinstance(first, torch.Tensor) and first.ndim == 3:
        return first.shape[2], first.shape[1]
    if hasattr(first, "shape") and len(first.shape) >= 2:
        return first.shape[1], first.shape[0]
    raise ValueError(f"image has type {type(first).__name__}; pass {ACCEPTED}.")


def load_images(image, size=None, what="image"):
    """RGB images as a float32 (B, 3, H, W) tensor in [0, 1], resized to size=(W, H) if given.

    PIL images are converted to RGB (alpha dropped) and resized with Lanczos; arrays and tensors
    may have 1 (gray), 3 (RGB) or 4 (RGBA, alpha dropped) channels.
    """
    out = []
    for item in _as_batch(image, what):
        if isinstance(item, PIL.Image.Image):
            out.append(torch.from_numpy(_pil_to_array(item, "RGB", size, what)).permute(2, 0, 1))
            continue
        array = _channels_last(item, what)
        c = array.shape[-1]
        if c == 1:
            array = np.repeat(array, 3, axis=-1)
        elif c == 4:
            array = array[..., :3]
        elif c != 3:
            raise ValueError(f"{what} has {c} channels and cannot be read as RGB; pass an image with "
                             f"1 (gray), 3 (RGB) or 4 (RGBA) channels.")
        t = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None]
        out.append(_resize(t, size, "bilinear")[0] if size else t[0])
    shapes = {tuple(t.shape) for t in out}
    if len(shapes) > 1:
        raise ValueError(f"{what}: the images have different sizes {sorted(shapes)}; pass images of one size.")
    return torch.stack(out)


def load_masks(mask, size=None, what="mask_image"):
    """Binary masks (B, 1, H, W) in {0, 1}: 1 (white, >= 0.5) marks the region to repaint."""
    out = []
    for item in _as_batch(mask, what):
        if isinstance(item, PIL.Image.Image):
            t = torch.from_numpy(_pil_to_array(item, "L", size, what))[None]
        else:
            array = _channels_last(item, what)
            if array.shape[-1] in (3, 4):  # RGB(A) picture of a mask: ITU-R 601 luma, like PIL's "L"
                array = array[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
                array = array[..., None]
            elif array.shape[-1] != 1:
                raise ValueError(f"{what} has {array.shape[-1]} channels; pass a gray mask (H, W) or (H, W, 1).")
            t = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
            t = _resize(t[None], size, "nearest")[0] if size else t
        out.append(t)
    shapes = {tuple(t.shape) for t in out}
    if len(shapes) > 1:
        raise ValueError(f"{what}: the masks have different sizes {sorted(shapes)}; pass masks of one size.")
    return (torch.stack(out) >= 0.5).float()


def feather(mask, width):
    """A soft copy of a binary (B, 1, H, W) mask that ramps from 0 at its edge to 1 `width` pixels in.

    The ramp lies inside the mask, so pixels outside it stay exactly 0 (untouched when pasting back).
    """
    if width <= 0:
        return mask
    soft, eroded = mask.clone(), mask
    for _ in range(int(width) - 1):
        eroded = -F.max_pool2d(-eroded, 3, stride=1, padding=1)  # 3x3 erosion (image borders do not erode)
        soft = soft + eroded
    return soft / int(width)


def to_output(images, output_type):
    """(B, 3, H, W) images in [0, 1] -> "pt" tensor, "np" (B, H, W, 3) float32 array or a list of PIL images."""
    if output_type == "pt":
        return images
    array = images.detach().cpu().permute(0, 2, 3, 1).float().numpy()
    if output_type == "np":
        return array
    return [PIL.Image.fromarray(a) for a in (array * 255).round().astype(np.uint8)]
