"""bench/floor.py: the bytes one decode token reads, from the model's shapes."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("floor", Path(__file__).parents[1] / "bench" / "floor.py")
floor = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(floor)


def test_e2b_bf16_reads_about_4_5_gb():
    parts = floor.token_bytes("e2b", 16)
    # ~4.4 GB measured by hand in baseline-h100.md; the tied head is the 262144 x 1536 table
    assert 4.3e9 < parts["total"] < 4.8e9
    assert parts["head"] == 262144 * 1536 * 2
    assert parts["experts"] == 0


@pytest.mark.parametrize("family", ["e2b", "26b-a4b"])
def test_fewer_bits_fewer_bytes_and_moe_reads_its_top_k_share(family):
    sizes = [floor.token_bytes(family, bits)["total"] for bits in (16, 8, 4)]
    assert sizes[0] > sizes[1] > sizes[2]
    if family == "26b-a4b":
        experts = floor.token_bytes(family, 16)["experts"]
        # 3 expert matrices of 704 x 2816 per layer, 8 of 128 experts, 30 layers, bf16
        assert experts == pytest.approx(30 * 3 * 704 * 2816 * 2 * 8, rel=1e-9)


def test_measured_rate_is_set_against_the_floor(capsys):
    assert floor.main(["--families", "e2b", "--measured", "e2b:bf16:100"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("e2b") and "bf16" in line)
    assert "100.0" in row and "%" in row
