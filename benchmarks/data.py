"""Offline dataset loaders for the natgrad training benchmark (no downloads, no torchvision).

* :func:`load_digits` -- scikit-learn's 8x8 handwritten digits (1,797 images, shipped inside the
  scikit-learn wheel), scaled to [0, 1] and split into a training and a held-out set.
* :func:`load_fashion_mnist` -- Fashion-MNIST from the Debian package ``dataset-fashion-mnist``
  (IDX files, gzipped or not, under ``/usr/share/datasets/fashion-mnist``), parsed with numpy.
  Another directory can be given with the ``NATGRAD_FASHION_MNIST_DIR`` environment variable.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_ENV = "NATGRAD_FASHION_MNIST_DIR"

# IDX type codes (third byte of the magic number) -> big-endian numpy dtypes.
_IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


@dataclass
class Split:
    """A supervised dataset split held in memory.

    Attributes:
        x: inputs, float32 ``[N, D]``.
        y: integer class labels ``[N]`` (int64).
    """

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return int(self.x.shape[0])


class DatasetMissingError(FileNotFoundError):
    """A dataset's files are not installed on this machine."""


def read_idx(path: str) -> np.ndarray:
    """Parses one IDX file (the MNIST format), gzip-compressed when ``path`` ends in ``.gz``.

    Layout: two zero bytes, a type code, the number of dimensions ``n``, then ``n`` big-endian
    uint32 sizes, then the data in C order.

    Raises:
        ValueError: if the header is malformed or the payload size does not match it.
    """
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (magic bytes {raw[:4]!r})")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes) but the payload "
                         f"has {len(raw) - header} bytes")
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def _find_idx(stem: str, dirs: tuple[str, ...]) -> str:
    for d in dirs:
        for name in (stem, stem + ".gz"):
            path = os.path.join(d, name)
            if os.path.isfile(path):
                return path
    raise DatasetMissingError(
        f"Fashion-MNIST file {stem}[.gz] not found in {', '.join(dirs)}. Install the Debian "
        f"package with `apt-get install dataset-fashion-mnist` (scripts/env.sh does this), or "
        f"point {FASHION_MNIST_ENV} at a directory holding the four IDX files.")


def fashion_mnist_dirs() -> tuple[str, ...]:
    """Directories searched for the Fashion-MNIST IDX files, in order."""
    env = os.environ.get(FASHION_MNIST_ENV)
    return ((env,) if env else ()) + FASHION_MNIST_DIRS


def load_fashion_mnist(train_size: int | None = None, test_size: int | None = None,
                       seed: int = 0) -> tuple[Split, Split]:
    """Fashion-MNIST as flattened float32 images in [0, 1] (``[N, 784]``) with labels.

    Args:
        train_size, test_size: if given, a random subset of that many images (drawn with
            ``seed``, the same subset every call); None keeps all 60,000 / 10,000.
        seed: seed of the subset draw.

    Raises:
        DatasetMissingError: if the package ``dataset-fashion-mnist`` is not installed.
    """
    dirs = fashion_mnist_dirs()
    splits = []
    for prefix, size in (("train", train_size), ("t10k", test_size)):
        images = read_idx(_find_idx(f"{prefix}-images-idx3-ubyte", dirs))
        labels = read_idx(_find_idx(f"{prefix}-labels-idx1-ubyte", dirs))
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"Fashion-MNIST {prefix}: {images.shape[0]} images but "
                             f"{labels.shape[0]} labels")
        x = torch.from_numpy(images.reshape(images.shape[0], -1).astype(np.float32) / 255.0)
        y = torch.from_numpy(labels.astype(np.int64))
        if size is not None and size < len(y):
            idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:size]
            x, y = x[idx], y[idx]
        splits.append(Split(x.contiguous(), y.contiguous()))
    return splits[0], splits[1]


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> tuple[Split, Split]:
    """scikit-learn's digits (8x8 images, 10 classes) scaled to [0, 1] (``[N, 64]``).

    Args:
        test_fraction: share of the 1,797 images held out (a seeded random permutation).
        seed: seed of the split.

    Raises:
        ImportError: if scikit-learn is not installed (``pip install scikit-learn``).
    """
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the digits task needs scikit-learn: pip install scikit-learn") from e
    bunch = _sk_load_digits()
    x = torch.from_numpy(np.asarray(bunch.data, dtype=np.float32) / 16.0)
    y = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(y)))
    test, train = perm[:n_test], perm[n_test:]
    return Split(x[train].contiguous(), y[train].contiguous()), Split(x[test].contiguous(),
                                                                      y[test].contiguous())
