"""The errors a user sees in one line: reading a checkpoint, and writing one."""

from __future__ import annotations


class LoadError(RuntimeError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be written (bad arguments, existing target, ...)."""
