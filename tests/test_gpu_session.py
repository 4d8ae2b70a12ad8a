"""bench/gpu_session.sh picks lines of bench/ablate.py and bench/prefill_ablate.py by name
(CONFIGS="stock,ours,..."), and each keeps only the names it knows: a mistyped one would drop its
line from a device visit without a word. Every name the script asks for must be one that the
script it runs defines."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _defined():
    step = set(re.findall(r'\(\s*"([^"]+)",\s*(?:None|\{|off\()', (ROOT / "bench" / "ablate.py").read_text()))
    prefill = set(re.findall(r'^\s*"([^"]+)":\s*\(', (ROOT / "bench" / "prefill_ablate.py").read_text(), re.M))
    assert {"stock", "ours", "ours -resnorm", "ours +mv"} <= step, step
    assert {"stock", "ours", "ours no overlap", "ours kernels off"} <= prefill, prefill
    return {"bench/ablate.py": step, "bench/prefill_ablate.py": prefill}


def test_every_ablation_line_the_session_script_asks_for_exists():
    defined = _defined()
    script = (ROOT / "bench" / "gpu_session.sh").read_text()
    asked = 0
    for m in re.finditer(r'CONFIGS="(?:\$\{CONFIGS:-)?([^"$}]+)\}?"', script):
        # the script the listing feeds: the first of the two named after it
        rest = script[m.end():]
        runs = min((rest.find(s), s) for s in defined if rest.find(s) >= 0)[1]
        names = {n.strip() for n in m.group(1).split(",")}
        assert names - defined[runs] == set(), (runs, names - defined[runs])
        asked += 1
    assert asked, "no CONFIGS lists found in gpu_session.sh"
