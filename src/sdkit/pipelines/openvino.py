"""The UNet compiled by OpenVINO for CPU inference (``pipe.compile(backend="openvino")``).

OpenVINO (``pip install "sdkit[openvino]"``) compiles one static shape at a time: each (batch,
latent size, prompt length) is converted and compiled on its first use (about two minutes for
the SD 1.5 UNet here) and kept on disk, so a later process loads it in seconds. The disk cache is
keyed by the weights' hash, the config, the shape and the OpenVINO version. Compilation keeps
float32 (``INFERENCE_PRECISION_HINT``: OpenVINO would otherwise pick bfloat16 on CPUs that have
it) and the saved model is not compressed to float16, so outputs equal the eager UNet's to about
1e-5 relative. One compiled model serves concurrent calls: each call has its own infer request.
"""

import hashlib
import json
import os
import tempfile
import threading

import numpy as np
import torch

from .performance import CompiledModel


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


class OpenVINOUNet(CompiledModel):
    """Calls like the UNet (``(sample, timestep, context) -> prediction``), run by OpenVINO on the CPU.

    ``deep_cache_forward`` runs the eager UNet (DeepCache's shallow path is not compiled).
    """

    def __init__(self, unet, cache_dir=None, threads=None):
        self.ov = _openvino()
        if unet.device.type != "cpu" or unet.dtype != torch.float32:
            raise ValueError(f'pipe.compile(backend="openvino") runs float32 on the CPU; this UNet is '
                             f'{unet.dtype} on {unet.device}: call pipe.to("cpu", torch.float32) first.')
        super().__init__(unet)
        self.cache_dir = os.path.join(cache_dir or default_cache_dir(), weights_hash(unet))
        self.core = self.ov.Core()
        self.config = {"INFERENCE_PRECISION_HINT": "f32", "CACHE_DIR": os.path.join(self.cache_dir, "blobs")}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = int(threads)
        self._compiled = {}  # (sample shape, context shape) -> CompiledModel
        self._lock = threading.Lock()  # one compilation at a time; calls on compiled shapes do not wait

    def compiled(self, sample_shape, context_shape):
        """The compiled model of one shape: from memory, from the disk cache, or converted now."""
        key = (tuple(sample_shape), tuple(context_shape))
        model = self._compiled.get(key)
        if model is not None:
            return model
        with self._lock:
            if key not in self._compiled:
                self._compiled[key] = self._compile(*key)
            return self._compiled[key]

    def _compile(self, sample_shape, context_shape):
        name = "unet_" + "x".join(map(str, sample_shape)) + "_" + "x".join(map(str, context_shape))
        xml = os.path.join(self.cache_dir, f"{name}_ov{self.ov.get_version().split('-')[0]}.xml")
        if not os.path.exists(xml):
            os.makedirs(self.cache_dir, exist_ok=True)
            example = (torch.zeros(sample_shape), torch.full((sample_shape[0],), 500.0), torch.zeros(context_shape))
            with torch.no_grad():
                model = self.ov.convert_model(_UNetInputs(self.unet).eval(), example_input=example)
            # saved aside, then the .bin and last the .xml moved in: a half-written pair is never taken as cached
            with tempfile.TemporaryDirectory(dir=self.cache_dir) as tmp:
                self.ov.save_model(model, os.path.join(tmp, "unet.xml"), compress_to_fp16=False)
                os.replace(os.path.join(tmp, "unet.bin"), xml[:-4] + ".bin")
                os.replace(os.path.join(tmp, "unet.xml"), xml)
        return self.core.compile_model(xml, "CPU", self.config)

    def __call__(self, sample, timestep, encoder_hidden_states):
        B = sample.shape[0]
        t = timestep if torch.is_tensor(timestep) else torch.tensor(timestep)
        t = t.reshape(-1).float().expand(B) if t.numel() == 1 else t.reshape(-1).float()
        model = self.compiled(sample.shape, encoder_hidden_states.shape)
        request = model.create_infer_request()  # per call: concurrent calls share the compiled model
        inputs = [np.ascontiguousarray(v.detach().cpu().float().numpy()) for v in (sample, t, encoder_hidden_states)]
        result = request.infer(inputs)
        return torch.from_numpy(np.array(result[model.output(0)])).to(sample.dtype)
