"""The one unpickling allow-list: the globals a pickle of numeric arrays and containers needs.

Plain ``pickle.load`` runs whatever callable a file names (``os.system``...), and ``.pkl`` volumes,
checkpoints and cache files may come from anyone. ``sam3d.data.io`` reads ``.pkl`` volumes with an
unpickler that finds only ``ARRAY_PICKLE_GLOBALS``; ``torch.load(weights_only=True)`` (checkpoints,
MONAI's PersistentDataset cache) is given the numpy part with :func:`torch_safe_globals`.
"""

from __future__ import annotations

import collections
import pickle

import numpy as np

__all__ = ["ARRAY_PICKLE_GLOBALS", "torch_safe_globals"]


def _latin1_encode(text: str, encoding: str) -> bytes:
    """``_codecs.encode`` as pickle protocols 0-2 use it for bytes (latin-1 only)."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], object]:
    """(module, name) -> object for every global a pickle of numeric arrays and containers needs."""
    # The reconstructors are taken from numpy's own __reduce__ so this works whichever module path the
    # installed numpy uses; files written by numpy 1.x name `numpy.core`, numpy 2 names `numpy._core`.
    reconstruct = np.empty(0).__reduce__()[0]
    frombuffer = np.empty(0).__reduce_ex__(5)[0]
    scalar = np.float64(0).__reduce__()[0]
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("_codecs", "encode"): _latin1_encode,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    for code in np.typecodes["AllInteger"] + np.typecodes["AllFloat"] + "?":
        dtype_class = type(np.dtype(code))  # numpy.dtypes.Float32DType etc.
        allowed[("numpy.dtypes", dtype_class.__name__)] = dtype_class
    return allowed


ARRAY_PICKLE_GLOBALS = _allowed_globals()


def torch_safe_globals(*extra: object) -> list:
    """The numpy entries as ``torch.serialization.safe_globals`` takes them (object, "module.name"),
    plus ``extra`` classes (argparse.Namespace for checkpoints, MONAI's TraceKeys for the cache)."""
    numpy_entries = [(obj, f"{m}.{n}") for (m, n), obj in ARRAY_PICKLE_GLOBALS.items() if m.startswith("numpy")]
    return [*extra, *numpy_entries]
