"""Blending datasets by weight: data-path parsing, the blending index and `BlendedDataset`.

A data path is a single prefix (`"runs/data/web_text_document"`), a list of prefixes, or a list
of weight/prefix pairs (`[0.7, "A", 0.3, "B"]`; weights may be numbers or numeric strings, and
need not sum to 1). `parse_data_path` turns any of these into `[(weight or None, prefix)]`.

`blending_indices(weights, size)` decides which dataset each blended sample comes from. Megatron
runs a greedy loop over samples (pick the dataset furthest behind its share); here the same goal is
reached without a loop over samples: sample k of dataset i is given the time (k + 1/2) / w_i and
all samples are ordered by time (Webster's divisor order, one stable sort). Measured at every
prefix of the blend, the count of each dataset stays within one sample of w_i * n for two and
three datasets, and over random weight draws with up to five datasets within two samples, as
Megatron's greedy loop (a review's 800 draws of 2-5 datasets, 2,000 samples each: at worst 1.66
samples here, 1.48 there; in about one draw in twenty ours deviates more).
tests/unit/test_data_gpt_dataset.py checks fixed weights of two, three and five datasets against
a port of that loop.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from megagpt.fsutil import dataset_exists


class DataPathError(ValueError):
    """A data path list that is neither prefixes nor weight/prefix pairs."""


def _as_weight(value) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def parse_data_path(paths, where: str = "data path") -> list[tuple[float | None, str]]:
    """`[(weight, prefix)]` from a prefix, a list of prefixes, or weight/prefix pairs.

    Weights are None when no weight is given. Raises DataPathError naming `where` and the value.
    """
    if isinstance(paths, str):
        paths = [paths]
    paths = list(paths)
    if not paths:
        return []
    if _as_weight(paths[0]) is None:
        if not all(isinstance(p, str) and p for p in paths):
            raise DataPathError(f"{where}={paths!r}: must be dataset prefixes or [weight, prefix, "
                                f"weight, prefix, ...] pairs")
        stray = [p for p in paths if _as_weight(p) is not None and not dataset_exists(p)]
        if stray:
            raise DataPathError(f"{where}={paths!r}: {stray[0]!r} is a number among prefixes; a "
                                f"blend gives a weight before every prefix or before none; fix: "
                                f"[weight, prefix, weight, prefix, ...] or only prefixes")
        return [(None, p) for p in paths]
    if len(paths) % 2:
        raise DataPathError(f"{where}={paths!r}: a blend is [weight, prefix, weight, prefix, ...] "
                            f"but it has an odd number ({len(paths)}) of entries")
    pairs = []
    for w, p in zip(paths[0::2], paths[1::2]):
        weight = _as_weight(w)
        if weight is None or not weight > 0 or not np.isfinite(weight) or not isinstance(p, str) or not p:
            raise DataPathError(f"{where}: blend pair ({w!r}, {p!r}) must be a positive weight "
                                f"followed by a dataset prefix")
        pairs.append((weight, p))
    return pairs


def normalize_weights(weights) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or not len(w) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights {list(weights)!r} must be non-negative, finite and not all zero")
    return w / w.sum()


def blending_indices(weights, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Which dataset, and which sample of it, each of `size` blended samples is.

    Returns:
        dataset_index: (size,) uint8 or int16, the dataset of each blended sample.
        dataset_sample_index: (size,) int64, the sample within that dataset (0, 1, 2, ... per
        dataset, in order).
    """
    w = normalize_weights(weights)
    counts = np.floor(w * size).astype(np.int64) + 1  # enough candidates of each dataset
    dataset = np.repeat(np.arange(len(w)), counts)
    k = np.arange(len(dataset)) - np.repeat(np.cumsum(counts) - counts, counts)
    with np.errstate(divide="ignore"):
        time = (k + 0.5) / w[dataset]  # weight 0: time inf, never chosen before the others
    order = np.argsort(time, kind="stable")[:size]
    dataset_index = dataset[order].astype(np.uint8 if len(w) <= 255 else np.int16)
    return dataset_index, k[order]


class BlendedDataset(torch.utils.data.Dataset):
    """Samples drawn from several datasets in the order `blending_indices` gives.

    Args:
        datasets: one dataset a weight; dataset i must hold at least
            `np.bincount(dataset_index)[i]` samples.
        weights: the blend weights (kept, normalised, for reporting).
        dataset_index, dataset_sample_index: from `blending_indices(weights, size)`.
    """

    def __init__(self, datasets: list, weights, dataset_index: np.ndarray,
                 dataset_sample_index: np.ndarray):
        if len(datasets) != len(weights):
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights")
        self.datasets = datasets
        self.weights = normalize_weights(weights)
        self.dataset_index = dataset_index
        self.dataset_sample_index = dataset_sample_index
        needed = np.bincount(dataset_index, minlength=len(datasets))
        for i, (ds, n) in enumerate(zip(datasets, needed)):
            if n > len(ds):
                raise ValueError(f"the blend takes {n} samples from dataset {i}, which has {len(ds)}")

    @property
    def data_digest(self) -> str | None:
        """The datasets' `data_digest`s, together (None when one has none)."""
        digests = [getattr(ds, "data_digest", None) for ds in self.datasets]
        if None in digests:
            return None
        return hashlib.sha256(" ".join(digests).encode()).hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, i: int) -> dict:
        return self.datasets[self.dataset_index[i]][int(self.dataset_sample_index[i])]

    def same_order(self, num_samples: int) -> bool:
        """Whether the blend built for `num_samples` samples instead would serve the same
        samples in the same order (up to the shorter of the two): the same choice of dataset
        for each, and each dataset, built for its share, in its same order."""
        if num_samples <= len(self.dataset_index):    # the order's prefix (blending_indices
            dataset_index = self.dataset_index[:num_samples]   # is prefix-stable): no rebuild
        else:
            dataset_index, _ = blending_indices(self.weights, num_samples)
            if not np.array_equal(dataset_index[:len(self.dataset_index)], self.dataset_index):
                return False
        needed = np.bincount(dataset_index, minlength=len(self.datasets))
        return all(ds.same_order(max(int(n), 1)) for ds, n in zip(self.datasets, needed))
