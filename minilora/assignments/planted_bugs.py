"""The planted bugs of the assignments, as the patch files in bugs/ (``python -m minilora.assignments.planted_bugs``).

Each bug is one textual change to the reference release of an assignment: a classic mistake that a
grader must catch by a wrong number, not by a crash. Running this module rewrites bugs/*.patch
(unified diffs against the reference release's student/ files); ``pipeline.verify`` applies them.
Rerun it after editing a hole's code, when a patch stops applying.
"""

from __future__ import annotations

import difflib
import tempfile
from pathlib import Path

from .pipeline import BUGS_DIR
from .release import STUDENT_DIR, release

# (assignment, file, name, reference text, buggy text)
BUGS = [
    ("a1", "gelu.py", "missing_half", "dout * (0.5 * (1.0 + t) +", "dout * ((1.0 + t) +"),
    (
        "a1",
        "cross_entropy.py",
        "forgot_mean",
        "(cache.probs - onehot) * (dloss * cache.weights[:, None])",
        "(cache.probs - onehot) * dloss",
    ),
    (
        "a1",
        "linear.py",
        "bias_gradient_of_one_row",
        "db = dout_rows.sum(axis=0) if cache.has_bias and compute_db else None",
        "db = dout_rows[0] if cache.has_bias and compute_db else None",
    ),
    (
        "a2",
        "layernorm.py",
        "dropped_variance_term",
        "rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat)",
        "rstd * (dxhat - mean_dxhat)",
    ),
    (
        "a2",
        "embedding.py",
        "fancy_index_add",
        "scatter_add(dtable, cache.ids.reshape(-1), dout.reshape(-1, C))",
        "dtable[cache.ids.reshape(-1)] += dout.reshape(-1, C)",
    ),
    ("a3", "attention.py", "missing_scale", "dq = matmul(ds, k) * cache.scale", "dq = matmul(ds, k)"),
    (
        "a3",
        "attention.py",
        "no_causal_mask",
        "    scores = scores + causal_bias(xp, q.shape[2], k.shape[2], scores.dtype)  # no attending to later keys\n",
        "",
    ),
    (
        "a4",
        "model.py",
        "residual_not_summed",
        'dx = dx + self._norm_backward(f"{p}.ln_2", dh, cache.ln_2, grads)',
        'dx = self._norm_backward(f"{p}.ln_2", dh, cache.ln_2, grads)',
    ),
    (
        "a4",
        "model.py",
        "tied_head_gradient_dropped",
        "grads[WTE] = ops.embedding_backward(dx, cache.token_embedding) + dW_head.T",
        "grads[WTE] = ops.embedding_backward(dx, cache.token_embedding)",
    ),
    ("a5", "layer.py", "forgot_scale_in_dB", "    dlora_B *= cache.scaling\n", ""),
    (
        "a5",
        "layer.py",
        "merge_without_scale",
        "return scaling * matmul(lora_A.T, lora_B.T)",
        "return matmul(lora_A.T, lora_B.T)",
    ),
    # The classes a grader used to miss: overflow at large inputs, float32 silently promoted to float64,
    # a dropout mask forgotten on the way back, a frozen weight's gradient product made anyway.
    (
        "a1",
        "cross_entropy.py",
        "unshifted_softmax",
        "shifted = logits - logits.max(axis=-1, keepdims=True)",
        "shifted = logits",
    ),
    (
        "a1",
        "gelu.py",
        "float64_result",
        "out = 0.5 * x * (1.0 + t)",
        'out = 0.5 * x.astype("float64") * (1.0 + t)',
    ),
    (
        "a2",
        "layernorm.py",
        "one_pass_variance",
        "var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)",
        "var = (x**2).mean(axis=-1, keepdims=True) - mean**2",
    ),
    (
        "a2",
        "layernorm.py",
        "float64_rstd",
        "rstd = 1.0 / xp.sqrt(var + eps)",
        'rstd = 1.0 / xp.sqrt(var.astype("float64") + eps)',
    ),
    (
        "a3",
        "attention.py",
        "unshifted_softmax",
        "att = xp.exp(scores - scores.max(axis=-1, keepdims=True))",
        "att = xp.exp(scores)",
    ),
    (
        "a3",
        "attention.py",
        "mask_forgotten_in_backward",
        "datt = datt_used if mask is None else datt_used * mask",
        "datt = datt_used",
    ),
    ("a4", "model.py", "frozen_head_weight_gradient", "compute_dW=train_wte", "compute_dW=True"),
    (
        "a4",
        "model.py",
        "embedding_dropout_forgotten",
        "dx = ops.dropout_backward(dx, cache.embedding_dropout)",
        "dx = dx",
    ),
    ("a5", "layer.py", "mask_forgotten_in_dx", "dx *= cache.dropout_mask", "dx *= 1.0"),
    (
        "a5",
        "layer.py",
        "float64_low_rank_activation",
        "h = matmul(x_in, lora_A.T)",
        'h = matmul(x_in.astype("float64"), lora_A.T.astype("float64"))',
    ),
    ("a2", "layernorm.py", "forgot_eps", "rstd = 1.0 / xp.sqrt(var + eps)", "rstd = 1.0 / xp.sqrt(var)"),
    (
        "a3",
        "attention.py",
        "scale_by_head_size",
        "scale = 1.0 / math.sqrt(q.shape[-1])",
        "scale = 1.0 / q.shape[-1]",
    ),
    (
        "a4",
        "model.py",
        "position_gradient_of_one_sequence",
        "dwpe[: cache.seq_len] = dx.sum(axis=0)",
        "dwpe[: cache.seq_len] = dx[0]",
    ),
    ("a5", "layer.py", "forgot_scale_in_dh", "    dh *= cache.scaling\n", ""),
    # a4: dloss, the loss gradient a data-parallel or accumulation step passes, and a float64 leak
    (
        "a4",
        "model.py",
        "dloss_ignored",
        "cross_entropy_backward(dloss, cache.loss)",
        "cross_entropy_backward(1.0, cache.loss)",
    ),
    (
        "a4",
        "model.py",
        "dloss_as_a_float64_array",
        "cross_entropy_backward(dloss, cache.loss)",
        "cross_entropy_backward(self.xp.asarray(dloss), cache.loss)",
    ),
    (
        "a4",
        "model.py",
        "dloss_twice_on_the_tied_head",
        "+ dW_head.T  # (V, C)",
        "+ dloss * dW_head.T  # (V, C)",
    ),
    (
        "a4",
        "model.py",
        "float64_position_gradient",
        "dwpe = self.xp.zeros(self.params[WPE].shape, dtype=dx.dtype)",
        "dwpe = self.xp.zeros(self.params[WPE].shape)",
    ),
    # a1-a3: a frozen bias's gradient summed anyway, a causal mask right only for T_q = T_k, float64
    # leaking out of a float32 layer, an argument changed in place (its caller reuses it), and a
    # backward that differentiates its own forward numerically
    (
        "a1",
        "linear.py",
        "compute_db_ignored",
        "db = dout_rows.sum(axis=0) if cache.has_bias and compute_db else None",
        "db = dout_rows.sum(axis=0) if cache.has_bias else None",
    ),
    (
        "a1",
        "linear.py",
        "float64_bias_gradient",
        "db = dout_rows.sum(axis=0) if cache.has_bias and compute_db else None",
        'db = dout_rows.sum(axis=0, dtype="float64") if cache.has_bias and compute_db else None',
    ),
    (
        "a1",
        "cross_entropy.py",
        "float64_one_hot",
        "onehot = xp.zeros_like(cache.probs)",
        "onehot = xp.zeros(cache.probs.shape)",
    ),
    (
        "a1",
        "cross_entropy.py",
        "logits_shifted_in_place",
        "shifted = logits - logits.max(axis=-1, keepdims=True)",
        "logits -= logits.max(axis=-1, keepdims=True)\n    shifted = logits",
    ),
    (
        "a1",
        "gelu.py",
        "dout_scaled_in_place",
        "dx = dout * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t**2) * du_dx)",
        "dout *= 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t**2) * du_dx\n    dx = dout",
    ),
    (
        "a1",
        "gelu.py",
        "backward_by_complex_step_of_the_forward",
        "dx = dout * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t**2) * du_dx)",
        "dx = dout * gelu_forward(x + 1e-30j)[0].imag / 1e-30",
    ),
    (
        "a2",
        "embedding.py",
        "float64_zero_table",
        "dtable = xp.zeros((V, C), dtype=dout.dtype)",
        "dtable = xp.zeros((V, C))",
    ),
    (
        "a2",
        "layernorm.py",
        "float64_weight_gradient",
        "dw = (dout * xhat).reshape(-1, C).sum(axis=0)",
        'dw = (dout * xhat).reshape(-1, C).sum(axis=0, dtype="float64")',
    ),
    (
        "a2",
        "layernorm.py",
        "dout_scaled_in_place",
        "    dxhat = dout * w  # (..., C)\n",
        "    dxhat = dout  # (..., C)\n    dxhat *= w\n",
    ),
    (
        "a2",
        "layernorm.py",
        "x_centred_in_place",
        "var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)  # (..., 1)\n"
        "    rstd = 1.0 / xp.sqrt(var + eps)  # (..., 1)\n"
        "    xhat = (x - mean) * rstd",
        "x -= mean\n"
        "    var = (x**2).mean(axis=-1, keepdims=True)  # (..., 1)\n"
        "    rstd = 1.0 / xp.sqrt(var + eps)  # (..., 1)\n"
        "    xhat = x * rstd",
    ),
    (
        "a3",
        "attention.py",
        "causal_mask_from_the_scores_shape",
        "scores = scores + causal_bias(xp, q.shape[2], k.shape[2], scores.dtype)",
        "scores = scores + xp.triu(xp.full(scores.shape[-2:], -xp.inf, dtype=scores.dtype), k=1)",
    ),
    ("a3", "attention.py", "causal_bias_on_the_diagonal", "k=T_k - T_q + 1)", "k=1)"),
    (
        "a3",
        "attention.py",
        "float64_causal_bias",
        "xp.full((T_q, T_k), -xp.inf, dtype=dtype)",
        "xp.full((T_q, T_k), -xp.inf)",
    ),
    (
        "a3",
        "attention.py",
        "float64_scale",
        "scale = 1.0 / math.sqrt(q.shape[-1])",
        "scale = 1.0 / xp.sqrt(q.shape[-1])",
    ),
    ("a3", "attention.py", "q_scaled_in_place", "q = q * scale", "q *= scale"),
    # a6: the optimiser's classic slips, each caught by the update or the schedule written out
    ("a6", "optim.py", "no_bias_correction_of_m", "step_size = lr_p / bias_correction1", "step_size = lr_p"),
    (
        "a6",
        "optim.py",
        "no_bias_correction_of_v",
        "denom = get_xp(v).sqrt(v) / sqrt_bias_correction2 + self.eps",
        "denom = get_xp(v).sqrt(v) + self.eps",
    ),
    (
        "a6",
        "optim.py",
        "l2_decay_through_the_gradient",
        "p *= 1.0 - lr_p * self.weight_decay  # decoupled: the decay never enters m or v",
        "g = g + self.weight_decay * p  # L2: through the gradient, and so through m and v",
    ),
    (
        "a6",
        "optim.py",
        "decay_on_every_parameter",
        "if name in self.decay_names and self.weight_decay:",
        "if self.weight_decay:",
    ),
    (
        "a6",
        "optim.py",
        "clipping_scales_small_gradients_up",
        "clip_coef = get_xp(total_norm).minimum(max_norm / (total_norm + 1e-6), 1.0)",
        "clip_coef = get_xp(total_norm).asarray(max_norm / (total_norm + 1e-6))",
    ),
    (
        "a6",
        "optim.py",
        "warmup_starts_at_zero",
        "return max_lr * (step + 1) / warmup_steps",
        "return max_lr * step / warmup_steps",
    ),
    # a7: DoRA's two backwards, rsLoRA's scale and PiSSA's split
    ("a7", "dora.py", "magnitude_gradient_not_divided_by_the_norm", "dm = du_dot_u / n", "dm = du_dot_u"),
    (
        "a7",
        "dora.py",
        "norm_gradient_of_the_wrong_sign",
        "c = -du_dot_u * m / (n * n)",
        "c = du_dot_u * m / (n * n)",
    ),
    ("a7", "dora.py", "norm_derivative_without_1_over_n", "dV = V * (c / n)", "dV = V * c"),
    ("a7", "layer.py", "rslora_scale_as_alpha_over_r", "(r**0.5 if use_rslora else r)", "r"),
    ("a7", "init.py", "pissa_without_the_scale", "root = np.sqrt(S[:r] / scaling)", "root = np.sqrt(S[:r])"),
    (
        "a7",
        "init.py",
        "pissa_singular_values_all_in_lora_A",
        "lora_B = Vt[:r].T * root[None, :]",
        "lora_A = lora_A * root[:, None]\n    lora_B = Vt[:r].T",
    ),
]


def write_patches(assignment_ids=None) -> list[Path]:
    """Rewrite the patches of ``assignment_ids`` (all assignments by default); returns their paths."""
    written = []
    for assignment_id, file_name, name, old, new in BUGS:
        if assignment_ids and assignment_id not in assignment_ids:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            release(assignment_id, tmp, solved=True)
            text = (Path(tmp) / STUDENT_DIR / file_name).read_text()
            if text.count(old) != 1:
                raise ValueError(
                    f"{assignment_id}_{name}: {old!r} occurs {text.count(old)} times in {file_name}"
                )
            buggy = text.replace(old, new)
            diff = difflib.unified_diff(
                text.splitlines(keepends=True),
                buggy.splitlines(keepends=True),
                f"a/{file_name}",
                f"b/{file_name}",
            )
            path = BUGS_DIR / f"{assignment_id}_{name}.patch"
            path.write_text("".join(diff))
            written.append(path)
    return written


if __name__ == "__main__":
    import sys

    for path in write_patches(sys.argv[1:]):  # e.g. `python -m minilora.assignments.planted_bugs a6 a7`
        print(path.name)
