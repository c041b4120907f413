"""Changes to shared layers that hold for one call only: LoRA weight changes and embedding vectors.

A pipeline's models are shared by every call, so a call never edits their weights. Instead a layer
reads, when it runs, what the current call put in a ``contextvars.ContextVar``: a call sets its
value around its own text encoding and UNet calls (``using``, ``token_vectors``), other threads see
theirs or none, and a layer that finds nothing for it computes what it always does. LoRA layers
ask ``changes_for`` in their forward (``lora.make_changeable``); the token embedding gets a forward
hook that puts a call's embedding vectors in.
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


def changes_for(layer):
    """The current call's LoRA changes of a layer, ((delta, m * s), ...), or None."""
    plan = _LORA.get()
    return plan.get(layer) if plan else None


@contextlib.contextmanager
def holding(var, value):
    """Within (in this thread or task only): the ContextVar ``var`` holds ``value``."""
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


@contextlib.contextmanager
def using(plan):
    """Within: the layers of ``plan`` ({layer: ((delta, weight), ...)}) add their changes; nothing when empty."""
    if not plan:
        yield
        return
    with holding(_LORA, plan):
        yield


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
    with holding(_VECTORS, (token_embedding, fixes)):
        yield
