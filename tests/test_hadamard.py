import math

import pytest
import torch

from linearpatch.integration.measurement.hadamard import (
    SUPPORTED_BASES,
    factor_hidden_size,
    hadamard_matrix,
    hadamard_transform,
)


@pytest.mark.parametrize("base", SUPPORTED_BASES)
def test_every_base_order_is_exactly_orthonormal(base):
    for size in (base, base * 4):
        matrix = hadamard_matrix(size, dtype=torch.float64)
        assert torch.allclose(matrix @ matrix.T, torch.eye(size, dtype=torch.float64), atol=1e-12)
        assert torch.allclose(matrix.abs(), torch.full_like(matrix, 1 / math.sqrt(size)), atol=1e-15)


@pytest.mark.parametrize(
    "size, factors",
    [
        (576, (36, 16)),
        (960, (60, 16)),
        (2048, (1, 2048)),
        (3072, (12, 256)),
        (3584, (28, 128)),
        (4096, (1, 4096)),
        (5120, (20, 256)),
        (8192, (1, 8192)),
        (11008, (172, 64)),
        (13824, (108, 128)),
    ],
)
def test_hidden_sizes_of_real_models(size, factors):
    assert factor_hidden_size(size) == factors
    x = torch.randn(3, size, dtype=torch.float64)
    matrix = hadamard_matrix(size, dtype=torch.float64)
    assert torch.allclose(hadamard_transform(x), x @ matrix, atol=1e-10)
    if size <= 4096:
        assert torch.allclose(matrix @ matrix.T, torch.eye(size, dtype=torch.float64), atol=1e-10)


@pytest.mark.parametrize("size", [100, 7, 2880, 0])
def test_unsupported_size_names_size_and_options(size):
    with pytest.raises(ValueError, match=rf"order {size} .*36\*2\^m"):
        hadamard_matrix(size)
