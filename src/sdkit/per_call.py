"""Changes to shared layers that hold for one call only: LoRA weight changes and embedding vectors.

A pipeline's models are shared by every call, so a call never edits their weights. Instead each
changeable layer gets, once, a forward hook that reads what the current call put in a
``contextvars.ContextVar``: a call sets its value around its own text encoding and UNet calls
(``using``, ``token_vectors``), other threads see theirs or none, and a layer whose hook finds
nothing for it returns its output untouched (the hook's only cost: one Python call per layer).
"""

import contextlib
import contextvars
import threading
import weakref

_LORA = contextvars.ContextVar("sdkit_lora", default=None)  # {layer: ((delta, m * s), ...)}
_VECTORS = contextvars.ContextVar("sdkit_token_vectors", default=None)  # (token embedding, fixes)
_HOOKED = weakref.WeakKeyDictionary()  # module -> the hook functions it has
_HOOK_LOCK = threading.Lock()


def ensure_hook(module, hook):
    """Give ``module`` the forward hook ``hook`` (with kwargs) unless it has it; safe from any thread."""
    with _HOOK_LOCK:
        hooks = _HOOKED.setdefault(module, set())
        if hook not in hooks:
            module.register_forward_hook(hook, with_kwargs=True)
            hooks.add(hook)


def _input(args, kwargs):
    return args[0] if args else kwargs["input"]


def lora_hook(layer, args, kwargs, output):
    """y + sum_k m_k s_k dW_k(x) for the changes the current call set for this layer (LoRA)."""
    plan = _LORA.get()
    changes = plan.get(layer) if plan else None
    if not changes:
        return None
    x = _input(args, kwargs)
    for delta, weight in changes:
        output = delta.add_to(output, x, layer, weight)
    return output


@contextlib.contextmanager
def using(plan):
    """Within: the layers of ``plan`` ({layer: ((delta, weight), ...)}) add their changes; nothing when empty."""
    if not plan:
        yield
        return
    token = _LORA.set(plan)
    try:
        yield
    finally:
        _LORA.reset(token)


def token_vectors_hook(embedding, args, kwargs, output):
    """The token embeddings (B, T, D) with each row's embedding vectors put at their positions."""
    current = _VECTORS.get()
    if current is None or current[0] is not embedding:
        return None
    out = output.clone()
    T = out.shape[1]
    for row, fixes in enumerate(current[1]):
        for position, vectors in fixes:
            n = min(len(vectors), T - 1 - position)  # never over the last (EOS) position, as A1111
            out[row, position:position + n] = vectors[:n].to(out)
    return out


@contextlib.contextmanager
def token_vectors(token_embedding, fixes):
    """Within: ``token_embedding`` puts ``fixes[b]`` = ((position, (n, D) vectors), ...) into row b."""
    if not any(fixes):
        yield
        return
    ensure_hook(token_embedding, token_vectors_hook)
    token = _VECTORS.set((token_embedding, fixes))
    try:
        yield
    finally:
        _VECTORS.reset(token)
