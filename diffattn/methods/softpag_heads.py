"""SoftPAG's `heads` option: which (layer, head) pairs are perturbed. Strings ("L11H15,L1H10", "L5", "L60-L69",
"all", presets such as "sd3:golden-hour"), dicts and lists parse into one `HeadSpec`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .softpag_presets import get_preset

__all__ = ["HeadSpec", "parse_heads"]


@dataclass(frozen=True)
class HeadSpec:
    """Parsed `heads`: per layer a tuple of heads, or None for all heads of that layer; `all_layers` for "all"."""

    layers: dict[int, tuple[int, ...] | None]
    all_layers: bool = False
    families: frozenset[str] = frozenset()

    def heads_of(self, layer: int) -> tuple[int, ...] | None | bool:
        """Heads of `layer`: a tuple, None (all heads) or False (layer not chosen)."""
        if self.all_layers:
            return None
        if layer not in self.layers:
            return False
        return self.layers[layer]


_ITEM = re.compile(r"^L(\d+)(?:H(\d+))?$", re.IGNORECASE)
_RANGE = re.compile(r"^L(\d+)-L?(\d+)$", re.IGNORECASE)


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) and not (isinstance(value, str) and value.isdigit()):
        raise ValueError(f"option 'heads' of method 'softpag': {what} must be a non-negative int, got {value!r}")
    value = int(value)
    if value < 0:
        raise ValueError(f"option 'heads' of method 'softpag': {what} must be >= 0, got {value}")
    return value


def parse_heads(spec: Any) -> HeadSpec:
    """Parse `heads`: `"L11H15,L1H10"`, `"L5"` (all heads of layer 5), `"L60-L69"` (all heads of those layers),
    `"all"`, presets (`"sd3:golden-hour"`),
    mixes of these separated by commas, a dict `{layer: [head, ...] | "all"}`, or a list of `(layer, head)` pairs
    and/or such strings. Raises `ValueError` naming what is accepted."""
    accepted = (
        "expected a string like 'L11H15,L1H10', 'L5' (all heads of layer 5), 'all' or a preset 'sd3:golden-hour', "
        "a dict {layer: [heads] | 'all'}, or a list of (layer, head) pairs"
    )
    layers: dict[int, set[int] | None] = {}
    families: set[str] = set()
    all_layers = False

    def add(layer: int, head: int | None) -> None:
        if head is None:
            layers[layer] = None
        elif layers.get(layer, set()) is not None:
            layers.setdefault(layer, set()).add(head)  # type: ignore[union-attr]

    def add_string(text: str) -> None:
        nonlocal all_layers
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise ValueError(f"option 'heads' of method 'softpag' got an empty string; {accepted}")
        for item in items:
            if item.lower() == "all":
                all_layers = True
            elif ":" in item:
                family, heads = get_preset(item)
                families.add(family)
                for layer, head in heads:
                    add(layer, head)
            elif _RANGE.match(item):
                first, last = (int(g) for g in _RANGE.match(item).groups())
                if last < first:
                    raise ValueError(f"option 'heads' of method 'softpag': empty layer range {item!r}")
                for layer in range(first, last + 1):
                    add(layer, None)
            else:
                match = _ITEM.match(item)
                if match is None:
                    raise ValueError(f"option 'heads' of method 'softpag': cannot parse {item!r}; {accepted}")
                add(int(match.group(1)), None if match.group(2) is None else int(match.group(2)))

    if spec is None:
        raise ValueError(f"option 'heads' of method 'softpag' is required; {accepted}")
    if isinstance(spec, str):
        add_string(spec)
    elif isinstance(spec, dict):
        if not spec:
            raise ValueError(f"option 'heads' of method 'softpag' got an empty dict; {accepted}")
        for key, value in spec.items():
            layer = _int(key, "a layer index")
            if value is None or (isinstance(value, str) and value.lower() == "all"):
                add(layer, None)
            elif isinstance(value, (list, tuple, set)):
                if not value:
                    raise ValueError(f"option 'heads' of method 'softpag': layer {layer} has an empty head list")
                for head in value:
                    add(layer, _int(head, "a head index"))
            else:
                add(layer, _int(value, "a head index"))
    elif isinstance(spec, (list, tuple)):
        if not spec:
            raise ValueError(f"option 'heads' of method 'softpag' got an empty list; {accepted}")
        for item in spec:
            if isinstance(item, str):
                add_string(item)
            elif isinstance(item, (list, tuple)) and len(item) == 2:
                add(_int(item[0], "a layer index"), _int(item[1], "a head index"))
            else:
                raise ValueError(f"option 'heads' of method 'softpag': cannot use {item!r}; {accepted}")
    else:
        raise ValueError(f"option 'heads' of method 'softpag' got {type(spec).__name__}; {accepted}")
    frozen = {layer: None if heads is None else tuple(sorted(heads)) for layer, heads in layers.items()}
    return HeadSpec(frozen, all_layers, frozenset(families))
