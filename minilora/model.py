"""A GPT-2 language model with hand-written backprop.

The architecture is GPT-2's: learned token and position embeddings, pre-LayerNorm blocks

    x = x + dropout(c_proj(attention(c_attn(ln_1(x)))))
    x = x + dropout(mlp.c_proj(gelu(mlp.c_fc(ln_2(x)))))

a final LayerNorm, and an output head tied to the token embedding (logits = ln_f(x) @ wte^T).

Parameters live in one flat dict named exactly like the Hugging Face GPT-2 state dict
(``transformer.h.0.attn.c_attn.weight``, with its (C_in, C_out) layout), so weights can be compared
with, or loaded into, ``transformers.GPT2LMHeadModel``. Gradients use the same keys.

The forward pass returns a cache of everything the backward needs; the backward walks the blocks in
reverse and returns gradients for exactly the trainable parameters. A frozen linear weight still
passes gradient to its input, but its own weight gradient is never computed. Subclasses (LoRA) change
how a linear layer is applied by overriding ``linear_forward`` / ``linear_backward``.

The layer functions come from ``self.ops``, the reference layers (``layers.REFERENCE_OPS``) unless a
faster namespace is handed in from above (see layers/ops.py). Generation runs the same blocks: with
``kv_cache`` the forward takes only the new positions and attends over the cached keys and values.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .backend import to_device
from .config import WPE, WTE, GPTConfig
from .language_model import LanguageModel
from .layers import LayerOps

INIT_STD = 0.02  # GPT-2's initializer_range


def init_params(config: GPTConfig, seed: int = 0, dtype=np.float32, device: str | None = None) -> dict:
    """GPT-2 initialisation, drawn on the host from a seeded generator and then moved to ``device``.

    Linear and embedding weights ~ N(0, 0.02^2); the two residual projections (attn.c_proj and
    mlp.c_proj) use std 0.02 / sqrt(2 n_layer), since 2 n_layer of them add into the residual stream;
    LayerNorm gains are 1 and every bias is 0.
    """
    rng = np.random.default_rng(seed)
    residual_std = INIT_STD / math.sqrt(2 * config.n_layer)
    params = {}
    for name, shape in config.parameter_shapes().items():
        if name.endswith(".bias"):
            value = np.zeros(shape, dtype=dtype)
        elif ".ln_" in name:
            value = np.ones(shape, dtype=dtype)
        else:
            std = residual_std if name.endswith("c_proj.weight") else INIT_STD
            value = (std * rng.standard_normal(shape, dtype=np.float64)).astype(dtype)
        params[name] = to_device(value, device)
    return params


class BlockCache(NamedTuple):
    ln_1: object
    c_attn: object
    attn: object
    attn_proj: object
    attn_dropout: object  # the residual dropout mask after attn.c_proj, or None
    ln_2: object
    c_fc: object
    gelu: object
    mlp_proj: object
    mlp_dropout: object  # the residual dropout mask after mlp.c_proj, or None


class ModelCache(NamedTuple):
    ops: LayerOps  # the layer functions that made this cache: the backward uses the same ones
    token_embedding: object
    seq_len: int
    embedding_dropout: object  # mask or None
    blocks: list  # one BlockCache per layer
    ln_f: object
    head: object
    loss: object  # CrossEntropyCache, or None when no targets were given


class GPT(LanguageModel):
    """A GPT-2 model: its config, its flat parameter dict, and which parameters are frozen."""

    embedding_name = WTE  # the parameter whose array tells the model's device and dtype
    no_decay = (WTE, WPE)  # matrices that AdamW leaves undecayed: the lookup tables (optim.py)
    peft_fan_in_fan_out = True  # GPT-2's Conv1D layout, (C_in, C_out), as PEFT calls it

    def _norm_forward(self, name: str, x):
        return self.ops.layernorm_forward(x, self.params[f"{name}.weight"], self.params.get(f"{name}.bias"))

    def _norm_backward(self, name: str, dout, cache, grads: dict):
        dx, dw, db = self.ops.layernorm_backward(dout, cache)
        for key, grad in ((f"{name}.weight", dw), (f"{name}.bias", db)):
            if grad is not None and self.is_trainable(key):
                grads[key] = grad
        return dx

    def final_norm(self, x):
        """ln_f, the LayerNorm after the last block: (out, cache)."""
        return self._norm_forward("transformer.ln_f", x)

    def _dropout(self, x, rng):
        """x through a fresh dropout mask when training with dropout (rng given, p > 0): (out, mask or None)."""
        if rng is None or self.config.dropout == 0.0:
            return x, None
        mask = self.ops.make_dropout_mask(rng, x.shape, self.config.dropout, x.dtype)
        return self.ops.dropout_forward(x, mask)

    def block_forward(self, i: int, x, rng, kv_cache=None):
        """One block: x + attention branch, then + MLP branch.   x: (B, T, C) -> (B, T, C)."""
        ops, p, H = self.ops, f"transformer.h.{i}", self.config.n_head
        B, T, C = x.shape
        h, ln_1 = self._norm_forward(f"{p}.ln_1", x)
        qkv, c_attn = self.linear_forward(f"{p}.attn.c_attn", h, rng)  # (B, T, 3C)
        if kv_cache is None:
            attn_mask = None
            if rng is not None and self.config.dropout > 0:
                attn_mask = ops.make_dropout_mask(rng, (B, H, T, T), self.config.dropout, x.dtype)
            a, attn = ops.attention_forward(qkv, H, attn_mask)  # (B, T, C)
        else:  # generation: the new positions attend over the cached ones too
            a, attn = (
                ops.cached_attention_forward(qkv, H, kv_cache.keys[i], kv_cache.values[i], kv_cache.length),
                None,
            )
        a, attn_proj = self.linear_forward(f"{p}.attn.c_proj", a, rng)
        a, attn_dropout = self._dropout(a, rng)
        x = ops.residual_add(x, a)  # residual: x + a
        h, ln_2 = self._norm_forward(f"{p}.ln_2", x)
        f, c_fc = self.linear_forward(f"{p}.mlp.c_fc", h, rng)  # (B, T, 4C)
        g, gelu = ops.gelu_forward(f)
        m, mlp_proj = self.linear_forward(f"{p}.mlp.c_proj", g, rng)  # (B, T, C)
        m, mlp_dropout = self._dropout(m, rng)
        x = ops.residual_add(x, m)  # residual: x + m
        cache = BlockCache(
            ln_1=ln_1,
            c_attn=c_attn,
            attn=attn,
            attn_proj=attn_proj,
            attn_dropout=attn_dropout,
            ln_2=ln_2,
            c_fc=c_fc,
            gelu=gelu,
            mlp_proj=mlp_proj,
            mlp_dropout=mlp_dropout,
        )
        return x, cache

    def block_backward(self, i: int, dx, cache: BlockCache, grads: dict):
        """One block backwards.   dx: (B, T, C) of the block's output -> (B, T, C) of its input.

        Adds the gradients of the block's trainable parameters to ``grads``.

        Derivation (a4):
            x_mid = x + a and x_out = x_mid + m: each residual hands its gradient unchanged both to its
            input and to its branch, so the gradient of a residual's input is the sum of the two paths.
        """
        ops, p = self.ops, f"transformer.h.{i}"
        # BEGIN SOLUTION a4: walk the block backwards; the residuals fan dx out to two paths: sum them
        # x_out = x + m: the residual hands dx unchanged to x and to the MLP branch m.
        dm = dx if cache.mlp_dropout is None else ops.dropout_backward(dx, cache.mlp_dropout)
        dg = self.linear_backward(f"{p}.mlp.c_proj", dm, cache.mlp_proj, grads)
        df = ops.gelu_backward(dg, cache.gelu)
        del dg  # a spent (B, T, 4C) gradient is let go at once, as autograd does: less memory at the peak
        dh = self.linear_backward(f"{p}.mlp.c_fc", df, cache.c_fc, grads)
        del df
        dx = dx + self._norm_backward(f"{p}.ln_2", dh, cache.ln_2, grads)  # fan-out: sum both paths
        # x_mid = x + a: the same split for the attention branch.
        da = dx if cache.attn_dropout is None else ops.dropout_backward(dx, cache.attn_dropout)
        da = self.linear_backward(f"{p}.attn.c_proj", da, cache.attn_proj, grads)
        dqkv = ops.attention_backward(da, cache.attn)
        dh = self.linear_backward(f"{p}.attn.c_attn", dqkv, cache.c_attn, grads)
        return dx + self._norm_backward(f"{p}.ln_1", dh, cache.ln_1, grads)
        # END SOLUTION

    def forward(self, idx, targets=None, dropout_rng=None, kv_cache=None):
        """Logits for every position, and the mean cross-entropy if targets are given.

        idx, targets: (B, T) integer token ids (host arrays are range-checked, then moved).
        dropout_rng: a generator on the model's device (backend.device_rng); dropout is applied
        only when it is given and config.dropout > 0, so evaluation simply leaves it out.
        kv_cache: for generation (generate.KVCache): idx holds only the new positions, which come
        after the kv_cache.length cached ones; their keys and values are added to the cache.
        Returns (logits (B, T, V), loss (0-d array) or None, cache for ``backward``; None with kv_cache).
        """
        ops = self.ops
        idx = self.check_token_ids(idx, "idx")
        B, T = idx.shape
        start = self.first_position(T, kv_cache)
        wte, wpe = self.params[WTE], self.params[WPE]
        tok, token_embedding = ops.embedding_forward(idx, wte)  # (B, T, C)
        x = tok + wpe[start : start + T]  # position embeddings broadcast over the batch
        x, embedding_dropout = self._dropout(x, dropout_rng)
        blocks = []
        for i in range(self.config.n_layer):
            x, block = self.block_forward(i, x, dropout_rng, kv_cache)
            blocks.append(block)
        x, ln_f = self.final_norm(x)
        logits, head = ops.linear_forward(x, wte.T)  # tied head: W = wte^T, (C, V); logits (B, T, V)
        if kv_cache is not None:
            kv_cache.length = start + T
            return logits, None, None
        loss, loss_cache = self.loss_forward(logits, targets, idx)
        cache = ModelCache(
            ops=ops,
            token_embedding=token_embedding,
            seq_len=T,
            embedding_dropout=embedding_dropout,
            blocks=blocks,
            ln_f=ln_f,
            head=head,
            loss=loss_cache,
        )
        return logits, loss, cache

    def backward(self, cache: ModelCache, dloss: float = 1.0) -> dict:
        """Gradients of the loss for every trainable parameter, keyed like ``params``.

        Derivation (a4):
            wte is read twice, by the lookup and by the tied head (logits = h @ wte^T), so its gradient is
            the sum of the lookup's scatter-add and the head's weight gradient, transposed; wpe was
            broadcast over the batch, so its gradient is dx summed over the batch axis.
        """
        self.check_cache(cache)
        ops, grads = self.ops, {}
        # BEGIN SOLUTION a4: loss, tied head, ln_f, blocks in reverse, embeddings (wte gets two gradients)
        dlogits = ops.cross_entropy_backward(dloss, cache.loss)  # (B, T, V)
        train_wte = self.is_trainable(WTE)
        dx, dW_head, _ = ops.linear_backward(
            dlogits, cache.head, compute_dW=train_wte, compute_db=False
        )  # (B, T, C)
        dx = self._norm_backward("transformer.ln_f", dx, cache.ln_f, grads)
        for i in reversed(range(self.config.n_layer)):
            dx = self.block_backward(i, dx, cache.blocks[i], grads)
        if cache.embedding_dropout is not None:
            dx = ops.dropout_backward(dx, cache.embedding_dropout)
        if self.is_trainable(WPE):
            dwpe = self.xp.zeros(self.params[WPE].shape, dtype=dx.dtype)  # rows >= T get no gradient
            dwpe[: cache.seq_len] = dx.sum(axis=0)  # (T, C): summed over the batch it was broadcast over
            grads[WPE] = dwpe
        if train_wte:
            # wte is used twice, by the embedding lookup and by the tied head: its gradient is the sum.
            grads[WTE] = ops.embedding_backward(dx, cache.token_embedding) + dW_head.T  # (V, C)
        # END SOLUTION
        return {name: grads[name] for name in self.params if name in grads}  # in parameter order
