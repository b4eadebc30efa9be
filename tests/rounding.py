"""How far float32 rounding alone can move a network's outputs: the tolerance of every parity check.

Two correct float32 implementations of one network (PyTorch's oneDNN kernels, ONNX Runtime's
MLAS, a TorchScript graph, a cached step program, a Triton model) differ only in how they round:
the order of each dot product's additions, fused multiply-adds, vectorised exp/log/tanh. By how
much depends on the CPU (Intel and AMD float32 kernels round differently), so a tolerance read off
one machine fails on another. The tolerance here comes from a model of the rounding instead:

- A reduction of n terms t_i with total S (a convolution's or matrix product's dot product, a
  sum) rounds each of its n partial sums s_k by a relative error of at most u = 2**-24. Taken as
  independent (the model of Higham & Mary, "A new approach to probabilistic rounding error
  analysis", SISC 2019), the total error has variance (u²/3)·Σ s_k². Added in a random order,
  Σ s_k² ≈ n·(Σ t_i²/6 + S²/3); the model uses n·(Σ t_i² + S²), which exceeds that for every
  order a blocked or pairwise kernel uses: σ = u·sqrt(n·(Σ t_i² + S²)).
- IEEE arithmetic (+ - × ÷ sqrt) rounds once: σ = u·|result|. Any other float32 function errs by
  a few units in the last place, σ = ULPS·u·|result| (ULPS = 4 leaves room for vectorised
  exp/log that are not correctly rounded); bounded ones (sigmoid, tanh) are approximated to an
  absolute accuracy, σ = ULPS·u·(|result| + 1).

How those errors propagate through the network is measured by Monte Carlo arithmetic (Parker,
1997): the reference function runs eagerly `draws` times with every float32 result perturbed by a
fresh normal draw of its modelled size, and the spread of each output element around the
unperturbed run estimates σ, the rounding error one implementation carries there. Two
implementations differ by the difference of two such errors, standard deviation √2·σ. σ is
estimated from `draws` runs, so the ratio of that difference to √2·σ̂ follows Student's t with
`draws` degrees of freedom; the tolerance is the t quantile that keeps the chance of any element
of the output exceeding it below FAMILY_WISE (Bonferroni over the elements).

The model over-states real rounding (by a few times, measured against float64), and a real bug (a
wrong weight, mask or shift) moves outputs by orders of magnitude more than this tolerance.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy.stats import t as student_t
from torch.overrides import TorchFunctionMode

UNIT_ROUNDOFF = 2.0**-24
ULPS = 4
FAMILY_WISE = 1e-4

# Operations whose float32 result is exact: they move, select or compare values, never round them.
EXACT = frozenset({
    "view", "reshape", "permute", "transpose", "flatten", "unflatten", "squeeze", "unsqueeze", "expand",
    "expand_as", "contiguous", "clone", "detach", "__getitem__", "cat", "stack", "chunk", "split", "narrow",
    "select", "index_select", "gather", "flip", "roll", "repeat", "pad", "relu", "relu_", "max", "min", "amax",
    "amin", "maximum", "minimum", "clamp", "clamp_", "clamp_min", "clamp_max", "where", "masked_fill", "neg",
    "__neg__", "abs", "zeros_like", "ones_like", "full_like", "empty_like", "floor", "ceil", "round", "sign",
    "dropout", "rand", "randn", "rand_like", "randn_like", "zeros", "ones", "full", "arange", "tensor",
    "as_tensor", "from_numpy", "one_hot", "embedding", "__setitem__",
})
# Conversions are exact unless they narrow float64 to float32.
CONVERSIONS = frozenset({"to", "float", "type", "__get__"})
REDUCTIONS = frozenset({"sum", "mean", "cumsum"})
# IEEE arithmetic: every result rounded once, to within half a unit in the last place.
CORRECTLY_ROUNDED = frozenset({
    "add", "sub", "mul", "div", "rsub", "sqrt", "square", "add_", "sub_", "mul_", "div_", "__add__", "__radd__",
    "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__", "__rmul__", "__imul__", "__truediv__",
    "__rtruediv__", "__itruediv__",
})
NORMALISERS = frozenset({"logsumexp", "log_softmax", "softmax", "cross_entropy"})
# Bounded functions that vectorised libraries approximate to an absolute accuracy (ONNX Runtime's
# MLAS clamps the input of its logistic and tanh, so sigmoid(-40) comes back ~1e-8, not ~4e-18).
BOUNDED = frozenset({"sigmoid", "tanh", "softmax"})


def _name(func) -> str:
    return getattr(func, "__name__", "")


def _dim(args, kwargs):
    return kwargs.get("dim", args[1] if len(args) > 1 else None)


def _without_bias(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k != "bias"}


def _sum_of_squared_terms(name: str, args, kwargs, out: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """(Σ terms², n) of the dot products or sums inside one operation, or None if it has none."""
    a = args[0]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if name in ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"):
        weight = args[1]
        squares = getattr(torch, name)(a * a, weight * weight, None, *args[3:], **_without_bias(kwargs))
        n = weight[0].numel() if "transpose" not in name else weight.shape[0] * weight[0, 0].numel()
        if bias is not None:  # a convolution's bias is per channel, dimension 1
            squares = squares + (bias * bias).reshape(-1, *[1] * (squares.dim() - 2))
        return squares, n + 1
    if name == "linear":
        weight = args[1]
        squares = torch.nn.functional.linear(a * a, weight * weight, None if bias is None else bias * bias)
        return squares, weight.shape[-1] + 1
    if name in ("matmul", "mm", "bmm", "__matmul__"):
        return torch.matmul(a * a, args[1] * args[1]), a.shape[-1]
    if name in ("addmm", "baddbmm"):
        m1, m2 = args[1:3]
        return a * a + torch.matmul(m1 * m1, m2 * m2), m1.shape[-1] + 1
    if name in REDUCTIONS and isinstance(a, torch.Tensor):
        squares = getattr(torch, name)(a * a, *args[1:], **kwargs).to(out.dtype)
        n = a.shape[_dim(args, kwargs)] if name == "cumsum" else max(1, a.numel() // max(1, out.numel()))
        return (squares / n if name == "mean" else squares), n  # a mean's terms are x / n
    return None


class _RoundingPerturbation(TorchFunctionMode):
    """Adds to every float32 result a normal draw of the rounding error modelled for it."""

    def __init__(self, generator: torch.Generator) -> None:
        super().__init__()
        self.generator = generator

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _name(func)
        if not isinstance(out, torch.Tensor) or out.dtype != torch.float32 or name in EXACT:
            return out
        source = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if name in CONVERSIONS and (source is None or source.dtype != torch.float64):
            return out
        reduction = _sum_of_squared_terms(name, args, kwargs, out)
        if reduction is not None:
            squares, n = reduction
            scale = (n * (squares + out * out)).sqrt()
        elif name in CORRECTLY_ROUNDED:
            scale = out.abs()
        else:
            scale = ULPS * (out.abs() + 1.0) if name in BOUNDED else ULPS * out.abs()
            if name in NORMALISERS:  # a sum of n exponentials inside: relative error ≤ sqrt(n)·u of that sum
                n = args[0].shape[1 if name == "cross_entropy" else _dim(args, kwargs)]
                scale = scale + math.sqrt(n) * (out.abs() if name == "softmax" else 1.0)
        noise = torch.randn(out.shape, generator=self.generator) * (UNIT_ROUNDOFF * scale)
        if name.endswith("_") and out is (args[0] if args else None):  # in place: the caller keeps `out`
            return out.add_(noise)
        return out + noise


def _outputs(result) -> list[torch.Tensor]:
    return list(result) if isinstance(result, (tuple, list)) else [result]


def rounding_sigma(fn: Callable, inputs: Sequence, draws: int = 16, seed: int = 0) -> list[np.ndarray]:
    """σ per element of each float output of `fn(*inputs)`: the float32 rounding error it carries.

    Non-float outputs get None. Runs `fn` once plainly and `draws` times perturbed, without gradients.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        plain = [o.detach().double() for o in _outputs(fn(*inputs))]
        squares = [torch.zeros_like(o) for o in plain]
        for _ in range(draws):
            with _RoundingPerturbation(generator):
                perturbed = _outputs(fn(*inputs))
            for sq, p, o in zip(squares, perturbed, plain):
                sq += (p.detach().double() - o) ** 2
    return [
        (sq / draws).sqrt().numpy() if o.is_floating_point() else None
        for sq, o in zip(squares, plain)
    ]


def rounding_tolerance(sigma: np.ndarray, draws: int = 16) -> np.ndarray:
    """Per-element tolerance on the difference of two float32 implementations with this σ."""
    quantile = student_t.ppf(1.0 - FAMILY_WISE / (2 * max(1, sigma.size)), draws)
    return quantile * math.sqrt(2.0) * sigma


def assert_within_rounding(got, want, sigma: np.ndarray, where: str, draws: int = 16) -> None:
    """`got` equals the reference `want` up to the rounding the model allows (see the module doc)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (where, got.shape, want.shape)
    tolerance = rounding_tolerance(sigma, draws) + UNIT_ROUNDOFF * np.abs(want)  # + the output's own rounding
    excess = np.abs(got - want) - tolerance
    worst = np.unravel_index(np.argmax(excess), excess.shape) if excess.size else ()
    assert excess.size == 0 or excess[worst] <= 0, (
        f"{where}: differs by {abs(got[worst] - want[worst]):.3g} at {tuple(int(i) for i in worst)}, "
        f"over the float32 rounding tolerance {tolerance[worst]:.3g} (σ {sigma[worst]:.3g})"
    )
