"""Gradient checking: hand-written gradients against central finite differences, in float64.

For a scalar function f of a parameter x, the central difference

    (f(x + eps e) - f(x - eps e)) / (2 eps)

approximates the directional derivative along e with an error of order eps^2, so in float64 with
eps = 1e-6 an analytic gradient that is right agrees to about 1e-9 relative error, and one that is
wrong (a missing transpose, a dropped term) is off by order 1.

A layer's output is not a scalar, so we check a vector-Jacobian product: draw a random upstream
gradient dout once, take f = sum(out * dout), and compare with what the layer's backward returns
for that dout. Random dout exercises every entry of the Jacobian, where a plain sum would not.

Three ways to choose what to perturb:
  "elementwise"  every entry of every tensor (small tensors);
  "coordinates"  n_samples random entries per tensor (large tensors);
  "direction"    n_samples random directions per tensor, comparing sum(grad * d) with the
                 difference along d (checks the whole tensor at once, cheaply).

The error per tensor is max|a - n| / max(max|a|, max|n|, 1e-12) over everything checked. This module
works on NumPy float64 arrays only: a GPU path is checked by comparing it with this NumPy one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

ERROR_FLOOR = 1e-12
MODES = ("elementwise", "coordinates", "direction")


class GradCheckError(AssertionError):
    """A gradient disagrees with finite differences; the message names the tensor and the index."""


@dataclass
class TensorCheck:
    """How one tensor's gradient compared."""

    name: str
    error: float  # max|a - n| / max(max|a|, max|n|, 1e-12)
    worst: object  # the index (elementwise, coordinates) or direction number (direction) of max|a - n|
    analytic: float  # the analytic value there
    numeric: float  # the finite-difference value there
    n_checked: int


@dataclass
class GradCheckResult:
    mode: str
    checks: list[TensorCheck] = field(default_factory=list)

    @property
    def max_error(self) -> float:
        return max((check.error for check in self.checks), default=0.0)

    def worst(self) -> TensorCheck:
        return max(self.checks, key=lambda check: check.error)

    def errors(self) -> dict[str, float]:
        return {check.name: check.error for check in self.checks}

    def assert_ok(self, tol: float) -> None:
        """Raise GradCheckError naming the worst tensor, index and both values if any error > tol."""
        if not self.checks:
            raise GradCheckError("nothing was checked")
        bad = self.worst()
        if not bad.error <= tol:  # also catches NaN
            where = "direction" if self.mode == "direction" else "index"
            raise GradCheckError(
                f"gradient of {bad.name!r} is wrong: relative error {bad.error:.3e} > tol {tol:.0e} "
                f"({self.mode} check); worst at {where} {bad.worst}: analytic {bad.analytic:.10e}, "
                f"numeric {bad.numeric:.10e}"
            )

    def __str__(self) -> str:
        lines = [f"{check.name:<45} {check.error:.2e} ({check.n_checked} checked)" for check in self.checks]
        return "\n".join(lines)


def relative_error(analytic: np.ndarray, numeric: np.ndarray) -> float:
    """max|a - n| / max(max|a|, max|n|, 1e-12): one number per tensor, 0 when they agree exactly."""
    scale = max(float(np.max(np.abs(analytic))), float(np.max(np.abs(numeric))), ERROR_FLOOR)
    return float(np.max(np.abs(analytic - numeric))) / scale


def _central_difference(loss_fn, x: np.ndarray, step: np.ndarray | tuple, eps: float) -> float:
    """(f(x + eps d) - f(x - eps d)) / (2 eps), for a direction array d or a single index; x is restored."""
    original = x.copy()
    if isinstance(step, tuple):  # one coordinate
        x[step] = original[step] + eps
        plus = loss_fn()
        x[step] = original[step] - eps
        minus = loss_fn()
    else:
        x[...] = original + eps * step
        plus = loss_fn()
        x[...] = original - eps * step
        minus = loss_fn()
    x[...] = original
    return (float(plus) - float(minus)) / (2.0 * eps)


def check_gradients(
    loss_fn,
    params: dict,
    grads: dict,
    mode: str = "elementwise",
    eps: float = 1e-6,
    n_samples: int = 16,
    seed: int = 0,
) -> GradCheckResult:
    """Compare ``grads[name]`` with finite differences of ``loss_fn()`` for every name in ``grads``.

    ``loss_fn()`` returns a scalar computed from the current values in ``params``; each tensor is
    perturbed in place and restored. Every checked tensor must be a float64 NumPy array.
    """
    if mode not in MODES:
        raise ValueError(f"unknown gradient-check mode {mode!r}; choose one of {MODES}")
    rng = np.random.default_rng(seed)
    result = GradCheckResult(mode=mode)
    for name, grad in grads.items():
        x = params[name]
        if not (isinstance(x, np.ndarray) and x.dtype == np.float64):
            raise TypeError(
                f"gradient checks need float64 NumPy arrays; {name!r} is {type(x).__name__} "
                f"of dtype {getattr(x, 'dtype', None)}"
            )
        grad = np.asarray(grad, dtype=np.float64)
        if grad.shape != x.shape:
            raise GradCheckError(f"gradient of {name!r} has shape {grad.shape}, parameter has {x.shape}")
        if mode == "direction":
            steps = [rng.standard_normal(x.shape) for _ in range(n_samples)]
            analytic = np.array([np.sum(grad * d) for d in steps])  # directional derivatives
            labels = list(range(n_samples))
        else:
            flat = (
                np.arange(x.size)
                if mode == "elementwise"
                else rng.choice(x.size, min(n_samples, x.size), replace=False)
            )
            steps = [np.unravel_index(i, x.shape) for i in flat]
            analytic = np.array([grad[s] for s in steps])
            labels = [tuple(int(i) for i in s) for s in steps]
        numeric = np.array([_central_difference(loss_fn, x, s, eps) for s in steps])
        worst = int(np.argmax(np.abs(analytic - numeric)))
        result.checks.append(
            TensorCheck(
                name,
                relative_error(analytic, numeric),
                labels[worst],
                float(analytic[worst]),
                float(numeric[worst]),
                len(steps),
            )
        )
    return result


def check_layer(
    forward,
    backward,
    inputs: dict,
    grad_names,
    mode: str = "elementwise",
    eps: float = 1e-6,
    n_samples: int = 16,
    seed: int = 0,
) -> GradCheckResult:
    """Check one layer's backward as a vector-Jacobian product with a random upstream gradient.

    forward(**inputs) -> (out, cache); backward(dout, cache) -> one gradient or a tuple of them.
    ``grad_names`` names the tensors in ``inputs`` that backward's outputs belong to, in order;
    use None for an output to skip (e.g. a bias gradient that is None).
    """
    rng = np.random.default_rng(seed)
    out, cache = forward(**inputs)
    dout = rng.standard_normal(np.shape(out))  # the random upstream gradient, fixed from here on
    returned = backward(dout, cache)
    returned = returned if isinstance(returned, tuple) else (returned,)
    if len(returned) != len(grad_names):
        raise ValueError(f"backward returned {len(returned)} gradients, grad_names has {len(grad_names)}")
    grads = {name: grad for name, grad in zip(grad_names, returned) if name is not None}

    def objective():
        return float(np.sum(forward(**inputs)[0] * dout))

    return check_gradients(objective, inputs, grads, mode=mode, eps=eps, n_samples=n_samples, seed=seed)


def check_model(
    model,
    idx,
    targets,
    mode: str = "direction",
    eps: float = 1e-6,
    n_samples: int = 4,
    seed: int = 0,
    dropout_seed: int | None = None,
) -> GradCheckResult:
    """Check every gradient ``model.backward`` returns against finite differences of the loss.

    With ``dropout_seed`` the model trains with dropout, and each evaluation draws its masks from a
    generator seeded the same way, so every finite difference sees the same fixed masks.
    """

    def dropout_rng():
        return None if dropout_seed is None else np.random.default_rng(dropout_seed)

    _, _, cache = model.forward(idx, targets, dropout_rng=dropout_rng())
    grads = model.backward(cache)
    if set(grads) != set(model.trainable_names):
        raise GradCheckError(
            f"backward returned gradients for {sorted(grads)}, "
            f"expected the trainable parameters {sorted(model.trainable_names)}"
        )

    def objective():
        return float(model.forward(idx, targets, dropout_rng=dropout_rng())[1])

    return check_gradients(objective, model.params, grads, mode=mode, eps=eps, n_samples=n_samples, seed=seed)
