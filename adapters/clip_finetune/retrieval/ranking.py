"""THE ranking of every search and evaluation: the k best candidates of each query, best first.

Evaluation's per-query top-k lists, `clip-finetune search` (through an Index), the Python API's example results
and the demo's search sheet all rank here. Ranks of the relevant candidates under the pessimistic tie rule (a
metric's business, not a search's) stay in metrics.py, whose definitions are verified on their own.
"""

from __future__ import annotations

import numpy as np

# Bound on the elements of one block of query-candidate scores, so a search over many vectors stays at a few
# hundred MB whatever the number of queries.
BLOCK_ELEMENTS = 1 << 24


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and scores of the k highest scores of each row, best first: ([q, k'], [q, k']) with
    k' = min(k, candidates). Ties keep candidate order (the lower index first)."""
    scores = np.atleast_2d(scores)
    k = min(k, scores.shape[1])
    if k <= 0:
        empty = np.zeros((scores.shape[0], 0))
        return empty.astype(np.int64), empty
    # argpartition finds the top k in O(n); among scores tied at the k-th place it picks arbitrarily, so rows
    # where such a tie straddles the cut (rare with float scores) are chosen again: every score above the k-th
    # is in, and of those equal to it the first ones in candidate order
    n = scores.shape[1]
    part = np.argpartition(scores, n - k, axis=1)[:, n - k :]  # the k largest (no negated copy of scores)
    kth = np.take_along_axis(scores, part, axis=1).min(axis=1, keepdims=True)  # [q, 1]
    straddling = np.flatnonzero((scores >= kth).sum(axis=1) > k)
    if straddling.size:
        rows, cut = scores[straddling], kth[straddling]
        above, at = rows > cut, rows == cut
        chosen = above | (at & (np.cumsum(at, axis=1) <= k - above.sum(axis=1, keepdims=True)))
        part[straddling] = np.nonzero(chosen)[1].reshape(len(straddling), k)
    part.sort(axis=1)
    # only those k are then sorted, stable: ties keep candidate order
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    idx = np.take_along_axis(part, order, axis=1)
    return idx, np.take_along_axis(scores, idx, axis=1)


def top_k_by_dot(queries: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """top_k of queries [q, d] @ vectors[n, d].T (cosines of unit vectors), a block of queries at a time so the
    score matrix never exceeds BLOCK_ELEMENTS."""
    queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    n = len(vectors)
    width = min(k, n)
    idx = np.zeros((len(queries), max(width, 0)), np.int64)
    out = np.zeros((len(queries), max(width, 0)), np.float32)
    block = max(1, BLOCK_ELEMENTS // max(n, 1))
    for start in range(0, len(queries), block):
        stop = start + block
        idx[start:stop], out[start:stop] = top_k(queries[start:stop] @ vectors.T, k)  # [block, n] cosines
    return idx, out
