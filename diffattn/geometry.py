"""Token geometry shared by masks, methods and adapters (DESIGN.md layer 2): the grid of the video/image stream."""

from __future__ import annotations

from typing import NamedTuple


class TokenGrid(NamedTuple):
    """Token grid of the video/image stream after patchify: frames, height, width (images have frames=1)."""

    frames: int
    height: int
    width: int

    @property
    def num_tokens(self) -> int:
        return self.frames * self.height * self.width

    @property
    def tokens_per_frame(self) -> int:
        return self.height * self.width
