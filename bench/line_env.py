"""The environment of one ablation line (bench/ablate.py): every switch any line sets, and the
fixed ones the lines' builds read, go back to the outer environment's value before a line's own
are set, so a switch one line sets never reaches another.

Session 33 found why that matters: ablate.py reset only a fixed list, so ``GEMMA4_MLX_INTS_AHEAD=0``
set by session 32's "ours -ints ahead" line stayed set when the "ours" line ran next; that line's
decoder saw its switches change, rebuilt itself without ``step_ints``, and both lines timed the same
step. Likewise ``GEMMA4_MLX_ATTN_SPLIT_KEYS=64`` reached the attention sweep's "rows" lines.
"""
from __future__ import annotations

import os
from typing import Dict, Iterable, Optional


class LineEnv:
    def __init__(self, envs: Iterable[Optional[Dict[str, str]]], always: Iterable[str] = ()):
        """``envs``: every line's switches (None or {} for none); ``always``: names reset for every
        line though no line sets them. The outer values are read now."""
        names = set(always) | {name for env in envs if env for name in env}
        self.outer = {name: os.environ.get(name) for name in sorted(names)}

    def use(self, env: Optional[Dict[str, str]]) -> None:
        """The outer environment for every name, then ``env``'s switches."""
        for name, value in self.outer.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        os.environ.update(env or {})
