"""Regenerate ``normal_quantiles_u16.npy``, the lookup table behind the ``gaussian`` projection.

The committed ``.npy`` file, not this script, is the source of truth: `scoring.projection` checks its
SHA-256 on load, so a table rebuilt on another Python (whose ``inv_cdf`` might differ by an ulp) is refused
rather than silently changing every Gaussian projection. Run this only to see how the file was made, or to
start a new table version (new file name and new checksum in `scoring.projection`):

    python scoring/assets/make_normal_table.py [OUTPUT.npy]

Table: t[i] = Φ⁻¹((i + 0.5) / 65536) for i in [0, 65536), built antisymmetric (t[65535 - i] == -t[i], so the
mean is exactly 0) and divided by its float64 RMS, so the table's second moment is 1 up to float32 rounding.
Stored as little-endian float32, shape (65536,).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import numpy as np

SIZE = 1 << 16


def normal_quantile_table(size: int = SIZE) -> np.ndarray:
    """Standardised standard-normal quantiles at the cell midpoints (i + 0.5) / size.

    Returns:
        (size,) little-endian float32, antisymmetric, RMS 1 in float64 before the cast.
    """
    inv_cdf = statistics.NormalDist().inv_cdf
    half = size // 2
    upper = np.array([inv_cdf((half + j + 0.5) / size) for j in range(half)], dtype=np.float64)
    table = np.concatenate([-upper[::-1], upper])  # (size,), exact mirror image around 0
    table /= np.sqrt(np.mean(table * table))
    return table.astype("<f4")


def main(argv: list[str]) -> None:
    """Write the table to ``argv[0]`` (default: next to this script)."""
    out = Path(argv[0]) if argv else Path(__file__).with_name("normal_quantiles_u16.npy")
    np.save(out, normal_quantile_table())
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
