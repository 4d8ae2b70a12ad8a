"""Run any mlx-lm command (``generate``, ``chat``, ``server``, ``lora``, ``fuse``, ``cache_prompt``,
``evaluate``, ...) with this package's Gemma 4 model: ``gemma4-mlx mlx-lm <command> [args]``.

mlx-lm builds a checkpoint's model from the module ``mlx_lm.models.<model_type>`` named by its
``config.json``; for Gemma 4 (``gemma4`` and ``gemma4_text``) that is mlx-lm's stock model.
:func:`use_gemma4_mlx` registers modules under those two names whose ``Model`` and ``ModelArgs``
are this package's: mlx-lm's loader then builds :class:`gemma4_mlx.model.Model` through
``Model(ModelArgs.from_dict(config))``, ``model.sanitize(weights)``, its quantization and
``load_weights``, and everything mlx-lm does with the model afterwards (LoRA layers, training,
fusing, saving, prompt caches, serving) happens on this implementation. Checkpoints of other
model types are untouched. The command line is mlx-lm's own, flags and behaviour included
(so, unlike ``gemma4-mlx generate``, its tokenizer wrapper turns Gemma 4's thinking on by
default).
"""

from __future__ import annotations

import contextlib
import sys
import types
from typing import Iterator, List, Sequence

GEMMA4_MODULES = ("mlx_lm.models.gemma4", "mlx_lm.models.gemma4_text")


def _module(name: str) -> types.ModuleType:
    from .config import ModelArgs
    from .model import Model

    module = types.ModuleType(name, f"gemma4_mlx's Gemma 4 model, registered as {name} for mlx-lm's loader.")
    module.Model = Model
    module.ModelArgs = ModelArgs
    return module


@contextlib.contextmanager
def use_gemma4_mlx() -> Iterator[None]:
    """Within the block, mlx-lm loads Gemma 4 checkpoints as :class:`gemma4_mlx.model.Model`, and
    its ``generate_step`` writes such a model's prompt chunks as this package's generation does
    (:func:`gemma4_mlx.prompt_fill.in_mlx_lm`)."""
    import gemma4_mlx.model  # noqa: F401  (imports what it uses of stock mlx-lm first)
    from .prompt_fill import in_mlx_lm

    saved = {name: sys.modules.get(name) for name in GEMMA4_MODULES}
    for name in GEMMA4_MODULES:
        sys.modules[name] = _module(name)
    try:
        with in_mlx_lm():
            yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def run(argv: Sequence[str]) -> None:
    """``mlx_lm <argv>`` (``argv[0]`` is the command) with this package's Gemma 4 model."""
    import mlx_lm.cli

    old = sys.argv
    sys.argv = ["mlx_lm"] + list(argv)
    try:
        with use_gemma4_mlx():
            mlx_lm.cli.main()
    finally:
        sys.argv = old


def commands() -> List[str]:
    """mlx-lm's command names, as its ``mlx_lm`` entry point lists them."""
    import io
    import re
    from contextlib import redirect_stdout

    import mlx_lm.cli

    out = io.StringIO()
    old = sys.argv
    sys.argv = ["mlx_lm", "--help"]
    try:
        with redirect_stdout(out):
            mlx_lm.cli.main()
    finally:
        sys.argv = old
    return re.findall(r"'([a-z_]+)'", out.getvalue())
