"""AdamW over many tensors in one kernel launch, with the arithmetic of minilora.optim.AdamW.

The reference step makes about a dozen passes over every tensor (one per array operation) and
launches as many kernels per tensor. Here each element is read once (p, g, m, v) and written once
(p, m, v) by one launch for all tensors, through a tensor table (see tensor_table). Per step, the
host sends only two small numbers per tensor: its step size lr / (1 - beta1^t) and its decay factor
1 - lr * wd (1 for tensors without decay), rounded to the parameters' dtype exactly as the reference's
Python scalars are.

Gradient clipping needs no host sync either: ``grad_scale``, a 0-d device array (e.g. the clip
coefficient min(1, max_norm / (norm + 1e-6)) from global_grad_norm), multiplies every gradient as it
is read. The gradient arrays themselves are left unchanged.
"""

from __future__ import annotations

import math

import numpy as np

from .blocks import NULL, KernelModule
from .tensor_table import CHUNK, CHUNK_THREADS, tensor_table

_SOURCE = r"""
// Block b updates chunk b: elements [start, start + chunk) of tensor t (fewer at the tensor's end).
// pointers holds 4 rows of n_tensors addresses: parameters, gradients, exp_avgs, exp_avg_sqs.
// per_tensor holds 2 rows of n_tensors numbers: step sizes, then decay factors.
template <typename Real>
__global__ void adamw_multi_tensor(const unsigned long long* pointers, const long long* sizes,
                                   const long long* chunk_tensor, const long long* chunk_start,
                                   const Real* per_tensor, const Real* grad_scale, long long n_tensors,
                                   long long chunk, Real beta1, Real one_minus_beta1, Real beta2,
                                   Real one_minus_beta2, Real eps, Real sqrt_bias_correction2) {
    const long long t = chunk_tensor[blockIdx.x], start = chunk_start[blockIdx.x];
    const long long end = start + chunk < sizes[t] ? start + chunk : sizes[t];
    Real* p = reinterpret_cast<Real*>(pointers[t]);
    const Real* g = reinterpret_cast<const Real*>(pointers[n_tensors + t]);
    Real* m = reinterpret_cast<Real*>(pointers[2 * n_tensors + t]);
    Real* v = reinterpret_cast<Real*>(pointers[3 * n_tensors + t]);
    const Real step_size = per_tensor[t], decay = per_tensor[n_tensors + t];
    const Real scale = grad_scale != nullptr ? *grad_scale : Real(1);
    for (long long e = start + threadIdx.x; e < end; e += blockDim.x) {
        const Real grad = g[e] * scale;
        const Real m_e = beta1 * m[e] + one_minus_beta1 * grad;          // first moment
        const Real v_e = beta2 * v[e] + one_minus_beta2 * (grad * grad);  // second moment
        m[e] = m_e;
        v[e] = v_e;
        // decoupled decay first, then the Adam step: p - lr/bc1 * m / (sqrt(v) / sqrt(bc2) + eps)
        p[e] = p[e] * decay - step_size * (m_e / (sqrt(v_e) / sqrt_bias_correction2 + eps));
    }
}
"""
_KERNELS = KernelModule(_SOURCE, ("adamw_multi_tensor",))


def adamw_step_fused(
    params: list,
    grads: list,
    exp_avgs: list,
    exp_avg_sqs: list,
    lrs: list,
    decay: list,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    grad_scale=None,
) -> None:
    """One AdamW step, in place on params, exp_avgs and exp_avg_sqs (as torch.optim.AdamW).

    params, grads, exp_avgs, exp_avg_sqs: matching lists of CuPy arrays of one dtype (params and
    state C-contiguous); lrs: each tensor's learning rate (lr times its lr_scale); decay: whether
    each tensor gets weight decay; step: this step's number, from 1 (for the bias corrections);
    grad_scale: None or a 0-d device array multiplying every gradient.
    """
    import cupy

    if not len(params) == len(lrs) == len(decay):
        raise ValueError(f"{len(params)} parameters, {len(lrs)} learning rates, {len(decay)} decay flags")
    if step < 1:
        raise ValueError(f"step counts from 1, got {step}")
    if not params:
        return
    dtype = params[0].dtype
    grads = [cupy.ascontiguousarray(g) for g in grads]  # a view is copied; params and state must not be
    table = tensor_table(params, grads, exp_avgs, exp_avg_sqs)
    if table.n_chunks == 0:
        return
    bias_correction1 = 1.0 - beta1**step
    sqrt_bias_correction2 = math.sqrt(1.0 - beta2**step)
    per_tensor = np.array(
        [
            [lr / bias_correction1 for lr in lrs],
            [1.0 - lr * weight_decay if weight_decay and d else 1.0 for lr, d in zip(lrs, decay)],
        ],
        dtype=dtype,
    )  # (2, n_tensors)
    scale = NULL if grad_scale is None else cupy.ascontiguousarray(grad_scale, dtype=dtype)
    real = dtype.type
    _KERNELS.get("adamw_multi_tensor", dtype)(
        (table.n_chunks,),
        (CHUNK_THREADS,),
        (
            table.pointers,
            table.sizes,
            table.chunk_tensor,
            table.chunk_start,
            cupy.asarray(per_tensor),
            scale,
            table.n_tensors,
            CHUNK,
            real(beta1),
            real(1.0 - beta1),
            real(beta2),
            real(1.0 - beta2),
            real(eps),
            real(sqrt_bias_correction2),
        ),
    )
