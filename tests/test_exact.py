"""The float64-SVD references against closed forms."""

from __future__ import annotations

import pytest
import torch

import orthoptim

from .conftest import with_spectrum


def test_polar_of_known_factorization() -> None:
    s = torch.tensor([3.0, 1.0, 1e-3], dtype=torch.float64)
    G, U, V = with_spectrum(5, 7, s, seed=1)
    assert torch.allclose(orthoptim.polar(G), U @ V.T, atol=1e-10)
    assert torch.allclose(orthoptim.nuclear_norm(G), s.sum(), atol=1e-10)


def test_polar_batched_and_dtype() -> None:
    G = torch.randn(3, 4, 6, dtype=torch.float32)
    P = orthoptim.polar(G)
    assert P.shape == G.shape and P.dtype == torch.float32
    eye = torch.eye(4).expand(3, 4, 4)
    assert torch.allclose(P @ P.mT, eye, atol=1e-5)
    assert orthoptim.polar(G, dtype=torch.float64).dtype == torch.float64
    assert orthoptim.nuclear_norm(G).shape == (3,)


def test_rank_deficient_and_zero() -> None:
    assert torch.equal(orthoptim.polar(torch.zeros(3, 4)), torch.zeros(3, 4))
    s = torch.tensor([2.0, 0.0], dtype=torch.float64)
    G, U, V = with_spectrum(4, 4, s, seed=2)
    P = orthoptim.polar(G)
    assert torch.allclose(P, U[:, :1] @ V[:, :1].T, atol=1e-10)  # the null direction contributes nothing


def test_exact_rejects_bad_input() -> None:
    with pytest.raises(orthoptim.NonFiniteError, match=r"\(2, 2\)"):
        orthoptim.polar(torch.tensor([[1.0, float("inf")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="dim"):
        orthoptim.nuclear_norm(torch.ones(3))
