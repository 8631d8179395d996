"""Attention methods: each one a config dataclass and an `AttentionMethod`."""
