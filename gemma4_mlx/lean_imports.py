"""Keep PyTorch out of a command that never uses it.

mlx-lm's tokenizer loading imports transformers, and transformers imports PyTorch whenever it is
installed (``modeling_rope_utils`` asks ``is_torch_available()`` at import time), and torchvision,
which imports PyTorch, whenever that is installed (``image_utils``, reached from the tokenizer
path through ``type_validators``: 8 of the GPU machine's 14 s of imports). Nothing on the
path of ``generate``, ``chat`` or ``serve`` uses PyTorch, yet importing it is about half of a
command's start-up on the CI machine (0.9 s of mlx-lm's 1.9 s import; PyTorch's CUDA build is
larger). Telling transformers, before it imports anything else, that PyTorch is absent removes
that cost; tokenizers, chat templates and the rest of what these commands use do not depend on it.

Only the CLI calls this, in its own process, before anything imported transformers: a Python
program that imports gemma4_mlx keeps transformers as it is. ``GEMMA4_MLX_TORCH=1`` turns it off.
"""

from __future__ import annotations

import os
import re
import sys
import types

# transformers' probes for PyTorch and what comes with it (torchvision, torchaudio, torchcodec,
# torchao and the device checks import PyTorch once they answer yes): is_torch*_available
TORCH_PROBE = re.compile(r"is_torch\w*_available")


def keep_torch_out() -> bool:
    """Make transformers see no PyTorch in this process; True if it took effect. Does nothing if
    transformers or PyTorch is already imported, if ``GEMMA4_MLX_TORCH`` is ``1``, or if
    transformers is missing or has no ``is_torch_available`` where expected."""
    if os.environ.get("GEMMA4_MLX_TORCH", "").strip().lower() in ("1", "on", "true", "yes"):
        return False
    if any(name == "torch" or name.startswith(("torch.", "transformers")) for name in sys.modules):
        return False
    try:
        from transformers.utils import import_utils
    except Exception:  # noqa: BLE001 - no transformers (or a broken one): mlx-lm will say so itself
        return False
    originals = {name: f for name, f in vars(import_utils).items() if TORCH_PROBE.fullmatch(name) and callable(f)}
    if "is_torch_available" not in originals or "torch" in sys.modules:
        return False

    def absent(*_args, **_kwargs) -> bool:
        return False

    # Modules imported by transformers' own __init__ bound the functions by name already. Read
    # their __dict__, never getattr: transformers' package modules are lazy, and an attribute
    # lookup on one imports whatever that name maps to.
    for name, module in list(sys.modules.items()):
        names = module.__dict__ if isinstance(module, types.ModuleType) else {}
        if not name.startswith("transformers"):
            continue
        for probe, original in originals.items():
            if names.get(probe) is original:
                names[probe] = absent
    return True
