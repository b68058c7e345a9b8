"""Optimisers over a flat parameter dict: AdamW, SGD with momentum, gradient clipping, LR schedule.

An optimiser is built for a list of trainable names and keeps state (moments, momentum buffers) for
those names only. ``lr_scale`` gives some parameters a multiple of the learning rate: LoRA+ (Hayou
et al., 2024) trains lora_B with a rate ratio times larger than lora_A's. With LoRA that list is the
adapter's few tensors, and the optimiser's memory shrinks with it: Adam keeps two extra numbers per trainable parameter.

Updates are in place on the arrays of ``params``, with the same arithmetic as ``torch.optim``, so
both can be compared step by step on the same gradients.
"""

from __future__ import annotations

import math

from .backend import get_xp


def default_decay_names(params: dict, names, no_decay=()) -> set[str]:
    """The parameters that get weight decay by default: matrices, except those named in ``no_decay``.

    Biases and norm gains (vectors) are never decayed, and a model names the matrices it also keeps
    out (``model.no_decay``: the GPT's token and position tables, the Llama's token table): shrinking
    a gain or a lookup table towards 0 is not regularisation. That is minGPT's choice (it decays only
    the weights of linear layers); nanoGPT decays every tensor of two or more dimensions, embeddings
    included.
    """
    return {name for name in names if params[name].ndim >= 2 and name not in no_decay}


class Optimizer:
    """Shared bookkeeping: the trainable names, their decay set, the step count, state save/load."""

    state_names: tuple[str, ...] = ()  # the per-parameter state buffers a subclass keeps

    def __init__(
        self,
        params: dict,
        names,
        lr: float,
        weight_decay: float,
        decay_names=None,
        lr_scale=None,
        no_decay=(),
    ):
        self.params = params
        self.names = list(names)
        missing = [name for name in self.names if name not in params]
        if missing:
            raise KeyError(f"optimiser asked to train unknown parameters {missing}")
        if lr <= 0 or weight_decay < 0:
            raise ValueError(f"need lr > 0 and weight_decay >= 0, got lr={lr}, weight_decay={weight_decay}")
        self.lr = lr
        self.weight_decay = weight_decay
        self.decay_names = (
            default_decay_names(params, self.names, no_decay) if decay_names is None else set(decay_names)
        )
        self.lr_scale = dict(lr_scale or {})  # name -> factor on the learning rate (LoRA+ scales lora_B's)
        unknown = sorted(set(self.lr_scale) - set(self.names))
        if unknown:
            raise KeyError(f"lr_scale names parameters the optimiser does not train: {unknown}")
        self.step_count = 0
        self.state = {kind: {} for kind in self.state_names}  # kind -> name -> array, created on first step

    def begin_step(self, grads: dict, lr: float | None = None) -> tuple[float, int]:
        """Check the gradients' names and count the step: (this step's lr, its number t from 1).

        Every update calls this first, the readable ones below and any fused one from the fast path.
        """
        self._check_grads(grads)
        self.step_count += 1
        return (self.lr if lr is None else lr), self.step_count

    def _check_grads(self, grads: dict) -> None:
        if set(grads) != set(self.names):
            missing = sorted(set(self.names) - set(grads))
            unexpected = sorted(set(grads) - set(self.names))
            raise KeyError(
                f"gradients do not match the trainable parameters: missing {missing}, unexpected {unexpected}"
            )

    def buffer(self, kind: str, name: str):
        """The state buffer ``kind`` (e.g. 'exp_avg') of a parameter, zeros when first asked for."""
        buffers = self.state[kind]
        if name not in buffers:
            p = self.params[name]
            buffers[name] = get_xp(p).zeros(p.shape, dtype=p.dtype)
        return buffers[name]

    def state_dict(self) -> dict:
        """A flat dict of arrays ('exp_avg.<param>', ...) plus the step count, for checkpoints."""
        flat = {
            f"{kind}.{name}": array for kind, buffers in self.state.items() for name, array in buffers.items()
        }
        return {"step_count": self.step_count, "buffers": flat}

    def load_state_dict(self, state: dict) -> None:
        for key, array in state["buffers"].items():
            kind, name = key.split(".", 1)
            if kind not in self.state or name not in self.names:
                raise KeyError(f"optimiser state has unexpected key {key!r}")
            if tuple(array.shape) != tuple(self.params[name].shape):
                raise ValueError(
                    f"optimiser state {key!r} has shape {tuple(array.shape)}, "
                    f"parameter has {tuple(self.params[name].shape)}"
                )
            # a copy, so that the saved state and the running optimiser never share a buffer
            self.state[kind][name] = get_xp(self.params[name]).array(
                array, dtype=self.params[name].dtype, copy=True
            )
        self.step_count = int(state["step_count"])


class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter, 2019), as torch.optim.AdamW.

    For each trainable p with gradient g, at step t = 1, 2, ...: first the decoupled decay, which
    shrinks p by the factor (1 - lr * wd), only for decay_names and never through the gradient; then
    the moments, exponential moving averages of g (m, rate b1) and of g^2 (v, rate b2), both
    starting at zero; then the step p <- p - lr * m_hat / (sqrt(v_hat) + eps), where m_hat and v_hat
    are m and v with the bias of their zero start divided out. A parameter's lr is lr * lr_scale.

    Derivation (a6):
        Unrolled, m_t = (1 - b1) sum_{i=1..t} b1^(t-i) g_i; for a constant gradient g this is
        (1 - b1^t) g, so m_hat = m_t / (1 - b1^t), and likewise v_hat = v_t / (1 - b2^t). In full:

            p  <- p * (1 - lr * wd)                    (decoupled decay, only for decay_names)
            m  <- b1 m + (1 - b1) g                    (first moment)
            v  <- b2 v + (1 - b2) g^2                  (second moment)
            p  <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

        (torch's arrangement of the same update: eps is added to sqrt(v_hat), not to v.) At t = 1,
        m_hat = g and v_hat = g^2, so every weight moves by about lr against the sign of its gradient.
    """

    state_names = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: dict,
        names,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        decay_names=None,
        lr_scale=None,
        no_decay=(),
    ):
        super().__init__(params, names, lr, weight_decay, decay_names, lr_scale, no_decay)
        self.beta1, self.beta2 = betas
        self.eps = eps

    def step(self, grads: dict, lr: float | None = None) -> None:
        """One update of every trainable parameter, in place; ``lr`` is this step's rate (None: self.lr).

        The gradients are read, never written: a caller may still log them or accumulate into them.
        """
        lr, t = self.begin_step(grads, lr)
        for name in self.names:
            p, g = self.params[name], grads[name]
            m, v = self.buffer("exp_avg", name), self.buffer("exp_avg_sq", name)  # zeros at t = 1
            lr_p = lr * self.lr_scale.get(name, 1.0)
            # BEGIN SOLUTION a6: decoupled decay (decay_names only), m and v in place, the bias-corrected step
            bias_correction1 = 1.0 - self.beta1**t
            sqrt_bias_correction2 = math.sqrt(1.0 - self.beta2**t)
            step_size = lr_p / bias_correction1
            if name in self.decay_names and self.weight_decay:
                p *= 1.0 - lr_p * self.weight_decay  # decoupled: the decay never enters m or v
            m *= self.beta1
            m += (1.0 - self.beta1) * g
            v *= self.beta2
            v += (1.0 - self.beta2) * (g * g)
            denom = get_xp(v).sqrt(v) / sqrt_bias_correction2 + self.eps
            p -= step_size * (m / denom)
            # END SOLUTION


class SGD(Optimizer):
    """Stochastic gradient descent with momentum, as torch.optim.SGD (dampening 0).

    g   <- g + wd * p                (L2 weight decay, only for decay_names)
    buf <- momentum * buf + g        (buf starts at 0, so the first step uses g)
    p   <- p - lr * buf              (or lr * (g + momentum * buf) with Nesterov)
    """

    state_names = ("momentum_buffer",)

    def __init__(
        self,
        params: dict,
        names,
        lr: float = 1e-2,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        decay_names=None,
        lr_scale=None,
        no_decay=(),
    ):
        super().__init__(params, names, lr, weight_decay, decay_names, lr_scale, no_decay)
        self.momentum = momentum
        self.nesterov = nesterov

    def step(self, grads: dict, lr: float | None = None) -> None:
        lr, _ = self.begin_step(grads, lr)
        for name in self.names:
            p, g = self.params[name], grads[name]
            if self.weight_decay and name in self.decay_names:
                g = g + self.weight_decay * p
            if self.momentum:
                buf = self.buffer("momentum_buffer", name)
                buf *= self.momentum
                buf += g
                g = g + self.momentum * buf if self.nesterov else buf
            p -= (lr * self.lr_scale.get(name, 1.0)) * g


def clip_grad_norm(grads: dict, max_norm: float):
    """Scale all gradients together so that their global L2 norm is at most ``max_norm``.

    Returns the norm before clipping as a device scalar in the gradients' dtype (reading it as a
    float syncs a GPU, so callers do that only when they log). Like torch.nn.utils.clip_grad_norm_,
    the factor is max_norm / (norm + 1e-6), applied only when it is below 1.
    """
    arrays = list(grads.values())
    xp = get_xp(arrays[0])
    # BEGIN SOLUTION a6: the global norm of every element of every gradient, then scale_to_norm
    total_norm = xp.sqrt(sum((g * g).sum() for g in arrays))  # sqrt of the sum of every squared element
    scale_to_norm(arrays, total_norm, max_norm)
    # END SOLUTION
    return total_norm


def scale_to_norm(arrays, total_norm, max_norm: float) -> None:
    """Multiply every array, in place, by min(1, max_norm / (total_norm + 1e-6)), total_norm their global norm.

    ``total_norm`` is a 0-d array (or a NumPy scalar) on the arrays' device; each array keeps its dtype.
    """
    # BEGIN SOLUTION a6: one factor min(1, max_norm / (total_norm + 1e-6)) for all, each array scaled in place
    clip_coef = get_xp(total_norm).minimum(max_norm / (total_norm + 1e-6), 1.0)
    for g in arrays:
        g *= clip_coef.astype(g.dtype)
    # END SOLUTION


def cosine_lr(
    step: int, max_lr: float, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0
) -> float:
    """Learning rate at ``step`` (0-based): linear warmup, then cosine decay to ``min_lr``.

    Warmup rises linearly over the steps 0 .. warmup_steps - 1, from max_lr / warmup_steps at step 0
    to max_lr at its last step. Then half a cosine period takes the rate from max_lr (at step
    warmup_steps) down to min_lr (at step total_steps), and it stays at min_lr from there on.

    The rate is a Python float: a NumPy float64 would make every float32 update it multiplies
    float64 (NumPy 2's promotion), doubling the optimiser's memory traffic.

    Derivation (a6):
        Warmup: max_lr * (step + 1) / warmup_steps for step < warmup_steps. Then, with progress going
        from 0 to 1 over the remaining steps, progress = (step - warmup_steps) / (total_steps -
        warmup_steps) and lr = min_lr + (max_lr - min_lr) * (1 + cos(pi * progress)) / 2.
    """
    # BEGIN SOLUTION a6: linear warmup to max_lr, half a cosine down to min_lr, then min_lr
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    # END SOLUTION
