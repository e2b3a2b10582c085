"""Read data pickles (CIFAR's python batches) without running code from them.

A pickle may name any importable callable, and unpickling calls it: a crafted file runs whatever it
likes. ``load_data_pickle`` rebuilds only dicts, lists, tuples, bytes, strings, numbers, booleans and
numpy arrays/scalars; any other global is an UnsafePickleError naming the file and the global.
"""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from codeq.errors import ConfigError


class UnsafePickleError(ConfigError):
    """A pickle asked for something other than plain data; nothing it names was called."""


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as Python 3 uses it to pickle bytes at protocols < 3 (latin-1 only)."""
    if codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin-1")


# numpy's own reduce functions, looked up from live objects: their module is numpy.core in numpy 1 files
# and numpy._core in numpy 2 files, and both spellings must reach the same function.
_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]
_SCALAR = np.float64(0).__reduce__()[0]
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("_codecs", "encode"): _latin1_encode,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **{(f"numpy.{core}.multiarray", "_reconstruct"): _RECONSTRUCT for core in ("core", "_core")},
    **{(f"numpy.{core}.multiarray", "scalar"): _SCALAR for core in ("core", "_core")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): _FROMBUFFER for core in ("core", "_core")},
}


class _DataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which is not plain data") from None


def load_data_pickle(path: Path, encoding: str = "bytes") -> Any:
    """Unpickle ``path`` allowing plain data and numpy arrays only (``encoding`` as for ``pickle.load``)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _DataUnpickler(f, encoding=encoding).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsafePickleError(f"{path} is not a plain data pickle ({reason}); refusing to load it") from None
