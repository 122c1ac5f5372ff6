"""Deterministic train / validation split of a dataset's indices."""
import numpy as np


def split_indices(n: int, *, val_fraction: float | None = None, val_size: int | None = None,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices of `range(n)`, each sorted, drawn by a numpy generator seeded
    with `seed`. Give exactly one of `val_fraction` (rounded to a count) or `val_size`."""
    if (val_fraction is None) == (val_size is None):
        raise ValueError("give exactly one of val_fraction or val_size")
    if val_fraction is not None:
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
        val_size = round(val_fraction * n)
    if not 0 < val_size < n:
        raise ValueError(f"the validation split must hold between 1 and {n - 1} of the {n} samples, got {val_size}")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[val_size:]), np.sort(order[:val_size])
