"""The reference implementations other than diffusers, imported without their package imports.

k-diffusion and open-clip-torch import torchvision (and much else) at package import, and the
PyPI torchvision does not load beside the CPU torch. They are installed with --no-deps
(tests/oracles.txt); here the few files the tests need are loaded on their own under stub
packages, with a stand-in ``torchvision`` (while they import) whose only use (k-diffusion's image
utilities) the tests never reach.
"""

import contextlib
import importlib.util
import sys
import types


@contextlib.contextmanager
def _stand_in_torchvision(ops=False):
    """A stand-in ``torchvision`` while the reference files import, removed after: transformers looks for the
    real one (``importlib.util.find_spec``), and a module without a spec breaks that look-up. With ``ops``,
    the ``torchvision.ops.misc.FrozenBatchNorm2d`` open_clip's utils import (for image towers the tests
    never build)."""
    if "torchvision" in sys.modules:
        yield
        return
    from torch import nn

    tv = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    transforms.functional = functional
    tv.transforms = transforms
    names = {"torchvision": tv, "torchvision.transforms": transforms, "torchvision.transforms.functional": functional}
    if ops:
        tv_ops, misc = types.ModuleType("torchvision.ops"), types.ModuleType("torchvision.ops.misc")
        misc.FrozenBatchNorm2d = type("FrozenBatchNorm2d", (nn.Module,), {})
        tv_ops.misc = misc
        tv.ops = tv_ops
        names.update({"torchvision.ops": tv_ops, "torchvision.ops.misc": misc})
    sys.modules.update(names)
    try:
        yield
    finally:
        for name in names:
            sys.modules.pop(name, None)


def _load_files(package, names):
    """Import ``package.<name>`` for each name from the installed files, with a stub package."""
    if getattr(sys.modules.get(package), "_sdkit_stub", False):  # a second call: the stub is in place
        folder = sys.modules[package].__path__[0]
    else:
        spec = importlib.util.find_spec(package)
        if spec is None:
            raise ImportError(f"{package} is not installed: pip install --no-deps -r tests/oracles.txt")
        folder = spec.submodule_search_locations[0]
    if package not in sys.modules or not getattr(sys.modules[package], "_sdkit_stub", False):
        stub = types.ModuleType(package)
        stub.__path__ = [folder]
        stub._sdkit_stub = True
        sys.modules[package] = stub
    modules = []
    for name in names:
        full = f"{package}.{name}"
        if full not in sys.modules:
            file_spec = importlib.util.spec_from_file_location(full, f"{folder}/{name}.py")
            module = importlib.util.module_from_spec(file_spec)
            sys.modules[full] = module
            file_spec.loader.exec_module(module)
            setattr(sys.modules[package], name, module)
        modules.append(sys.modules[full])
    return modules


def k_diffusion():
    """(sampling, external) modules of k-diffusion."""
    with _stand_in_torchvision():
        _, sampling, external = _load_files("k_diffusion", ["utils", "sampling", "external"])
    return sampling, external


def open_clip_tokenizer():
    """open_clip's tokenizer module (``tokenize``, ``SimpleTokenizer``)."""
    (tokenizer,) = _load_files("open_clip", ["tokenizer"])
    return tokenizer


def open_clip_transformer():
    """open_clip's transformer module (``TextTransformer``: the text tower SD 2 conditions on)."""
    with _stand_in_torchvision(ops=True):
        *_, transformer = _load_files("open_clip", ["utils", "pos_embed", "transformer"])
    return transformer
