"""A Llama-family language model (SmolLM2, Llama 2 and 3) with hand-written backprop.

The architecture differs from GPT-2's in four places, each a layer of its own in layers/:

    x = x + o_proj(attention(rope(q_proj(h)), rope(k_proj(h)), v_proj(h)))     h = rmsnorm(x)
    x = x + down_proj(silu(gate_proj(h)) * up_proj(h))                          h = rmsnorm(x)

- RMSNorm instead of LayerNorm (no mean, no bias);
- rotary position embeddings on q and k instead of a learned position table;
- grouped-query attention: n_kv_head key/value heads shared by n_head query heads;
- a SwiGLU MLP with three bias-free projections.

Parameters use Hugging Face's Llama names (``model.layers.0.self_attn.q_proj.weight``, PEFT's target
names), in minilora's linear layout: W of shape (C_in, C_out), the transpose of ``torch.nn.Linear``'s,
so that every projection is the same ``linear_forward(x, W)`` as in the GPT. The output head is tied
to the token embedding unless the config says otherwise.

Like the GPT, the model calls its layer functions through ``self.ops``, every linear layer through
the ``linear_forward`` / ``linear_backward`` hooks (where LoRA adds its path), and generation runs
the same blocks with a key/value cache (``forward(idx, kv_cache=...)``).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np

from .backend import to_device
from .language_model import LanguageModel
from .layers import ROPE_PAIRINGS, LayerOps, merge_heads, rope_tables, to_heads
from .layers.quantized_linear import (
    QuantizedLinearCache,
    quantized_embedding_forward,
    quantized_linear_backward,
    quantized_linear_forward,
)
from .quant.weight import QuantizedWeight

EMBED = "model.embed_tokens.weight"
NORM = "model.norm"
HEAD = "lm_head"  # its weight exists only when the head is not tied to the embedding
INIT_STD = 0.02  # Hugging Face's initializer_range for Llama
LLAMA_LINEAR_MODULES = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)  # fmt: skip


@dataclass(frozen=True)
class LlamaConfig:
    n_layer: int = 2  # transformer blocks
    n_head: int = 4  # query heads (H)
    n_kv_head: int = 2  # key/value heads (H_kv); n_head must be a multiple of it
    n_embd: int = 64  # channels of the residual stream (C)
    ffn_hidden: int = 128  # width of the SwiGLU MLP (Hugging Face's intermediate_size)
    vocab_size: int = 256  # V
    block_size: int = 128  # the longest sequence (context length)
    rope_theta: float = 10000.0  # the rotary embedding's base
    rms_eps: float = 1e-5  # RMSNorm's epsilon
    rope_pairing: str = (
        "half"  # "half" for Hugging Face's weights, "adjacent" for GGUF's (see layers/rope.py)
    )
    tie_embeddings: bool = True  # the output head is the token embedding, transposed

    def __post_init__(self):
        for field in ("n_layer", "n_head", "n_kv_head", "n_embd", "ffn_hidden", "vocab_size", "block_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"LlamaConfig.{field} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0 or (self.n_embd // self.n_head) % 2 != 0:
            raise ValueError(
                f"LlamaConfig.n_embd={self.n_embd} must be n_head={self.n_head} times an even head size"
            )
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(
                f"LlamaConfig.n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}"
            )
        if self.rope_pairing not in ROPE_PAIRINGS:
            raise ValueError(
                f"LlamaConfig.rope_pairing must be one of {ROPE_PAIRINGS}, got {self.rope_pairing!r}"
            )

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)


def llama_parameter_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape, in the order of a Hugging Face Llama state dict."""
    C, F, V = config.n_embd, config.ffn_hidden, config.vocab_size
    kv = config.n_kv_head * config.head_size  # width of k and v
    shapes = {EMBED: (V, C)}
    for i in range(config.n_layer):
        p = f"model.layers.{i}"
        shapes.update({
            f"{p}.input_layernorm.weight": (C,),
            f"{p}.self_attn.q_proj.weight": (C, C),
            f"{p}.self_attn.k_proj.weight": (C, kv),
            f"{p}.self_attn.v_proj.weight": (C, kv),
            f"{p}.self_attn.o_proj.weight": (C, C),
            f"{p}.post_attention_layernorm.weight": (C,),
            f"{p}.mlp.gate_proj.weight": (C, F),
            f"{p}.mlp.up_proj.weight": (C, F),
            f"{p}.mlp.down_proj.weight": (F, C),
        })  # fmt: skip
    shapes[f"{NORM}.weight"] = (C,)
    if not config.tie_embeddings:
        shapes[f"{HEAD}.weight"] = (C, V)
    return shapes


def init_llama_params(
    config: LlamaConfig, seed: int = 0, dtype=np.float32, device: str | None = None
) -> dict:
    """Weights ~ N(0, 0.02^2) and RMSNorm gains 1, drawn on the host from a seeded generator, then moved."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in llama_parameter_shapes(config).items():
        if len(shape) == 1:
            value = np.ones(shape, dtype=dtype)
        else:
            value = (INIT_STD * rng.standard_normal(shape, dtype=np.float64)).astype(dtype)
        params[name] = to_device(value, device)
    return params


class LlamaBlockCache(NamedTuple):
    input_norm: object
    q_proj: object
    k_proj: object
    v_proj: object
    rope_q: object
    rope_k: object
    attn: object  # None in generation
    o_proj: object
    post_norm: object
    gate_proj: object
    up_proj: object
    swiglu: object
    down_proj: object


class BlockCheckpoint(NamedTuple):
    """What gradient checkpointing keeps of a block instead of its activations (recomputed in backward)."""

    x: object  # (B, T, C) the block's input
    dropout_rng: object  # a copy of the dropout generator as the block found it (same masks again), or None


class ChunkedHeadLoss(NamedTuple):
    """The head and the loss taken a chunk of rows at a time: only the input's gradient is kept."""

    dx: object  # (B, T, C) d(loss)/d(final norm's output) for dloss = 1; the (B, T, V) logits never exist


class LlamaCache(NamedTuple):
    ops: LayerOps  # the layer functions that made this cache
    token_embedding: object
    rope: tuple  # the (cos, sin) tables, to recompute checkpointed blocks
    blocks: list  # one LlamaBlockCache (or BlockCheckpoint) per layer
    norm: object
    head: object  # the head's cache, or ChunkedHeadLoss
    loss: object  # CrossEntropyCache, ChunkedHeadLoss, or None when no targets were given


class Llama(LanguageModel):
    """A Llama-family model: its config, its flat parameter dict, and which parameters are frozen.

    Two switches trade compute for activation memory in training (both off by default):
    ``gradient_checkpointing`` keeps only each block's input and recomputes the block's activations
    in the backward (one more forward of every block); ``loss_chunk_rows = n`` takes the output head
    and the cross-entropy n rows at a time, so the (B, T, V) logits never exist whole (with a
    frozen head; the gradient with respect to the head's input is made in the forward, chunk by
    chunk, while each chunk's probabilities exist).
    """

    embedding_name = EMBED
    context_in_weights = False  # RoPE computes its angles: the same weights serve any block_size
    gradient_checkpointing = False
    loss_chunk_rows: int | None = None

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return llama_parameter_shapes(self.config)

    def _norm_forward(self, name: str, x):
        return self.ops.rmsnorm_forward(x, self.params[f"{name}.weight"], self.config.rms_eps)

    def _norm_backward(self, name: str, dout, cache, grads: dict):
        dx, dw = self.ops.rmsnorm_backward(dout, cache)
        if self.is_trainable(f"{name}.weight"):
            grads[f"{name}.weight"] = dw
        return dx

    def _block_forward(self, i: int, x, rope, rng, kv_cache=None):
        """One block.   x: (B, T, C) -> (B, T, C); rope: the (cos, sin) tables of these positions."""
        ops, config, p = self.ops, self.config, f"model.layers.{i}"
        H, H_kv = config.n_head, config.n_kv_head
        cos, sin = rope
        h, input_norm = self._norm_forward(f"{p}.input_layernorm", x)
        q, q_proj = self.linear_forward(f"{p}.self_attn.q_proj", h, rng)  # (B, T, H hs)
        k, k_proj = self.linear_forward(f"{p}.self_attn.k_proj", h, rng)  # (B, T, H_kv hs)
        v, v_proj = self.linear_forward(f"{p}.self_attn.v_proj", h, rng)  # (B, T, H_kv hs)
        q, rope_q = ops.rope_forward(to_heads(q, H), cos, sin, config.rope_pairing)  # (B, H, T, hs)
        k, rope_k = ops.rope_forward(to_heads(k, H_kv), cos, sin, config.rope_pairing)  # (B, H_kv, T, hs)
        v = to_heads(v, H_kv)  # (B, H_kv, T, hs)
        if kv_cache is None:
            y, attn = ops.gqa_attention_forward(q, k, v)  # (B, H, T, hs)
        else:  # generation: the new positions attend over the cached ones too
            keys, values = kv_cache.keys[i], kv_cache.values[i]
            y, attn = ops.cached_gqa_attention_forward(q, k, v, keys, values, kv_cache.length), None
        a, o_proj = self.linear_forward(f"{p}.self_attn.o_proj", merge_heads(y), rng)  # (B, T, C)
        x = ops.residual_add(x, a)  # residual: x + a
        h, post_norm = self._norm_forward(f"{p}.post_attention_layernorm", x)
        g, gate_proj = self.linear_forward(f"{p}.mlp.gate_proj", h, rng)  # (B, T, F)
        u, up_proj = self.linear_forward(f"{p}.mlp.up_proj", h, rng)  # (B, T, F)
        m, swiglu = ops.swiglu_forward(g, u)  # silu(g) * u
        d, down_proj = self.linear_forward(f"{p}.mlp.down_proj", m, rng)  # (B, T, C)
        x = ops.residual_add(x, d)  # residual: x + d
        cache = LlamaBlockCache(
            input_norm=input_norm, q_proj=q_proj, k_proj=k_proj, v_proj=v_proj, rope_q=rope_q, rope_k=rope_k,
            attn=attn, o_proj=o_proj, post_norm=post_norm, gate_proj=gate_proj, up_proj=up_proj, swiglu=swiglu,
            down_proj=down_proj,
        )  # fmt: skip
        return x, cache

    def _block_backward(self, i: int, dx, cache: LlamaBlockCache, grads: dict):
        ops, p, H = self.ops, f"model.layers.{i}", self.config.n_head
        # x_out = x_mid + down_proj(m): the residual hands dx unchanged to x_mid and to the MLP.
        dm = self.linear_backward(f"{p}.mlp.down_proj", dx, cache.down_proj, grads)
        dg, du = ops.swiglu_backward(dm, cache.swiglu)
        del dm  # a spent (B, T, F) gradient is let go at once, as autograd does: less memory at the peak
        dh = self.linear_backward(f"{p}.mlp.gate_proj", dg, cache.gate_proj, grads)
        del dg
        dh = dh + self.linear_backward(f"{p}.mlp.up_proj", du, cache.up_proj, grads)  # h feeds both: sum
        del du
        dx = dx + self._norm_backward(f"{p}.post_attention_layernorm", dh, cache.post_norm, grads)
        # x_mid = x + o_proj(merge_heads(y)): the same split for the attention branch.
        dy = to_heads(
            self.linear_backward(f"{p}.self_attn.o_proj", dx, cache.o_proj, grads), H
        )  # (B, H, T, hs)
        dq, dk, dv = ops.gqa_attention_backward(dy, cache.attn)
        dq = merge_heads(ops.rope_backward(dq, cache.rope_q))  # (B, T, H hs): undo the rotation, join heads
        dk = merge_heads(ops.rope_backward(dk, cache.rope_k))  # (B, T, H_kv hs)
        dh = self.linear_backward(f"{p}.self_attn.q_proj", dq, cache.q_proj, grads)
        dh = dh + self.linear_backward(f"{p}.self_attn.k_proj", dk, cache.k_proj, grads)  # h feeds three
        dh = dh + self.linear_backward(f"{p}.self_attn.v_proj", merge_heads(dv), cache.v_proj, grads)
        return dx + self._norm_backward(f"{p}.input_layernorm", dh, cache.input_norm, grads)

    def _head_weight(self):
        """The output head's (C, V) weight: the embedding transposed when tied."""
        return self.params[EMBED].T if self.config.tie_embeddings else self.params[f"{HEAD}.weight"]

    def forward(self, idx, targets=None, dropout_rng=None, kv_cache=None):
        """Logits for every position, and the mean cross-entropy if targets are given.

        idx, targets: (B, T) token ids; dropout_rng serves LoRA's dropout (the model has none);
        kv_cache (generate.KVCache): idx holds only the positions after the kv_cache.length cached ones.
        Returns (logits (B, T, V), loss or None, cache for ``backward``; None with kv_cache).
        """
        ops, config = self.ops, self.config
        idx = self.check_token_ids(idx, "idx")
        B, T = idx.shape
        start = self.first_position(T, kv_cache)
        embed = self.params[EMBED]
        if isinstance(embed, QuantizedWeight):  # a quantized table: its rows dequantized, frozen, in the
            dtype = self.params[f"{NORM}.weight"].dtype  # dtype the model computes in (its norms')
            x, token_embedding = quantized_embedding_forward(idx, embed, dtype), None  # (B, T, C)
        else:
            x, token_embedding = ops.embedding_forward(idx, embed)  # (B, T, C)
        rope = rope_tables(T, config.head_size, start, config.rope_theta, x.dtype, self.xp)  # (T, hs/2) each
        checkpointing = self.gradient_checkpointing and targets is not None and kv_cache is None
        blocks = []
        for i in range(config.n_layer):
            if checkpointing:  # keep the input; the block's caches are let go as soon as it returns
                blocks.append(BlockCheckpoint(x, copy.deepcopy(dropout_rng)))
                x = self._block_forward(i, x, rope, dropout_rng)[0]
            else:
                x, block = self._block_forward(i, x, rope, dropout_rng, kv_cache)
                blocks.append(block)
        x, norm = self._norm_forward(NORM, x)
        if self.loss_chunk_rows is not None and targets is not None and kv_cache is None:
            loss, head_loss = self._chunked_head_loss(x, self.check_targets(targets, idx))
            cache = LlamaCache(ops=ops, token_embedding=token_embedding, rope=rope, blocks=blocks, norm=norm,
                               head=head_loss, loss=head_loss)  # fmt: skip
            return None, loss, cache
        logits, head = self._head_forward(x)  # (B, T, V)
        if kv_cache is not None:
            kv_cache.length = start + T
            return logits, None, None
        loss, loss_cache = self.loss_forward(logits, targets, idx)
        cache = LlamaCache(ops=ops, token_embedding=token_embedding, rope=rope, blocks=blocks, norm=norm,
                           head=head, loss=loss_cache)  # fmt: skip
        return logits, loss, cache

    def _head_forward(self, x):
        """logits = x W_head.   x: (..., C) -> (..., V); a quantized tied table is read slab by slab."""
        embed = self.params[EMBED]
        if self.config.tie_embeddings and isinstance(embed, QuantizedWeight):
            return quantized_linear_forward(x, embed)  # x deq(table)^T
        return self.ops.linear_forward(x, self._head_weight())

    def _head_input_gradient(self, dlogits, head):
        """dx = dlogits W_head^T for a frozen head.   dlogits: (..., V) -> (..., C)."""
        if isinstance(head, QuantizedLinearCache):
            return quantized_linear_backward(dlogits, head)
        return self.ops.linear_backward(dlogits, head, compute_dW=False, compute_db=False)[0]

    def _chunked_head_loss(self, x, targets):
        """Mean cross-entropy of the head's logits, loss_chunk_rows rows at a time, and its dx.

        The loss is the model's last function and its gradient needs nothing after it, so each
        chunk's dlogits = (p - onehot) / N is formed while the chunk's probabilities exist, and sent
        through the frozen head at once. x: (B, T, C), targets: (B, T) -> (loss, ChunkedHeadLoss).
        """
        head_weight = HEAD + ".weight" if not self.config.tie_embeddings else EMBED
        if self.is_trainable(head_weight):
            raise ValueError(
                f"loss_chunk_rows needs a frozen output head, but {head_weight!r} is trainable: "
                "set loss_chunk_rows = None"
            )
        B, T, C = x.shape
        N, chunk = B * T, self.loss_chunk_rows
        rows, flat_targets = x.reshape(N, C), targets.reshape(N)
        dx = self.xp.empty_like(rows)  # (N, C)
        loss = 0.0
        for r0 in range(0, N, chunk):
            r1 = min(r0 + chunk, N)
            weight = (r1 - r0) / N  # this chunk's share of the mean
            logits, head = self._head_forward(rows[r0:r1])  # (n, V)
            part, ce = self.ops.cross_entropy_forward(logits, flat_targets[r0:r1])
            del logits  # the probabilities in ce are all the chunk keeps
            loss = loss + weight * part
            dx[r0:r1] = self._head_input_gradient(self.ops.cross_entropy_backward(weight, ce), head)
        return loss, ChunkedHeadLoss(dx=dx.reshape(B, T, C))

    def backward(self, cache: LlamaCache, dloss: float = 1.0) -> dict:
        """Gradients of the loss for every trainable parameter, keyed like ``params``."""
        self.check_cache(cache)
        ops, grads = self.ops, {}
        train_embed = self.is_trainable(EMBED)
        if isinstance(cache.head, ChunkedHeadLoss):  # head and loss done in the forward, chunk by chunk
            dx = cache.head.dx * dloss
        elif isinstance(cache.head, QuantizedLinearCache):  # the tied head of a quantized table
            dx = quantized_linear_backward(ops.cross_entropy_backward(dloss, cache.loss), cache.head)
        elif self.config.tie_embeddings:
            dlogits = ops.cross_entropy_backward(dloss, cache.loss)  # (B, T, V)
            dx, dW_head, _ = ops.linear_backward(
                dlogits, cache.head, compute_dW=train_embed, compute_db=False
            )
        else:
            dx = self.linear_backward(HEAD, ops.cross_entropy_backward(dloss, cache.loss), cache.head, grads)
        dx = self._norm_backward(NORM, dx, cache.norm, grads)
        for i in reversed(range(self.config.n_layer)):
            block = cache.blocks[i]
            if isinstance(block, BlockCheckpoint):  # run the block again from its input, same masks
                block = self._block_forward(i, block.x, cache.rope, copy.deepcopy(block.dropout_rng))[1]
            dx = self._block_backward(i, dx, block, grads)
        if train_embed:
            dembed = ops.embedding_backward(dx, cache.token_embedding)  # (V, C)
            # tied: the embedding is used twice, by the lookup and by the head, so its gradient is the sum
            grads[EMBED] = dembed + dW_head.T if self.config.tie_embeddings else dembed
        return {name: grads[name] for name in self.params if name in grads}  # in parameter order


def set_activation_memory(model, gradient_checkpointing: bool = False, loss_chunk_rows: int | None = None):
    """Turn the Llama model's two memory switches (see ``Llama``); a model of another kind is refused."""
    if not gradient_checkpointing and loss_chunk_rows is None:
        return
    if not isinstance(model, Llama):
        raise ValueError(
            f"gradient checkpointing and loss chunks are switches of the Llama model (--base smollm2), "
            f"not of {type(model).__name__}"
        )
    if loss_chunk_rows is not None and (not isinstance(loss_chunk_rows, int) or loss_chunk_rows <= 0):
        raise ValueError(f"loss_chunk_rows must be a positive number of positions, got {loss_chunk_rows!r}")
    model.gradient_checkpointing, model.loss_chunk_rows = gradient_checkpointing, loss_chunk_rows
