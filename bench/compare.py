"""``python -m bench.compare [options]``: the same as ``gemma4-mlx compare [options]``.

Runs from the repository root without installing the package (as on the GPU machine, where
``PYTHONPATH`` holds the project root). The harness lives in :mod:`gemma4_mlx.bench`.
"""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))


def main(argv=None) -> None:
    import gemma4_mlx.commands.compare  # noqa: F401  (registers the command)
    from gemma4_mlx.commands import app

    args = list(sys.argv[1:] if argv is None else argv)
    app(args=["compare", *args], prog_name="python -m bench.compare", standalone_mode=True)


if __name__ == "__main__":
    main()
