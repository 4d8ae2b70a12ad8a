"""Values derived from arrays, found again by those very arrays while they live.

Some kernel inputs are buffers made from a module's arrays: a 4/8-bit projection's words, scales and
biases packed in one (qmv.py's QPACK), a close's norm weights, scalar and eps (close_params.py). A
lookup must hand such a buffer over only for the very arrays it was made from: a replaced array (a new
object, as loading, LoRA or quantizing make) finds nothing, and an entry goes when one of its arrays is
collected. An in-place write into an array keeps its identity and is not seen.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any, Optional, Sequence


class ByIdentity:
    """A map from a tuple of arrays (None allowed in place of one) and hashable extras to a value."""

    def __init__(self):
        self._entries: dict = {}  # key -> (weak references to the arrays, the value, the entry's serial number)
        self._serials = itertools.count()

    @staticmethod
    def _key(arrays: Sequence, extra: tuple) -> tuple:
        return (*(None if a is None else id(a) for a in arrays), *extra)

    def get(self, arrays: Sequence, extra: tuple = ()) -> Optional[Any]:
        """The value put for these very arrays and extras, or None."""
        entry = self._entries.get(self._key(arrays, extra))
        if entry is None:
            return None
        refs, value, _ = entry
        if all((a is None and r is None) or (r is not None and r() is a) for r, a in zip(refs, arrays)):
            return value
        return None

    def put(self, arrays: Sequence, value: Any, extra: tuple = ()) -> None:
        """Keep ``value`` for these arrays and extras until one of the arrays is collected. The
        arrays' finalizers hold the entry's serial number, not the value: an array that outlives
        the others keeps no value alive."""
        key, serial = self._key(arrays, extra), next(self._serials)
        self._entries[key] = (tuple(None if a is None else weakref.ref(a) for a in arrays), value, serial)
        for a in arrays:
            if a is not None:
                weakref.finalize(a, self._drop, key, serial)

    def discard(self, arrays: Sequence, extra: tuple = ()) -> None:
        """Forget the value put for these very arrays and extras, if any."""
        if self.get(arrays, extra) is not None:
            del self._entries[self._key(arrays, extra)]

    def _drop(self, key: tuple, serial: int) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry[2] == serial:
            del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)
