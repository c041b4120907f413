"""Speed and memory settings of a pipeline, with the reference's names.

Each is a setting of the pipeline or of its models, made before calls and read by every call;
none is per-call state, so concurrent calls stay correct with them on:

    pipe.enable_attention_slicing("auto")   # attention a few heads at a time (exact)
    pipe.enable_vae_slicing()               # decode a batch one image at a time (exact)
    pipe.enable_vae_tiling()                # decode large images in blended tiles (close, no seams)
    pipe.enable_model_cpu_offload()         # accelerators: one model at a time on the device
    pipe.enable_sequential_cpu_offload()    # accelerators: one layer's weights at a time
    pipe.compile(backend="openvino")        # CPU: the UNet and VAE decoder compiled by OpenVINO (to ~1e-5)
    pipe.compile(backend="inductor")        # torch.compile of the UNet (GPU or CPU)

The offload methods and torch.compile's CUDA graphs are for accelerators and are not tested on
this project's CPU-only machines beyond their errors.
"""

import contextlib
import functools
import threading
import warnings

import torch

from ..models.modeling import ModelMixin


def accelerator(device, gpu_id, method):
    """The accelerator ``method`` offloads to; a RuntimeError when there is none (as the reference)."""
    if device is None:
        for kind in ("cuda", "xpu", "mps"):
            backend = getattr(torch, kind, None) if kind != "mps" else getattr(torch.backends, "mps", None)
            if backend is not None and backend.is_available():
                device = kind
                break
        else:
            raise RuntimeError(f"{method} needs an accelerator (CUDA, XPU or MPS) and torch finds none. On a CPU "
                               f"the models already live in RAM: leave offloading off (enable_vae_tiling and "
                               f"enable_attention_slicing lower the peak instead).")
    device = torch.device(device)
    if device.type == "cpu":
        raise RuntimeError(f"{method} moves weights between the CPU and an accelerator; device='cpu' has nothing "
                           f"to offload to: leave it off, or name the accelerator (e.g. device='cuda').")
    return torch.device(device.type, gpu_id if gpu_id is not None else (device.index or 0))


class ModelOffload:
    """One part on the accelerator at a time (the reference's model CPU offload): a part moves there
    when one of its modules runs, and the part there before moves back to the CPU. Tensor inputs of
    those modules move to the accelerator with it."""

    def __init__(self, parts, device):
        self.device, self.current = device, None
        self.handles = [child.register_forward_pre_hook(functools.partial(self._load, part))
                        for part in parts for child in part.children()]

    def _load(self, part, module, args):
        if self.current is not part:
            if self.current is not None:
                self.current.to("cpu")
            part.to(self.device)
            self.current = part
        return tuple(a.to(self.device) if torch.is_tensor(a) else a for a in args)


class Weights:
    """Whether a model's weights are still those a compiled graph holds: their tensors' version
    counters, which every in-place change (``fuse_lora``, ``load_state_dict``, an optimizer step) moves
    (weights made under ``torch.inference_mode`` keep none: their changes go unseen)."""

    def __init__(self, module):
        self.module, self.versions = module, self._read(module)
        self.warned = False

    @staticmethod
    def _read(module):
        return [None if t.is_inference() else t._version for t in (*module.parameters(), *module.buffers())]

    def current(self, module, what):
        """True when ``module`` is the model compiled and its weights are unchanged; when they were changed
        in place, False with a warning (once): the call runs eager."""
        if module is not self.module:
            return False
        if self._read(module) == self.versions:
            return True
        if not self.warned:
            self.warned = True
            warnings.warn(f"The {what}'s weights changed after pipe.compile (fuse_lora, load_state_dict, ...), and "
                          f"the compiled graph holds the old ones: calls run the eager {what}. Call pipe.compile "
                          f"again to compile the new weights.", stacklevel=4)
        return False


class CompiledModel:
    """What a compiled UNet shares: it calls like the UNet, reports its device and dtype, and runs
    DeepCache's split forward on the eager UNet (that path is not compiled)."""

    def __init__(self, unet):
        self.unet = unet
        self.weights = Weights(unet)

    @property
    def device(self):
        return self.unet.device

    @property
    def dtype(self):
        return self.unet.dtype

    def deep_cache_forward(self, *args, **kwargs):
        return self.unet.deep_cache_forward(*args, **kwargs)

    def deep_cache_branches(self):
        return self.unet.deep_cache_branches()


_COMPILING = threading.Lock()  # one torch.compile build at a time in the process (freezing is a global setting)


def _freezing():
    """Inductor's freezing on while a graph builds: dynamo reads it while tracing, inductor while building."""
    from torch._inductor import config

    return config.patch(freezing=True)


class CompiledUNet(CompiledModel):
    """The UNet under ``torch.compile``: one static-shape graph per input shape, compiled on first use.

    On a CPU, inductor freezes the weights (``freezing=True``, the default there): they become
    constants of the graph, folded and pre-packed once for oneDNN's convolutions and matmuls (on the
    SD 1.5 UNet here 1.07x the unfrozen graph's speed, and faster than ``mode="max-autotune"`` on top;
    benchmarks/RESULTS.md). A weight changed in place afterwards is seen by some kernels and not by
    others, so ``Weights`` sends such calls to the eager UNet. A shape's first call compiles
    under a lock (dynamo's compilation is not meant to run in several threads at once, and freezing
    is set in inductor's global config while it builds); with ``mode="reduce-overhead"`` (CUDA graphs,
    which replay into the same output buffers) every call holds it, so calls on the device run one at
    a time, and each output is copied out before the next replay (samplers such as PNDM keep past outputs).
    """

    def __init__(self, unet, backend, freezing=None, **options):
        super().__init__(unet)
        self.serial = options.get("mode") == "reduce-overhead"
        on_cpu_inductor = backend == "inductor" and unet.device.type == "cpu"
        if freezing and not on_cpu_inductor:
            raise ValueError(f"freezing=True is inductor's on a CPU; this is backend={backend!r} on {unet.device}.")
        self.freezing = on_cpu_inductor if freezing is None else freezing
        self.function = torch.compile(unet, backend=backend, dynamic=False, **options)
        self._seen, self._lock = set(), threading.Lock()

    def __call__(self, sample, timestep, encoder_hidden_states):
        timestep = torch.as_tensor(timestep, device=sample.device)  # a tensor input: no recompile per value
        # what dynamo's guards check besides the shapes: a new combination recompiles, so it takes the lock
        # (and freezing) too. Settings of the UNet changed after compiling recompile outside both.
        key = (tuple(sample.shape), tuple(encoder_hidden_states.shape), sample.dtype, encoder_hidden_states.dtype,
               timestep.dtype, tuple(t.is_inference() for t in (sample, timestep, encoder_hidden_states)),
               torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        if key in self._seen and not self.serial:
            return self.function(sample, timestep, encoder_hidden_states)
        with self._lock:
            if key in self._seen:
                return self._replay(sample, timestep, encoder_hidden_states)
            with _COMPILING, _freezing() if self.freezing else contextlib.nullcontext():
                out = self._replay(sample, timestep, encoder_hidden_states)
            self._seen.add(key)
            return out

    def _replay(self, *inputs):
        if self.serial:  # CUDA graphs replay into static buffers: mark the step, copy the output out
            torch.compiler.cudagraph_mark_step_begin()
            return self.function(*inputs).clone()
        return self.function(*inputs)


class PerformanceSettings:
    """The speed and memory methods of DiffusionPipeline (module docstring)."""

    _execution_device = None  # the accelerator while offloading (the models' own device is then the CPU)
    _offload_lock = None  # offloaded calls run one at a time: the hooks move shared models
    _compiled_unet = None  # OpenVINOUNet or CompiledUNet of this pipeline's UNet, or None
    _compiled_decoder = None  # OpenVINODecoder of this pipeline's VAE, or None

    def _models(self):
        return [part for part in self.components.values() if isinstance(part, torch.nn.Module)]

    def enable_attention_slicing(self, slice_size="auto"):
        """Attention for a few (image, head) pairs at a time: "auto" half the heads, "max" one, or a count.

        Outputs equal the unsliced ones to float rounding; it lowers the peak where the attention
        kernel builds the tokens x tokens weights (the CPU's and CUDA's flash kernels do not)."""
        for part in self._models():
            if isinstance(part, ModelMixin):
                part.set_attention_slice(slice_size)

    def disable_attention_slicing(self):
        self.enable_attention_slicing(None)

    def enable_vae_slicing(self):
        """Decode a batch one image at a time (the same images; the VAE's memory of one image)."""
        self.vae.enable_slicing()

    def disable_vae_slicing(self):
        self.vae.disable_slicing()

    def enable_vae_tiling(self, tile_sample_min_size=None, tile_overlap_factor=None, tile_norm=None):
        """Decode and encode large images in overlapping tiles blended together (``AutoencoderKL.enable_tiling``):
        the VAE's memory stays that of one tile, and the memory check counts it so."""
        self.vae.enable_tiling(tile_sample_min_size, tile_overlap_factor, tile_norm)

    def disable_vae_tiling(self):
        self.vae.disable_tiling()

    def enable_model_cpu_offload(self, gpu_id=None, device=None):
        """Keep the models in CPU RAM and move each whole model to the accelerator while it runs
        (text encoder, then UNet, then VAE). Calls then run one at a time. Untested here (no accelerator)."""
        target = accelerator(device, gpu_id, "enable_model_cpu_offload")
        self.to("cpu")
        ModelOffload(self._models(), target)
        self._start_offload(target)

    def enable_sequential_cpu_offload(self, gpu_id=None, device=None):
        """Keep the weights in CPU RAM and move each layer's to the accelerator only while it runs
        (accelerate's ``cpu_offload``): the least device memory, and slow. Untested here (no accelerator)."""
        target = accelerator(device, gpu_id, "enable_sequential_cpu_offload")
        try:
            from accelerate import cpu_offload
        except ImportError:
            raise ImportError("enable_sequential_cpu_offload needs accelerate: pip install accelerate "
                              "(or use enable_model_cpu_offload, which does not).") from None
        self.to("cpu")
        for part in self._models():
            cpu_offload(part, execution_device=target, offload_buffers=True)
        self._start_offload(target)

    def _start_offload(self, device):
        self._execution_device = device
        self._offload_lock = threading.Lock()

    def _call_guard(self):
        """Held for a whole call: the offload lock when offloading, else nothing."""
        return self._offload_lock if self._offload_lock is not None else contextlib.nullcontext()

    def compile(self, backend, cache_dir=None, **options):
        """Run the UNet compiled: ``backend="openvino"`` (CPU, float32, the UNet and the VAE decoder,
        each static shape compiled on first use and cached on disk under ``cache_dir``; ``threads=``
        sets OpenVINO's; ``precision="bf16"`` computes in bfloat16 on CPUs with bfloat16 instructions,
        faster but no longer the eager images), any ``torch.compile`` backend ("inductor", with ``mode=``: "max-autotune",
        "reduce-overhead" for CUDA graphs, or ``options=``; the UNet only; on a CPU inductor freezes the
        weights into the graph, ``freezing=False`` does not: ``CompiledUNet``), or None to go back to
        eager. The compiled models hold the weights as they are: changed in place afterwards
        (``fuse_lora``, ``load_state_dict``), they run eager with a warning until compiled again.
        Returns the pipeline."""
        unet = decoder = None  # both made before either is set: a refused compile leaves the pipeline as it was
        if backend == "openvino":
            from .openvino import OpenVINODecoder, OpenVINOUNet

            unet = OpenVINOUNet(self.unet, cache_dir, **options)
            decoder = OpenVINODecoder(self.vae, cache_dir, **options)
        elif backend is not None:
            if cache_dir is not None:
                raise ValueError("cache_dir is for backend='openvino'; torch.compile keeps its own cache "
                                 "(TORCHINDUCTOR_CACHE_DIR).")
            if "precision" in options:
                raise ValueError("precision is for backend='openvino'; with torch.compile, load the pipeline "
                                 "in the dtype to run (torch_dtype=torch.float16 or torch.bfloat16).")
            unet = CompiledUNet(self.unet, backend, **options)
        self._compiled_unet, self._compiled_decoder = unet, decoder
        return self

    def _decoder_for(self, z):
        """The compiled VAE decoder for latents ``z`` when it was compiled from the pipeline's current VAE,
        whose weights have not changed since, and the VAE would not tile them (tiles share the whole
        image's statistics, which a compiled graph cannot), else None."""
        compiled = self._compiled_decoder
        if compiled is None or self.vae.tiles(z) or not compiled.weights.current(self.vae, "VAE"):
            return None
        return compiled

    def _unet_for_run(self, run):
        """The compiled UNet when it was compiled from the pipeline's current UNet as its weights are now,
        else the UNet; the eager UNet too for a call with UNet LoRAs (a compiled graph holds the plain weights)."""
        compiled = self._compiled_unet
        if compiled is None or run.networks.unet or not compiled.weights.current(self.unet, "UNet"):
            return self.unet
        return compiled
