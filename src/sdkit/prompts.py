"""A1111's prompt syntax, read as stable-diffusion-webui reads it (text only, no torch).

The stages, in A1111's order:

1. ``extra_network_tags``: ``<lora:name:w>``, ``<lora:name:te_w:unet_w>``, ``<lyco:...>`` (and any
   ``<kind:...>``) are cut out of the text (``modules/extra_networks.py``).
2. ``split_and``: ``a AND b:0.5`` -> parts with guidance weights (composable diffusion, Liu et al.
   2022, arXiv 2206.01714); ``text:w`` at the end of a part is its weight.
3. ``prompt_schedule``: prompt editing ``[from:to:when]``, ``[to:when]``, ``[from::when]`` and
   alternation ``[a|b]`` -> the text in force up to each step (``get_learned_conditioning_prompt_schedules``).
4. ``parse_emphasis``: ``(x)`` x1.1, ``[x]`` /1.1, ``(x:w)``, escapes and ``BREAK`` -> (text, weight)
   pieces (``parse_prompt_attention``).

Tokenizing the pieces into 75-token chunks and encoding them is ``sdkit.text_chunks``.
"""

import math
import re
from dataclasses import dataclass
from typing import Optional

BREAK = ("BREAK", -1.0)  # the piece parse_emphasis puts where a BREAK starts a new chunk
ROUND, SQUARE = 1.1, 1 / 1.1  # the weight factors of (x) and [x]


# -- 1. extra-network tags ----------------------------------------------------------------------

_TAG = re.compile(r"<(\w+):([^>]+)>")


@dataclass(frozen=True)
class ExtraNetworkTag:
    """One ``<kind:arg:arg...>`` tag: A1111 splits the arguments at ":"; ``k=v`` ones are named."""

    kind: str  # "lora", "lyco" (A1111's alias of lora), "hypernet", ...
    items: tuple  # the ":"-separated arguments, as written
    text: str  # the whole tag, for messages

    @property
    def positional(self):
        return tuple(i for i in self.items if len(i.split("=", 2)) != 2)

    @property
    def named(self):
        return dict(i.split("=", 1) for i in self.items if len(i.split("=", 2)) == 2)


@dataclass(frozen=True)
class LoraTag:
    """What a ``<lora:...>`` / ``<lyco:...>`` tag asks for (A1111's ``extra_networks_lora.py``).

    ``<lora:name>`` is weight 1; ``<lora:name:w>`` sets both weights; ``<lora:name:te:unet>`` sets
    the text encoder's and the UNet's apart; ``te=``, ``unet=`` and ``dyn=`` may be named instead.
    """

    name: str  # file stem of the LoRA, as A1111 finds it in its Lora folder
    te_multiplier: float  # weight of the text-encoder part
    unet_multiplier: float  # weight of the UNet part
    dyn_dim: Optional[int]  # DyLoRA rank to use (None: all)
    text: str  # the tag as written


def extra_network_tags(prompt):
    """(prompt without its ``<kind:...>`` tags, the tags in order), as A1111 cuts them out."""
    tags = []

    def cut(match):
        tags.append(ExtraNetworkTag(match.group(1), tuple(match.group(2).split(":")), match.group(0)))
        return ""

    return _TAG.sub(cut, prompt), tuple(tags)


def lora_tag(tag):
    """The :class:`LoraTag` of a ``lora``/``lyco`` :class:`ExtraNetworkTag`; bad numbers raise ValueError."""
    positional, named = tag.positional, tag.named
    try:
        te = float(named.get("te", positional[1] if len(positional) > 1 else 1.0))
        unet = float(named.get("unet", positional[2] if len(positional) > 2 else te))
        dyn = named.get("dyn", positional[3] if len(positional) > 3 else None)
        dyn = None if dyn is None else int(dyn)
    except ValueError:
        raise ValueError(f"{tag.text}: the weights must be numbers, as in <lora:name:0.8> or "
                         f"<lora:name:te_weight:unet_weight>.") from None
    if not (positional and positional[0]) or not math.isfinite(te) or not math.isfinite(unet):
        raise ValueError(f"{tag.text} needs a name and finite weights, as in <lora:name:0.8>.")
    return LoraTag(positional[0], te, unet, dyn, tag.text)


# -- 2. AND -------------------------------------------------------------------------------------

_AND = re.compile(r"\bAND\b")
_PART_WEIGHT = re.compile(r"^(.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$", re.S)


def split_and(prompt):
    """[(text, weight)] of the parts between ``AND``s; a part ending in ``:w`` has guidance weight w."""
    parts = []
    for part in _AND.split(prompt):
        text, weight = _PART_WEIGHT.match(part).groups()
        parts.append((text, 1.0 if weight is None else float(weight)))
    return parts


# -- 3. prompt editing and alternation ----------------------------------------------------------

# [WHITESPACE] SIGNED_NUMBER [WHITESPACE] "]" after the last ":" of [from:to:when]
_WHEN = re.compile(r"\s*([+-]?(?:\d+[eE][+-]?\d+|(?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?|\d+))\s*\]")
_SPECIAL = "\\[]():|"


@dataclass(frozen=True)
class _Edit:
    """``[before:after:when]``: before up to step ``when``, after from then on."""

    before: tuple
    after: tuple
    when: str  # the number as written: with a "." it is a fraction of the steps


@dataclass(frozen=True)
class _Alternation:
    """``[a|b|...]``: option (step - 1) mod n at each step."""

    options: tuple


class _ScheduleParser:
    """Recursive descent over A1111's prompt-editing grammar (its lark grammar in ``prompt_parser.py``).

    Inside brackets every ``(`` ``[`` must close; at the top level a bracket or colon that closes
    nothing is kept as text, and a ``[`` that opens a well-formed edit, alternation or group is
    read as one (as A1111's parser prefers). A ``|`` outside ``[a|b]``, or a backslash that
    escapes nothing, makes the prompt unreadable: A1111 then uses the text unchanged.
    """

    def __init__(self, text):
        self.s = text

    def parse(self):
        """The items of the whole text (str, _Edit, _Alternation), or None when it does not parse."""
        s, items, i = self.s, [], 0
        while True:
            got, i = self.prompt(i)
            items += got
            if i == len(s):
                return tuple(items)
            if s[i] in "|\\":
                return None
            items.append(s[i])  # a stray bracket or colon
            i += 1

    def prompt(self, i):
        """Items from i up to the first character no item can start with; returns (items, end)."""
        s, items = self.s, []
        while i < len(s) and s[i] not in "]):|":
            if s[i] in "([":
                got = self.group(i)
                if got is None:
                    break
                group, i = got
                items += group
            else:
                j = self.plain_end(i)
                if j == i:
                    break
                items.append(s[i:j])
                i = j
        return items, i

    def plain_end(self, i):
        """End of the plain text at i: anything but the special characters, or a backslash and one more."""
        s = self.s
        while i < len(s):
            if s[i] == "\\":
                if i + 1 == len(s) or s[i + 1] == "\n":
                    break
                i += 2
            elif s[i] in _SPECIAL:
                break
            else:
                i += 1
        return i

    def group(self, i):
        """(items, end) of the bracketed group at i, or None when it is not well formed."""
        s = self.s
        inner, j = self.prompt(i + 1)
        at = s[j] if j < len(s) else ""
        if s[i] == "(":
            if at == ")":
                return ["(", *inner, ")"], j + 1
            if at == ":":
                second, k = self.prompt(j + 1)
                if k < len(s) and s[k] == ")":
                    return ["(", *inner, ":", *second, ")"], k + 1
            return None
        if at == "]":
            return ["[", *inner, "]"], j + 1
        if at == "|":
            return self.alternation(inner, j)
        if at == ":":
            return self.edit(inner, j)
        return None

    def alternation(self, first, j):
        s, options = self.s, [tuple(first)]
        while j < len(s) and s[j] == "|":
            option, j = self.prompt(j + 1)
            options.append(tuple(option))
        if j < len(s) and s[j] == "]":
            return [_Alternation(tuple(options))], j + 1
        return None

    def edit(self, first, j):
        """``[first:when]`` or ``[first:second:when]``, the ":" after ``first`` being at j."""
        s = self.s
        when = _WHEN.match(s, j + 1)
        if when:
            return [_Edit((), tuple(first), when.group(1))], when.end()
        second, k = self.prompt(j + 1)
        when = _WHEN.match(s, k + 1) if k < len(s) and s[k] == ":" else None
        if when:
            return [_Edit(tuple(first), tuple(second), when.group(1))], when.end()
        return None


def _edit_step(when, steps, int_offset, fraction_offset, use_old_scheduling):
    """The last step of an edit's "before" text (A1111: a number with "." is a fraction of the steps)."""
    v = float(when)
    if use_old_scheduling:
        v = v * steps if v < 1 else v
    elif "." in when:
        v = (v - fraction_offset) * steps
    else:
        v = v - int_offset
    return int(max(min(v, steps), -1))  # below 1 never holds the "before" text; -1 keeps int() finite


def _visit(items, on_edit, on_alternation):
    for item in items:
        if isinstance(item, _Edit):
            on_edit(item)
            _visit(item.before + item.after, on_edit, on_alternation)
        elif isinstance(item, _Alternation):
            on_alternation(item)
            for option in item.options:
                _visit(option, on_edit, on_alternation)


def _text_at(items, step, ends):
    """The text of the items at one step; ``ends`` maps each edit to its last "before" step."""
    out = []
    for item in items:
        if isinstance(item, _Edit):
            out.append(_text_at(item.before if step <= ends[id(item)] else item.after, step, ends))
        elif isinstance(item, _Alternation):
            out.append(_text_at(item.options[(step - 1) % len(item.options)], step, ends))
        else:
            out.append(item)
    return "".join(out)


def has_schedule(prompt):
    """True when the prompt holds prompt editing or alternation (its text then depends on the step)."""
    items, found = _ScheduleParser(prompt).parse(), []
    _visit(items or (), found.append, found.append)
    return bool(found)


def prompt_schedule(prompt, steps, hires_steps=None, use_old_scheduling=False):
    """[(end_at_step, text)]: the text in force up to each step, as A1111 schedules a prompt.

    ``[from:to:when]``: ``when`` with a "." is a fraction of ``steps`` (0.5 -> steps // 2), else a
    step number; ``[a|b]`` changes every step. Steps count from 1 and the last entry ends at
    ``steps``. ``hires_steps``: the schedule of A1111's hires-fix pass, where whole numbers count
    on from ``steps`` and fractions from 1.0; ``use_old_scheduling``: A1111's setting of that name
    (numbers below 1 are fractions). A prompt that does not parse is one entry, unchanged.
    """
    items = _ScheduleParser(prompt).parse()
    int_offset, fraction_offset = 0, 0.0
    if hires_steps is not None and not use_old_scheduling:
        int_offset, fraction_offset, steps = steps, 1.0, hires_steps
    if items is None:
        return [(steps, prompt)]
    ends, at = {}, {steps}

    def on_edit(edit):
        ends[id(edit)] = _edit_step(edit.when, steps, int_offset, fraction_offset, use_old_scheduling)
        if ends[id(edit)] >= 1:
            at.add(ends[id(edit)])

    def on_alternation(_):
        at.update(range(1, steps + 1))

    _visit(items, on_edit, on_alternation)
    return [(step, _text_at(items, step, ends)) for step in sorted(at)]


# -- 4. emphasis and BREAK ----------------------------------------------------------------------

_EMPHASIS = re.compile(r"""
      \\[()\[\]\\]            # an escaped bracket or backslash: that character
    | \\                      # a backslash before anything else: dropped
    | [(\[]                   # opens a group
    | :\s*([+-]?[.\d]+)\s*\)  # closes a ( group with an explicit weight
    | [)\]]                   # closes a group
    | [^\\()\[\]:]+           # text
    | :                       # a colon outside (x:w)
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_emphasis(text):
    """[(text, weight)] pieces of one prompt text, as A1111's ``parse_prompt_attention``.

    ``(x)`` multiplies x's weight by 1.1, ``[x]`` divides it by 1.1, ``(x:w)`` multiplies it by w;
    nesting multiplies; brackets still open at the end close there; ``\\(`` ``\\)`` ``\\[`` ``\\]``
    ``\\\\`` are the characters themselves. A ``BREAK`` word becomes the piece :data:`BREAK`;
    inside brackets that piece is weighted too, and then (as in A1111) it no longer ends a chunk
    but is encoded as the word with its negative weight. Neighbouring pieces of equal weight are
    joined.
    """
    pieces, opened = [], {"(": [], "[": []}

    def scale(start, factor):
        for k in range(start, len(pieces)):
            pieces[k][1] *= factor

    for match in _EMPHASIS.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token in "([":
            opened[token].append(len(pieces))
        elif weight is not None and opened["("]:
            scale(opened["("].pop(), _weight(weight, text))
        elif token == ")" and opened["("]:
            scale(opened["("].pop(), ROUND)
        elif token == "]" and opened["["]:
            scale(opened["["].pop(), SQUARE)
        else:
            for k, part in enumerate(_BREAK.split(token)):
                if k:
                    pieces.append(list(BREAK))
                pieces.append([part, 1.0])
    for start in opened["("]:
        scale(start, ROUND)
    for start in opened["["]:
        scale(start, SQUARE)
    merged = []
    for piece in pieces or [["", 1.0]]:
        if merged and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [tuple(p) for p in merged]


def _weight(text, prompt):
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"({text}) in the prompt {prompt!r} has a weight that is not a number; write "
                         f"(word:1.2), or \\( \\) for literal brackets.") from None
