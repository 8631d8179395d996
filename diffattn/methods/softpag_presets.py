"""Named head sets found by HeadHunter (Ahn et al., arXiv 2506.10978, §2.3 of the method notes), for `softpag`.

A preset is addressed as `"<family>:<name>"` (e.g. `heads="sd3:golden-hour"`). Heads are `(layer, head)` with the
paper's 0-indexed transformer blocks, which are diffattn's layer indices (SD3: `transformer_blocks`; FLUX: the 19
double-stream blocks, then the 38 single-stream blocks). A preset belongs to one family (one checkpoint): its heads
mean nothing on another model, so applying an `sd3:` preset to FLUX is an error.

The FLUX pairs come from the paper's figure labels (pairing inferred from Fig. 35); SD3's from the text and Figs.
3, 34 and 36.
"""

from __future__ import annotations

Head = tuple[int, int]

PRESETS: dict[str, dict[str, tuple[Head, ...]]] = {
    "sd3": {
        "shearing": ((11, 15),),
        "lighting": ((1, 10),),
        "shearing-lighting": ((11, 15), (1, 10)),
        "dark": ((1, 2), (1, 10)),
        "white": ((0, 15), (1, 19)),
        "golden-hour": ((18, 11), (0, 17), (2, 3)),
        "shadow": ((13, 17),),
        "blue": ((0, 23),),
        "red": ((0, 3),),
        "horizontal-banding": ((16, 3),),
    },
    "flux": {
        "golden-hour": ((38, 18),),
        "glossy": ((43, 17),),
        "green-filter": ((52, 12),),
        "cool-tone": ((52, 6),),
        "bokeh": ((34, 0),),
        "warm-red": ((52, 22),),
        "vintage-film": ((51, 23),),
    },
}


def preset_names() -> list[str]:
    """All preset names as `family:name`."""
    return [f"{family}:{name}" for family, table in PRESETS.items() for name in table]


def get_preset(spec: str) -> tuple[str, tuple[Head, ...]]:
    """`(family, heads)` of `"family:name"`; `ValueError` listing the presets when unknown."""
    family, _, name = spec.partition(":")
    family, name = family.strip().lower(), name.strip().lower()
    if family not in PRESETS or name not in PRESETS[family]:
        raise ValueError(f"unknown softpag head preset {spec!r}; known presets: {', '.join(preset_names())}")
    return family, PRESETS[family][name]
