"""Score fusion of bench/hybrid_search.py (bench/fusion.py; search does not offer it, docs/search.md): z-scores,
weighted sums, and why z-scoring is needed."""

from __future__ import annotations

import numpy as np
import pytest

from bench.fusion import fuse, weighted_sum, zscore, zscore_fusion

# Text-text cosines on a compressed scale, text-image ones on a wider one (jina-clip-v1's observation).
# Item 0 is the text list's favourite, item 3 the image list's; item 1 is second in both.
TEXT = np.array([0.820, 0.815, 0.800, 0.801])  # spread 0.02
IMAGE = np.array([0.20, 0.33, 0.23, 0.35])  # spread 0.15


def test_zscore_of_a_list_has_mean_0_and_std_1() -> None:
    z = zscore(np.array([[0.1, 0.4, 0.25, 0.9], [3.0, -1.0, 2.0, 0.5]]))
    np.testing.assert_allclose(z.mean(axis=1), 0.0, atol=1e-12)
    np.testing.assert_allclose(z.std(axis=1), 1.0, atol=1e-12)
    assert np.argsort(z[0]).tolist() == [0, 2, 1, 3]  # order kept


@pytest.mark.parametrize("scores", [np.full(5, 0.7), np.zeros((2, 3)), np.array([[0.5, 0.5], [0.1, 0.3]])])
def test_constant_lists_become_zeros_not_nan(scores) -> None:
    z = zscore(scores)
    assert np.isfinite(z).all()
    constant = np.ptp(np.atleast_2d(scores), axis=1) == 0
    assert (np.atleast_2d(z)[constant] == 0).all()
    fused = zscore_fusion(scores, np.ones_like(scores))  # the image list is constant too
    assert np.isfinite(fused).all()


def test_a_plain_sum_is_dominated_by_the_wider_list_while_zscore_lets_both_count() -> None:
    plain = weighted_sum(TEXT, IMAGE, alpha=0.5)
    assert np.argmax(plain) == np.argmax(IMAGE) == 3  # the text list's favourite (item 0) never wins
    # the plain sum orders exactly as the image list alone
    assert np.argsort(plain).tolist() == np.argsort(IMAGE).tolist()
    z = zscore_fusion(TEXT, IMAGE, alpha=0.5)
    # item 1 is second in both lists: only when both count does it come first
    assert np.argmax(z) == 1
    # and each list can decide when weighted so
    assert np.argmax(zscore_fusion(TEXT, IMAGE, alpha=0.9)) == 0
    assert np.argmax(zscore_fusion(TEXT, IMAGE, alpha=0.1)) == 3


@pytest.mark.parametrize(
    ("alpha", "beta", "expected"),
    [(0.5, None, [0.5, 1.5]), (0.25, None, [0.25 * 1 + 0.75 * 0, 0.25 * 1 + 0.75 * 2]),
     (1.0, 2.0, [1.0, 5.0]), (0.0, None, [0.0, 2.0]), (1.0, None, [1.0, 1.0])],
)
def test_weighted_sum_arithmetic(alpha, beta, expected) -> None:
    np.testing.assert_allclose(weighted_sum(np.array([1.0, 1.0]), np.array([0.0, 2.0]), alpha, beta), expected)


@pytest.mark.parametrize(("alpha", "beta"), [(-0.1, None), (0.0, 0.0), (1.5, None)])
def test_weights_must_be_non_negative_and_not_both_zero(alpha, beta) -> None:
    with pytest.raises(ValueError, match="alpha and beta"):
        weighted_sum(TEXT, IMAGE, alpha, beta)


def test_fuse_dispatches_and_rejects_unknown_methods() -> None:
    np.testing.assert_allclose(fuse(TEXT, IMAGE, "weighted", 0.3), weighted_sum(TEXT, IMAGE, 0.3))
    np.testing.assert_allclose(fuse(TEXT, IMAGE, "zscore", 0.3), zscore_fusion(TEXT, IMAGE, 0.3))
    with pytest.raises(ValueError, match="unknown fusion method 'rrf'"):
        fuse(TEXT, IMAGE, "rrf")  # type: ignore[arg-type]
