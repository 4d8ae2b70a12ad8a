"""bench/step_profile.py --read: ncu's CSV cut into steps at the marker kernel, the median step's
launches grouped by kernel (and by kernel and grid size), our seeded symbols named from the log."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("step_profile", Path(__file__).parents[1] / "bench" / "step_profile.py")
step_profile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(step_profile)

HEADER = '"ID","Kernel Name","Grid Size","Metric Name","Metric Unit","Metric Value"\n'


def _row(i, name, grid, ns):
    return f'"{i}","{name}(float *)","({grid}, 1, 1)","gpu__time_duration.sum","nsecond","{ns:,}"\n'


def test_read_groups_the_median_step_by_kernel_and_by_grid(tmp_path, capsys):
    steps = []
    for scale in (1, 3, 2):  # the median step: the last (times x2)
        steps += [("gemma4_seed_00aa", 160, 7000 * scale), ("gemma4_seed_00aa", 16384, 189000 * scale),
                  ("gemma4_seed_00aa", 160, 7200 * scale), ("void mlx::copy_v<int>", 1, 3000 * scale),
                  ("mlx::core::cu::custom_kernel_step_marker", 1, 3000)]
    csv = tmp_path / "p.csv"
    csv.write_text("==PROF== Connected\n" + HEADER + "".join(_row(i, *r) for i, r in enumerate(steps)))
    log = tmp_path / "p.log"
    log.write_text("seed gemma4_seed_00aa custom_kernel_gemma4_qmv_bare\nnot a seed line\n")

    step_profile.read(str(csv), str(log))
    out = capsys.readouterr().out
    assert "3 marked steps" in out and "median step: 4 kernels, 412 us" in out  # (7 + 189 + 7.2 + 3) x 2
    qmv = next(ln for ln in out.splitlines() if ln.startswith("custom_kernel_gemma4_qmv_bare "))
    assert qmv.split()[1:3] == ["3", "406.4"], qmv  # (7.0 + 189.0 + 7.2) x 2 us, one line for all shapes

    step_profile.read(str(csv), str(log), by_grid=True)
    lines = capsys.readouterr().out.splitlines()
    head = next(ln for ln in lines if "(16384,1,1)" in ln)
    layers = next(ln for ln in lines if "qmv_bare (160,1,1)" in ln)
    assert head.split()[-3:] == ["1", "378.0", "378.00"], head
    assert layers.split()[-3:] == ["2", "28.4", "14.20"], layers
    assert any(ln.startswith("void mlx::copy_v<int> (1,1,1)") for ln in lines)
