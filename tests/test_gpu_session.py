"""bench/gpu_session.sh picks lines of bench/ablate.py by name (CONFIGS="stock,ours,..."), and
ablate.py keeps only the names it knows: a mistyped one would drop its line from a device visit
without a word. Every name the script asks for must be one ablate.py defines."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_ablation_line_the_session_script_asks_for_exists():
    defined = set(re.findall(r'\(\s*"([^"]+)",\s*(?:None|\{|off\()', (ROOT / "bench" / "ablate.py").read_text()))
    assert {"stock", "ours", "ours -resnorm", "ours +mv"} <= defined, defined
    script = (ROOT / "bench" / "gpu_session.sh").read_text()
    asked = {name.strip() for listing in re.findall(r'CONFIGS="(?:\$\{CONFIGS:-)?([^"$}]+)\}?"', script) for name in listing.split(",")}
    assert asked, "no CONFIGS lists found in gpu_session.sh"
    assert asked - defined == set()
