"""`diffattn bench layout`: FICGen's layout accuracy and step overhead (the code is `diffattn.pipelines.ficgen_bench`,
next to the layout pipeline and the training entry point it measures)."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from ..pipelines.ficgen_bench import main as run

    return run(argv)
