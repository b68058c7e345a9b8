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

Two switches trade compute for activation memory in training, as in the Llama (activation_memory.py):
``gradient_checkpointing`` keeps only each block's input and runs the block again in the backward,
drawing the same dropout masks; ``loss_chunk_rows`` takes the tied head and the loss that many rows
at a time, with wte frozen (as under LoRA).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .activation_memory import checkpointed_block_forward, chunked_head_loss
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

    def activations(self, model, i: int, example_start) -> BlockCache:
        """What block i's backward reads: this cache itself (activation_memory.BlockCheckpoint is the other kind)."""
        return self


class ModelCache(NamedTuple):
    ops: LayerOps  # the layer functions that made this cache: the backward uses the same ones
    token_embedding: object
    position_embedding: object  # packed rows: the lookup of wpe at their positions; else None (a slice)
    example_start: object  # packed rows: (B, T) where each token's example starts; else None
    seq_len: int
    embedding_dropout: object  # mask or None
    blocks: list  # one BlockCache (or, checkpointed, activation_memory.BlockCheckpoint) per layer
    ln_f: object
    head: object  # the tied head's LinearCache; None with loss chunks
    loss: object  # CrossEntropyCache, or activation_memory.ChunkedHeadLoss; None when no targets were given
    loss_chunked: bool  # whether the head and the loss were taken in chunks (loss is then a ChunkedHeadLoss)


class GPT(LanguageModel):
    """A GPT-2 model: its config, its flat parameter dict, and which parameters are frozen."""

    embedding_name = WTE  # the parameter whose array tells the model's device and dtype
    head_weight_name = WTE  # the tied head multiplies by the token table, transposed
    no_decay = (WTE, WPE)  # matrices that AdamW leaves undecayed: the lookup tables (optim.py)
    peft_fan_in_fan_out = True  # GPT-2's Conv1D layout, (C_in, C_out), as PEFT calls it
    supports_activation_memory = True

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

    def block_forward(self, i: int, x, example_start, rng, kv_cache=None):
        """One block: x + attention branch, then + MLP branch.   x: (B, T, C) -> (B, T, C).

        example_start: (B, T) for packed rows (layers/attention.py), or None.
        """
        ops, p, H = self.ops, f"transformer.h.{i}", self.config.n_head
        B, T, C = x.shape
        h, ln_1 = self._norm_forward(f"{p}.ln_1", x)
        qkv, c_attn = self.linear_forward(f"{p}.attn.c_attn", h, rng)  # (B, T, 3C)
        if kv_cache is None:
            attn_mask = None
            if rng is not None and self.config.dropout > 0:
                attn_mask = ops.make_dropout_mask(rng, (B, H, T, T), self.config.dropout, x.dtype)
            a, attn = ops.attention_forward(qkv, H, attn_mask, example_start)  # (B, T, C)
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

    def forward(self, idx, targets=None, dropout_rng=None, kv_cache=None, positions=None):
        """Logits for every position, and the mean cross-entropy if targets are given.

        idx, targets: (B, T) integer token ids (host arrays are range-checked, then moved).
        dropout_rng: a generator on the model's device (backend.device_rng); dropout is applied
        only when it is given and config.dropout > 0, so evaluation simply leaves it out.
        kv_cache: for generation (generate.KVCache): idx holds only the new positions, which come
        after the kv_cache.length cached ones; their keys and values are added to the cache.
        positions: (B, T) for rows that pack several examples (training/examples.py): each token's
        position within its example, which picks its row of wpe and keeps its attention in its example.
        Returns (logits (B, T, V), loss (0-d array) or None, cache for ``backward``; None with kv_cache).
        With ``loss_chunk_rows`` and targets the logits are never made whole: None is returned for them.
        """
        ops = self.ops
        idx = self.check_token_ids(idx, "idx")
        B, T = idx.shape
        start = self.first_position(T, kv_cache)
        wte, wpe = self.params[WTE], self.params[WPE]
        tok, token_embedding = ops.embedding_forward(idx, wte)  # (B, T, C)
        if positions is None:
            x, position_embedding = tok + wpe[start : start + T], None  # broadcast over the batch
        else:  # packed rows: each token's own position, counted from its example's start
            pos, position_embedding = ops.embedding_forward(self.check_positions(positions, idx), wpe)
            x = tok + pos  # (B, T, C)
        example_start = self.example_start(positions, T)
        x, embedding_dropout = self._dropout(x, dropout_rng)
        checkpointing = self.gradient_checkpointing and targets is not None and kv_cache is None
        x, blocks = self._blocks_forward(x, example_start, dropout_rng, kv_cache, checkpointing)
        x, ln_f = self.final_norm(x)
        if kv_cache is not None:
            kv_cache.length = start + T
            return self.head_forward(x)[0], None, None
        chunked = self.loss_chunk_rows is not None and targets is not None
        logits, loss, head, loss_cache = self._head_and_loss(x, targets, idx, chunked)
        cache = ModelCache(
            ops=ops,
            token_embedding=token_embedding,
            position_embedding=position_embedding,
            example_start=example_start,
            seq_len=T,
            embedding_dropout=embedding_dropout,
            blocks=blocks,
            ln_f=ln_f,
            head=head,
            loss=loss_cache,
            loss_chunked=chunked,
        )
        return logits, loss, cache

    def _blocks_forward(self, x, example_start, dropout_rng, kv_cache, checkpointing: bool):
        """Every block in turn: (x (B, T, C), one BlockCache, or BlockCheckpoint when checkpointing, per block)."""
        blocks = []
        for i in range(self.config.n_layer):
            if checkpointing:  # keep the input; the block's caches are let go as soon as it returns
                x, block = checkpointed_block_forward(self, i, x, example_start, dropout_rng=dropout_rng)
            else:
                x, block = self.block_forward(i, x, example_start, dropout_rng, kv_cache)
            blocks.append(block)
        return x, blocks

    def _head_and_loss(self, x, targets, idx, chunked: bool):
        """(logits, loss, head cache, loss cache): the tied head and the loss whole, or in chunks of rows.

        ``chunked`` (loss_chunk_rows, with targets): the logits are never made whole; None is returned
        for them and for the head's cache, and the loss cache is a ChunkedHeadLoss.
        """
        if chunked:
            loss, chunks = chunked_head_loss(self, x, self.check_targets(targets, idx))
            return None, loss, None, chunks
        logits, head = self.head_forward(x)  # (B, T, V)
        loss, loss_cache = self.loss_forward(logits, targets, idx)
        return logits, loss, head, loss_cache

    def head_forward(self, x):
        """The tied head, logits = x wte^T: W = wte^T, (C, V).   x: (..., C) -> (logits (..., V), LinearCache)."""
        return self.ops.linear_forward(x, self.params[WTE].T)

    def frozen_head_backward(self, dlogits, head):
        """The tied head's input gradient alone, wte's never made.   dlogits: (..., V) -> (..., C)."""
        return self.ops.linear_backward(dlogits, head, compute_dW=False, compute_db=False)[0]

    def head_backward(self, cache: ModelCache, dloss: float):
        """The loss and the tied head backwards: (dx (B, T, C), the head's weight gradient (C, V) or None).

        With loss chunks both were taken in the forward, chunk by chunk (activation_memory.py).
        """
        if cache.loss_chunked:
            return cache.loss.backward(self, dloss)
        ops = self.ops
        # BEGIN SOLUTION a4: the loss, then the tied head: a linear layer whose weight is wte^T, no bias
        dlogits = ops.cross_entropy_backward(dloss, cache.loss)  # (B, T, V)
        train_wte = self.is_trainable(WTE)
        dx, dW_head, _ = ops.linear_backward(
            dlogits, cache.head, compute_dW=train_wte, compute_db=False
        )  # (B, T, C)
        # END SOLUTION
        return dx, dW_head

    def backward(self, cache: ModelCache, dloss: float = 1.0) -> dict:
        """Gradients of the loss for every trainable parameter, keyed like ``params``.

        Derivation (a4):
            wte is read twice, by the lookup and by the tied head (logits = h @ wte^T), so its gradient is
            the sum of the lookup's scatter-add and the head's weight gradient, transposed; wpe was
            broadcast over the batch, so its gradient is dx summed over the batch axis (packed rows looked
            their positions up instead, and the lookup's backward sums the rows of each position).
        """
        self.check_cache(cache)
        ops, grads = self.ops, {}
        # BEGIN SOLUTION a4: head_backward, ln_f, blocks in reverse, embeddings (wte gets two gradients)
        dx, dW_head = self.head_backward(cache, dloss)  # (B, T, C); (C, V) or None
        dx = self._norm_backward("transformer.ln_f", dx, cache.ln_f, grads)
        for i in reversed(range(self.config.n_layer)):
            activations = cache.blocks[i].activations(self, i, cache.example_start)  # a checkpoint runs again
            dx = self.block_backward(i, dx, activations, grads)
        if cache.embedding_dropout is not None:
            dx = ops.dropout_backward(dx, cache.embedding_dropout)
        if self.is_trainable(WPE):
            dwpe = self.xp.zeros(self.params[WPE].shape, dtype=dx.dtype)  # rows >= T get no gradient
            if cache.position_embedding is None:  # one sequence per row: wpe[:T] broadcast over the batch
                dwpe[: cache.seq_len] = dx.sum(axis=0)  # (T, C): summed over the batch it was broadcast over
            else:  # packed rows looked their positions up: the lookup's backward sums each position's rows
                dwpe += ops.embedding_backward(dx, cache.position_embedding)
            grads[WPE] = dwpe
        if self.is_trainable(WTE):
            # wte is used twice, by the embedding lookup and by the tied head: its gradient is the sum.
            grads[WTE] = ops.embedding_backward(dx, cache.token_embedding) + dW_head.T  # (V, C)
        # END SOLUTION
        return {name: grads[name] for name in self.params if name in grads}  # in parameter order
