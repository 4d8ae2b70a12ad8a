"""Shared fixtures: tiny Gemma 4 checkpoints written by HF transformers itself."""

from __future__ import annotations

import os

# Tests run on MLX's CPU backend and must not depend on a GPU being present.
os.environ.setdefault("GEMMA4_MLX_TEST", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    config.addinivalue_line("markers", "reference: needs transformers + torch (the numerical reference)")
