"""Helpers for tests/test_metal_compile.py: capture the Metal source MLX
generates (without a Mac) and syntax-check it with g++ against metal_stub.h."""
