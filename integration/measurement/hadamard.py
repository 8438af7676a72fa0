"""Orthonormal Hadamard matrices of order C = K * 2^m, built (not pasted) and applied fast.

`hadamard_matrix(C)` returns H with H @ H.T = I and entries +-1/sqrt(C), as H_K (x) H_{2^m} (Kronecker), where the
base H_K comes from Paley's constructions (I: q = 3 mod 4, order q + 1; II: q = 1 mod 4, order 2(q + 1)) over GF(q),
from Sylvester doubling, or (156, 172) from the Goethals-Seidel array. `hadamard_transform(x)` computes `x @ H` in
O(C log C) for the 2^m factor.
"""

import itertools
import math
from functools import cache, lru_cache

import torch

# Base order K -> how it is built. Every K listed by the LinearPatch paper's supported hidden sizes that has a
# Paley or Sylvester construction.
_BASE_CONSTRUCTIONS: dict[int, tuple[str, int]] = {
    1: ("one", 1),
    12: ("paley1", 11),
    20: ("paley1", 19),
    28: ("paley2", 13),
    36: ("paley2", 17),
    40: ("double", 20),
    44: ("paley1", 43),
    52: ("paley2", 25),
    60: ("paley1", 59),
    108: ("paley1", 107),
    140: ("paley1", 139),
    156: ("goethals_seidel", 39),
    172: ("goethals_seidel", 43),
}

# Neither Paley construction reaches 156 = 4*39 or 172 = 4*43. For those we use the Goethals-Seidel array over four
# +-1 sequences of length n whose periodic autocorrelations sum to zero at every non-zero shift. These sequences were
# found by this project with a small search over sequences constant on the orbits of Z_n under multiplication by 5
# (n = 39) and by 4 (n = 43); `_base_matrix` re-verifies H H^T = 4n I on every build.
_GOETHALS_SEIDEL_SEQUENCES = {
    39: (
        "++++++++++++---+++-++-+-++----+-++-++--",
        "++++++-++-++---+++-++-+-++------+--++--",
        "+-+++-----++-+-++---+-+++-+-++--+---++-",
        "+-+---+--++++---+-+--+-+---++++--+---+-",
    ),
    43: (
        "++++++--+--++---+--++++----+----++-+-+-+-++",
        "+++-+--++--+----+-+--++---+++++-+-++---+-++",
        "+++-+--++--+----+-+--++---+++++-+-++---+-++",
        "++--+--+---+----+-+--+----+-+++---++-----+-",
    ),
}
SUPPORTED_BASES = tuple(sorted(_BASE_CONSTRUCTIONS))


class _GaloisField:
    """GF(p^k) with elements encoded as integers 0..q-1 (base-p digits = polynomial coefficients)."""

    def __init__(self, q: int):
        for p in range(2, q + 1):
            if q % p == 0:
                break
        k = round(math.log(q, p))
        if p**k != q:
            raise ValueError(f"{q} is not a prime power")
        self.p, self.k, self.q = p, k, q
        # A monic irreducible polynomial of degree k (k <= 3 here, so "no root" is enough).
        self.modulus = None
        if k > 1:
            for tail in itertools.product(range(p), repeat=k):
                coefficients = list(tail) + [1]  # low -> high
                if all(sum(c * x**i for i, c in enumerate(coefficients)) % p for x in range(p)):
                    self.modulus = coefficients
                    break

    def digits(self, a: int) -> list[int]:
        return [(a // self.p**i) % self.p for i in range(self.k)]

    def number(self, digits: list[int]) -> int:
        return sum((d % self.p) * self.p**i for i, d in enumerate(digits))

    def sub(self, a: int, b: int) -> int:
        return self.number([x - y for x, y in zip(self.digits(a), self.digits(b), strict=True)])

    def mul(self, a: int, b: int) -> int:
        x, y = self.digits(a), self.digits(b)
        product = [0] * (2 * self.k - 1)
        for i, xi in enumerate(x):
            for j, yj in enumerate(y):
                product[i + j] += xi * yj
        for degree in range(len(product) - 1, self.k - 1, -1):  # reduce modulo the irreducible polynomial
            factor = product[degree] % self.p
            if factor:
                for i, c in enumerate(self.modulus):
                    product[degree - self.k + i] -= factor * c
        return self.number(product[: self.k])

    def quadratic_character(self) -> list[int]:
        squares = {self.mul(a, a) for a in range(1, self.q)}
        return [0] + [1 if a in squares else -1 for a in range(1, self.q)]


def _jacobsthal(q: int) -> torch.Tensor:
    field = _GaloisField(q)
    chi = field.quadratic_character()
    return torch.tensor([[chi[field.sub(a, b)] for b in range(q)] for a in range(q)], dtype=torch.float64)


def _paley1(q: int) -> torch.Tensor:
    jacobsthal = _jacobsthal(q)
    skew = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    skew[0, 1:] = 1
    skew[1:, 0] = -1
    skew[1:, 1:] = jacobsthal
    return torch.eye(q + 1, dtype=torch.float64) + skew


def _paley2(q: int) -> torch.Tensor:
    jacobsthal = _jacobsthal(q)
    core = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    core[0, 1:] = 1
    core[1:, 0] = 1
    core[1:, 1:] = jacobsthal
    plus = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    unit = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(core, plus) + torch.kron(torch.eye(q + 1, dtype=torch.float64), unit)


def _goethals_seidel(n: int) -> torch.Tensor:
    def circulant(signs: str) -> torch.Tensor:
        row = torch.tensor([1.0 if sign == "+" else -1.0 for sign in signs], dtype=torch.float64)
        return torch.stack([torch.roll(row, shift) for shift in range(n)])

    a, b, c, d = (circulant(signs) for signs in _GOETHALS_SEIDEL_SEQUENCES[n])
    r = torch.eye(n, dtype=torch.float64).flip(1)  # back-diagonal identity
    return torch.cat(
        [
            torch.cat([a, b @ r, c @ r, d @ r], 1),
            torch.cat([-b @ r, a, d.T @ r, -c.T @ r], 1),
            torch.cat([-c @ r, -d.T @ r, a, b.T @ r], 1),
            torch.cat([-d @ r, c.T @ r, -b.T @ r, a], 1),
        ],
        0,
    )


@cache
def _base_matrix(order: int) -> torch.Tensor:
    """Unnormalised +-1 Hadamard matrix of the given base order (cached, float64)."""
    kind, parameter = _BASE_CONSTRUCTIONS[order]
    if kind == "one":
        matrix = torch.ones(1, 1, dtype=torch.float64)
    elif kind == "paley1":
        matrix = _paley1(parameter)
    elif kind == "paley2":
        matrix = _paley2(parameter)
    elif kind == "goethals_seidel":
        matrix = _goethals_seidel(parameter)
    else:
        matrix = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), _base_matrix(parameter))
    if not torch.equal(matrix @ matrix.T, order * torch.eye(order, dtype=torch.float64)):
        raise AssertionError(f"construction of the order-{order} Hadamard matrix is wrong")
    return matrix


def factor_hidden_size(size: int) -> tuple[int, int]:
    """Split `size` into (K, 2^m) with K a supported base order; the largest power of two wins.

    Raises:
        ValueError: if no supported K divides `size` with a power-of-two quotient.
    """
    if size >= 1:
        power = size & -size  # largest power of two dividing size
        while power >= 1:
            if size // power in _BASE_CONSTRUCTIONS:
                return size // power, power
            power //= 2
    forms = ", ".join(f"{k}*2^m" if k > 1 else "2^m" for k in SUPPORTED_BASES)
    raise ValueError(
        f"No Hadamard matrix of order {size} is available: the hidden size must be one of {forms} "
        f"(e.g. 576 = 36*16, 960 = 60*16, 3584 = 28*128, 4096 = 2^12, 5120 = 40*128). Use `patch='diag'` or "
        f"`patch='lstsq'` for this model."
    )


def hadamard_supported(size: int) -> bool:
    """Is there a Hadamard matrix of order `size` (see [`factor_hidden_size`])?"""
    try:
        factor_hidden_size(size)
    except ValueError:
        return False
    return True


@lru_cache(maxsize=16)
def _hadamard_matrix_cached(size: int) -> torch.Tensor:
    base, power = factor_hidden_size(size)
    sylvester = torch.ones(1, 1, dtype=torch.float64)
    while sylvester.shape[0] < power:
        sylvester = torch.cat([torch.cat([sylvester, sylvester], 1), torch.cat([sylvester, -sylvester], 1)], 0)
    return torch.kron(_base_matrix(base), sylvester) / math.sqrt(size)


def hadamard_matrix(size: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Orthonormal Hadamard matrix H of order `size` = K * 2^m (H @ H.T = I, entries +-1/sqrt(size)).

    Args:
        size (`int`): the order, typically the model's hidden size.
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): returned dtype (built in float64).
        device (*optional*): returned device.
    """
    return _hadamard_matrix_cached(size).to(dtype=dtype, device=device)


@lru_cache(maxsize=32)
def _sylvester(order: int) -> torch.Tensor:
    """The unnormalised Sylvester matrix of order `order` (a power of two): symmetric, entries +-1."""
    matrix = torch.ones(1, 1)
    while matrix.shape[0] < order:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return matrix


def _walsh_hadamard_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Sylvester transform along the last axis (length M = 2^m).

    H_M = H_a (x) H_b for any a * b = M, so a row viewed as an a x b matrix X becomes H_a X H_b (both symmetric): two
    small matrix products (a, b <= 64 at M = 4096) instead of m butterfly stages, each of which would copy the whole
    tensor (the calibration pass transforms every token of every layer). Entries are +-1 and sums exact up to the
    dtype's rounding.
    """
    length = x.shape[-1]
    first = 2 ** ((length.bit_length() - 1) // 2)
    second = length // first
    blocks = x.reshape(*x.shape[:-1], first, second)
    left = _sylvester(first).to(dtype=x.dtype, device=x.device)
    right = _sylvester(second).to(dtype=x.dtype, device=x.device)
    return (left @ blocks @ right).reshape(x.shape)


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """`x @ hadamard_matrix(C)` over the last axis, without forming the C x C matrix.

    With H = H_K (x) H_M (M = 2^m), viewing a row as a K x M matrix X gives `x @ H = H_K^T X H_M`: a fast
    Walsh-Hadamard transform for H_M (O(C log M)) and a small K x K product for H_K.
    """
    size = x.shape[-1]
    base, power = factor_hidden_size(size)
    blocks = x.reshape(*x.shape[:-1], base, power)
    blocks = _walsh_hadamard_last_dim(blocks)
    if base > 1:
        blocks = torch.einsum("...im,ik->...km", blocks, _base_matrix(base).to(dtype=x.dtype, device=x.device))
    return blocks.reshape(*x.shape[:-1], size) / math.sqrt(size)


__all__ = ["SUPPORTED_BASES", "factor_hidden_size", "hadamard_matrix", "hadamard_supported", "hadamard_transform"]
