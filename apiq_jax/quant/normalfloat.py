"""NormalFloat codebooks (QLoRA) and nearest-level search."""

from __future__ import annotations

import functools
from statistics import NormalDist

import numpy as np

NF_OFFSET = 0.9677083

# QLoRA's published NF4 table (bitsandbytes), used by the tests as an independent check.
NF4_QLORA = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


@functools.lru_cache(maxsize=None)
def nf_codebook(bits: int) -> np.ndarray:
    """The ``2^bits`` NormalFloat levels in [-1, 1], ascending, with an exact zero.

    QLoRA's asymmetric construction: ``2^(b-1)`` positive quantiles of N(0, 1) at
    ``linspace(offset, 0.5, 2^(b-1)+1)[:-1]``, zero, and ``2^(b-1)-1`` negative ones at
    ``linspace(offset, 0.5, 2^(b-1))[:-1]``, normalised by the largest value. The
    probabilities are float32 (``torch.linspace``) as in the reference.

    Args:
      bits: 2, 3 or 4.

    Returns:
      float32 levels ``[2^bits]``.

    Raises:
      ValueError: other bit widths.
    """
    if bits not in (2, 3, 4):
        raise ValueError(f"NormalFloat bits={bits!r} is not supported; accepted: (2, 3, 4)")
    half = 2 ** (bits - 1)
    ppf = NormalDist().inv_cdf
    pos = [ppf(float(p)) for p in np.linspace(NF_OFFSET, 0.5, half + 1, dtype=np.float32)[:-1]]
    neg = [-ppf(float(p)) for p in np.linspace(NF_OFFSET, 0.5, half, dtype=np.float32)[:-1]]
    values = np.sort(np.asarray(pos + [0.0] + neg, dtype=np.float32))
    return (values / values.max()).astype(np.float32)
