"""Which modules a stage touches: decoder-layer specs (all, last:N, first:N, ranges) and targets."""
from __future__ import annotations

import re

from torch import nn

from dowser_cli.errors import UserError

TARGETS = {
    # a linear inside a decoder layer belongs to a target when a part of its path matches
    "attn": re.compile(r"(^|\.)(self_attn|attn|attention|self_attention)(\.|$)"),
    "mlp": re.compile(r"(^|\.)(mlp|feed_forward|ffn)(\.|$)"),
}


DEFAULT_LAYERS = "last:20"  # the paper's (20 of LLaVA's 32); all layers on models with fewer


def default_layers(num_layers: int) -> str:
    """The paper's last 20 decoder layers, or all of them on a model with fewer."""
    return DEFAULT_LAYERS if num_layers >= 20 else "all"


def parse_layers(spec: str, num_layers: int, option: str = "--layers") -> list[int]:
    """'all' | 'last:N' | 'first:N' | '0-3,7,10-12' -> sorted layer indices (0-based)."""
    spec = str(spec).strip()
    if spec == "all":
        return list(range(num_layers))
    m = re.fullmatch(r"(last|first):(\d+)", spec)
    if m:
        n = int(m.group(2))
        if not 1 <= n <= num_layers:
            raise UserError(f"{option} {spec}: the model has {num_layers} decoder layers")
        return list(range(num_layers - n, num_layers)) if m.group(1) == "last" else list(range(n))
    out: set[int] = set()
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise UserError(f"{option} {spec!r}: expected all, last:N, first:N or ranges like 0-3,7")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if lo > hi or hi >= num_layers:
            raise UserError(f"{option} {spec}: layer {hi} out of range (the model has layers 0-{num_layers - 1})")
        out.update(range(lo, hi + 1))
    return sorted(out)


def parse_targets(spec: str, option: str = "--targets") -> list[str]:
    names = [t.strip() for t in str(spec).split(",") if t.strip()]
    bad = [t for t in names if t not in TARGETS]
    if bad or not names:
        raise UserError(f"{option} {spec!r}: unknown target(s) {', '.join(bad) or '(none)'}; "
                        f"available: {', '.join(TARGETS)}")
    return names


def decoder_linears(model: nn.Module, layers_path: str, layers: list[int], targets: list[str]) -> dict[str, nn.Linear]:
    """Runtime name -> nn.Linear for the targeted linears of the chosen decoder layers."""
    stack = model.get_submodule(layers_path)
    found: dict[str, nn.Linear] = {}
    for i in layers:
        for sub, mod in stack[i].named_modules():
            if isinstance(mod, nn.Linear) and any(TARGETS[t].search(sub) for t in targets):
                found[f"{layers_path}.{i}.{sub}"] = mod
    return found


def layer_of(name: str, layers_path: str) -> int | None:
    """Decoder layer index of a runtime module name, or None outside the decoder stack."""
    m = re.match(re.escape(layers_path) + r"\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def format_ranges(xs: list[int]) -> str:
    """Sorted layer indices as `--layers` spells them: [0, 1, 2, 7] -> "0-2,7" (parse_layers' inverse)."""
    out, start = [], None
    for i, x in enumerate(xs):
        if start is None:
            start = x
        if i + 1 == len(xs) or xs[i + 1] != x + 1:
            out.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ",".join(out)
