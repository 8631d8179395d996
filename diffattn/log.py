"""The package logger and `log_once`, for decisions worth saying once per process (not once per layer and step)."""

from __future__ import annotations

import logging

logger = logging.getLogger("diffattn")
_logged: set[str] = set()


def log_once(key: str, message: str, *args) -> None:
    """Log a decision (e.g. running dense for a shape) once per process, not once per layer and step."""
    if key not in _logged:
        _logged.add(key)
        logger.info(message, *args)
