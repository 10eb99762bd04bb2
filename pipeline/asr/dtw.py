"""Dynamic time warping of tokens against audio frames, vectorised with numpy.

transformers' ``_dynamic_time_warping`` (and OpenAI's ``dtw_cpu`` without numba) fills the cost
matrix one cell at a time in Python: ~0.2–0.3 s of CPU, under the GIL, for one 30 s window. Here
each token row is filled at once: with ``a[j] = min(cost[i-1, j-1], cost[i-1, j])`` (a diagonal or
a vertical step), the row's recurrence ``cost[i, j] = x[j] + min(a[j], cost[i, j-1])`` unrolls to
``cost[i, j] = S[j] + min over k ≤ j of (a[k] - S[k-1])``, ``S`` the prefix sums of ``x``: a
cumulative sum and a running minimum. The steps taken, and so the path, are transformers'
(its order of preference on ties included), so the word times are the same.
"""

from __future__ import annotations

import numpy as np

DIAGONAL, UP, LEFT = 0, 1, 2


def dtw(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cheapest monotonic path through ``matrix`` (tokens, frames) of costs: (token index,
    frame index) of each step, from (0, 0) to the last cell, as transformers returns them."""
    tokens, frames = matrix.shape
    x = np.asarray(matrix, dtype=np.float64)
    cost = np.full((tokens + 1, frames + 1), np.inf)  # cost[i, j]: of the path ending at token i-1, frame j-1
    cost[0, 0] = 0.0
    trace = np.empty((tokens + 1, frames + 1), dtype=np.int8)
    shifted = np.zeros(frames)  # S[j-1], j = 1..frames
    best = np.empty(frames)
    diagonal_best, up_best = np.empty(frames, bool), np.empty(frames, bool)
    for i in range(1, tokens + 1):
        diagonal, up, left, row = cost[i - 1, :-1], cost[i - 1, 1:], cost[i, :-1], cost[i, 1:]
        np.minimum(diagonal, up, out=best)
        sums = np.cumsum(x[i - 1])  # S[j], j = 1..frames
        shifted[1:] = sums[:-1]
        best -= shifted
        np.minimum.accumulate(best, out=best)
        np.add(sums, best, out=row)  # cost[i, 1:]; ``left`` now reads cost[i, j-1]
        # transformers' preference: diagonal, then up, when strictly cheaper than both others.
        np.less(diagonal, up, out=diagonal_best)
        diagonal_best &= diagonal < left
        np.less(up, diagonal, out=up_best)
        up_best &= up < left
        trace[i, 1:] = LEFT - LEFT * diagonal_best - up_best  # the two never hold together
    trace[0, :] = LEFT
    trace[:, 0] = UP
    rows = [r.tobytes() for r in trace]  # indexing bytes is many times faster than numpy scalars
    i, j = tokens, frames
    text, time = [], []
    while i > 0 or j > 0:
        text.append(i - 1)
        time.append(j - 1)
        step = rows[i][j]
        if step == DIAGONAL:
            i, j = i - 1, j - 1
        elif step == UP:
            i -= 1
        else:
            j -= 1
    return np.array(text[::-1]), np.array(time[::-1])
