"""The UNet and the VAE decoder compiled by OpenVINO for CPU inference (``pipe.compile(backend="openvino")``).

OpenVINO (``pip install "sdkit[openvino]"``) compiles one static shape at a time: each (batch,
latent size, prompt length) is converted and compiled on its first use (about two minutes for
the SD 1.5 UNet here, one and a half for its VAE decoder) and kept on disk, so a later process
loads it in seconds. The disk cache is keyed by the weights' hash, the config, the shape and the
OpenVINO version (and OpenVINO's compiled blobs kept apart per precision). Compilation keeps
float32 (``INFERENCE_PRECISION_HINT``: OpenVINO would otherwise pick bfloat16 on CPUs that have
it) and the saved model is not compressed to float16, so outputs equal the eager UNet's to about
1e-5 relative. ``precision="bf16"`` opts into bfloat16 matmuls and convolutions (float32
accumulation) on CPUs with bfloat16 instructions (such as AVX512_BF16 or AMX): faster, and no
longer the same images (about 2% relative error per UNet step on random SD 1.5-shaped weights).
One compiled model serves concurrent calls: each call takes an idle infer request
from the model's pool (or makes one), so no two calls share one and a request, with the buffers it
has allocated, is reused by later calls rather than made anew each step.
"""

import hashlib
import json
import os
import tempfile
import threading

import numpy as np
import torch

from .performance import CompiledModel, Weights


def _openvino():
    try:
        import openvino
    except ImportError:
        raise ImportError('pipe.compile(backend="openvino") needs OpenVINO: pip install "sdkit[openvino]" '
                          '(or pip install openvino).') from None
    return openvino


def default_cache_dir():
    """``$SDKIT_CACHE/openvino``, else ``~/.cache/sdkit/openvino``."""
    root = os.environ.get("SDKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sdkit")
    return os.path.join(root, "openvino")


def weights_hash(module):
    """Hex digest of a module's config, parameter names, shapes, dtypes and values."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps(dict(getattr(module, "config", {})), sort_keys=True, default=str).encode())
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().data)
    return digest.hexdigest()


class _UNetInputs(torch.nn.Module):
    """The UNet with tensor-only inputs, as OpenVINO's converter traces it."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states)


class _VAEDecode(torch.nn.Module):
    """The VAE's decode of one batch of latents (no slicing or tiling), as the converter traces it."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, z):
        return self.vae._decode(z)


class _Shapes:
    """One module's OpenVINO models, one per static input shape: compiled on first use (from the disk
    cache when there), each run on a pooled infer request no other run holds, so concurrent calls share them."""

    def __init__(self, ov, module, traced, name, cache_dir, threads, precision="f32"):
        self.ov, self.traced, self.name = ov, traced, name
        self.core = ov.Core()
        check_precision(self.core, precision)
        self.cache_dir = os.path.join(cache_dir or default_cache_dir(), weights_hash(module))
        # the saved model is float32 either way; OpenVINO's compiled-blob cache (CACHE_DIR) is not keyed by
        # the precision, so each precision keeps its blobs apart
        blobs = "blobs" if precision == "f32" else f"blobs-{precision}"
        self.config = {"INFERENCE_PRECISION_HINT": precision, "CACHE_DIR": os.path.join(self.cache_dir, blobs)}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = int(threads)
        self._compiled = {}  # input shapes -> compiled model
        self._lock = threading.Lock()  # one compilation at a time; calls on compiled shapes do not wait
        self._idle = {}  # input shapes -> infer requests no call is using
        self._idle_lock = threading.Lock()

    def compiled(self, example):
        """The compiled model of the shapes of ``example`` (input tensors): from memory, from the disk
        cache, or converted now."""
        key = tuple(tuple(t.shape) for t in example)
        model = self._compiled.get(key)
        if model is not None:
            return model
        with self._lock:
            if key not in self._compiled:
                self._compiled[key] = self._compile(key, example)
            return self._compiled[key]

    def _compile(self, key, example):
        shapes = "_".join("x".join(map(str, shape)) for shape in key)
        xml = os.path.join(self.cache_dir, f"{self.name}_{shapes}_ov{self.ov.get_version().split('-')[0]}.xml")
        if not os.path.exists(xml):
            os.makedirs(self.cache_dir, exist_ok=True)
            with torch.no_grad():
                model = self.ov.convert_model(self.traced.eval(), example_input=example)
            # saved aside, then the .bin and last the .xml moved in: a half-written pair is never taken as cached
            with tempfile.TemporaryDirectory(dir=self.cache_dir) as tmp:
                self.ov.save_model(model, os.path.join(tmp, "model.xml"), compress_to_fp16=False)
                os.replace(os.path.join(tmp, "model.bin"), xml[:-4] + ".bin")
                os.replace(os.path.join(tmp, "model.xml"), xml)
        return self.core.compile_model(xml, "CPU", self.config)

    def __call__(self, *inputs):
        model = self.compiled(inputs)
        key = tuple(tuple(t.shape) for t in inputs)
        with self._idle_lock:
            idle = self._idle.setdefault(key, [])
            request = idle.pop() if idle else None
        if request is None:
            request = model.create_infer_request()
        arrays = [np.ascontiguousarray(v.detach().cpu().float().numpy()) for v in inputs]
        try:
            # copied out before the request goes back to the pool, whose next user overwrites its buffers
            return torch.from_numpy(np.array(request.infer(arrays)[model.output(0)]))
        finally:
            with self._idle_lock:
                idle.append(request)


PRECISIONS = ("f32", "bf16")


def check_precision(core, precision):
    """Raise ValueError unless ``precision`` is one OpenVINO can run on this CPU (bf16: its
    OPTIMIZATION_CAPABILITIES list BF16)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {PRECISIONS}: \"f32\" keeps the eager images, "
                         f"\"bf16\" trades a little accuracy for speed on CPUs with bfloat16 instructions.")
    if precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        raise ValueError('precision="bf16" needs a CPU with bfloat16 instructions (such as AVX512_BF16 or AMX), '
                         'and OpenVINO finds none on this one: leave precision at "f32".')


def _check_cpu_float32(module, what):
    if module.device.type != "cpu" or module.dtype != torch.float32:
        raise ValueError(f'pipe.compile(backend="openvino") runs float32 on the CPU; this {what} is '
                         f'{module.dtype} on {module.device}: call pipe.to("cpu", torch.float32) first.')


class OpenVINOUNet(CompiledModel):
    """Calls like the UNet (``(sample, timestep, context) -> prediction``), run by OpenVINO on the CPU.

    ``deep_cache_forward`` runs the eager UNet (DeepCache's shallow path is not compiled).
    """

    def __init__(self, unet, cache_dir=None, threads=None, precision="f32"):
        ov = _openvino()
        _check_cpu_float32(unet, "UNet")
        super().__init__(unet)
        self.shapes = _Shapes(ov, unet, _UNetInputs(unet), "unet", cache_dir, threads, precision)
        self.cache_dir = self.shapes.cache_dir

    @property
    def precision(self):
        """"f32" or "bf16", as compiled."""
        return self.shapes.config["INFERENCE_PRECISION_HINT"]

    def compiled(self, sample_shape, context_shape):
        """The compiled model of one (sample, context) shape: from memory, from the disk cache, or converted now."""
        example = (torch.zeros(sample_shape), torch.full((sample_shape[0],), 500.0), torch.zeros(context_shape))
        return self.shapes.compiled(example)

    def __call__(self, sample, timestep, encoder_hidden_states):
        B = sample.shape[0]
        t = timestep if torch.is_tensor(timestep) else torch.tensor(timestep)
        self.unet.check_inputs(sample, t, encoder_hidden_states)  # before a new shape would be converted
        t = t.reshape(-1).float().expand(B)
        return self.shapes(sample, t, encoder_hidden_states).to(sample.dtype)


class OpenVINODecoder:
    """The VAE's decode of unscaled latents (``(B, C, h, w) -> (B, 3, 8h, 8w)``), run by OpenVINO on
    the CPU, one compiled model per latent shape. ``vae`` is the VAE it was compiled from."""

    def __init__(self, vae, cache_dir=None, threads=None, precision="f32"):
        ov = _openvino()
        _check_cpu_float32(vae, "VAE")
        self.vae, self.weights = vae, Weights(vae)
        self.shapes = _Shapes(ov, vae, _VAEDecode(vae), "vae_decode", cache_dir, threads, precision)

    def __call__(self, z):
        return self.shapes(z).to(z.dtype)
