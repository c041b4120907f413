"""Settings of every sdkit part: one frozen dataclass per class, read from the reference's JSON keys.

A model or scheduler declares its settings as dataclass fields named like the reference's
``config.json`` keys, each with the reason for its default. ``choice`` marks a field that takes a
few values; ``read_config`` turns a reference config dict into the dataclass and refuses values
sdkit does not implement instead of ignoring them; ``Config`` is the read-only view a part shows
as ``part.config``.
"""

import dataclasses
import math
import types
import typing


class Config(dict):
    """A read-only dict that also allows attribute access (``config.in_channels``)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    def _readonly(self, *args, **kwargs):
        raise TypeError("a config is read-only; build a new part with from_config({**config, key: value})")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = __ior__ = _readonly
    __setattr__ = __delattr__ = _readonly  # config.key = value would change nothing the part reads

    def __reduce__(self):  # copy, deepcopy and pickle rebuild from a plain dict (no item setting)
        return (type(self), (dict(self),))


def choice(default, choices):
    """A dataclass field that accepts only ``choices`` (checked by ``check_fields``)."""
    return dataclasses.field(default=default, metadata={"choices": tuple(choices)})


def check_value(owner, key, value, allowed):
    """Raise a ValueError naming the owner, the key, the bad value and the values sdkit supports."""
    if not any(value == a and isinstance(value, bool) == isinstance(a, bool) for a in allowed):
        raise ValueError(f"{owner}: {key}={value!r} is not supported by sdkit; use one of "
                         f"{', '.join(map(repr, allowed))}.")


def check_fields(owner, config):
    """Check every ``choice`` field of a config dataclass."""
    for f in dataclasses.fields(config):
        if "choices" in f.metadata:
            check_value(owner, f.name, getattr(config, f.name), f.metadata["choices"])


def _as_tuple(value):
    return tuple(value) if isinstance(value, list) else value


def _matches(value, kind):
    """Whether a config value has the declared type (int, float, bool, str, tuples of them, Optional)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is tuple or kind is tuple:
        items = args[0] if len(args) == 2 and args[1] is Ellipsis else None
        return isinstance(value, tuple) and (items is None or all(_matches(v, items) for v in value))
    if isinstance(kind, type):
        return isinstance(value, kind)
    return True  # Any, or a type this check does not know


def _describe(kind):
    """'a whole number', 'a list of strings', ... for the declared type of a config value."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple or kind is tuple:
        items = args[0] if len(args) == 2 and args[1] is Ellipsis else None
        return f"a list of {_describe(items)[2:]}s" if items is not None else "a list"
    names = {type(None): "null", bool: "true or false", int: "a whole number", float: "a number",
             str: "a string"}
    return names.get(kind, f"a {getattr(kind, '__name__', kind)}")


def check_types(owner, config_class, settings):
    """Raise a ValueError naming the key, the value and the type wanted for the first ill-typed setting."""
    hints = typing.get_type_hints(config_class)
    for key, value in settings.items():
        if not _matches(value, hints[key]):
            shown = repr(value if not isinstance(value, tuple) else list(value))
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise ValueError(f"{owner}: {key}={shown} should be {_describe(hints[key])}.")


def build(owner, config_class, settings):
    """``config_class(**settings)`` with lists as tuples; an unknown name is a TypeError listing the
    known, a value of the wrong type a ValueError naming it."""
    names = [f.name for f in dataclasses.fields(config_class)]
    unknown = sorted(set(settings) - set(names))
    if unknown:
        raise TypeError(f"{owner} got unknown settings {unknown}; its settings are {', '.join(names)}.")
    settings = {k: _as_tuple(v) for k, v in settings.items()}
    check_types(owner, config_class, settings)
    config = config_class(**settings)
    check_fields(owner, config)
    return config


def read_config(owner, config_class, values, fixed=None, neutral=(), none_is_unset=False):
    """(dataclass, unused keys) from a reference config dict.

    ``_``-prefixed keys and ``neutral`` ones (known, with no effect) are dropped. ``fixed`` maps
    reference keys that sdkit supports only at some values to those values: any other value is
    refused. With ``none_is_unset`` (scheduler configs, where other classes write None for "not
    set") a None keeps the default. Every other key is returned in ``unused``.
    """
    fixed = fixed or {}
    fields = {f.name for f in dataclasses.fields(config_class)}
    settings, unused = {}, {}
    for key, value in dict(values).items():
        if key.startswith("_") or key in neutral or (value is None and none_is_unset):
            continue
        if key in fixed:
            check_value(owner, key, value, fixed[key])
        elif key in fields:
            settings[key] = value
        else:
            unused[key] = value
    return build(owner, config_class, settings), unused


def plain(value):
    """A config value as a JSON-ready Python value (lists for tuples, arrays and tensors)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, tuple):
        return [plain(v) for v in value]
    return value


def check_number(owner, name, value, low=-math.inf, high=math.inf, integer=False):
    """Raise unless ``value`` is a finite real number (an int if ``integer``) in [low, high]."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) \
            or not low <= value <= high:
        what = "a whole number" if integer else "a finite number"
        bounds = f" in [{low:g}, {high:g}]" if math.isfinite(low) and math.isfinite(high) else \
            f" >= {low:g}" if math.isfinite(low) else f" <= {high:g}" if math.isfinite(high) else ""
        raise ValueError(f"{owner}: {name} must be {what}{bounds}, got {value!r}.")
