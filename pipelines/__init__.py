"""Multi-pass generation built on diffattn: high-res, guidance, layout, long video, presets."""
