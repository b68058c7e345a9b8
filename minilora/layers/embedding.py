"""Token and position embeddings: a table lookup, and its backward.

The forward picks rows of a (V, C) table by integer id.

Derivation (a2):
    The backward sends each row of the upstream gradient back to the table row it came from. A token
    that occurs several times in the batch receives the sum of all its gradients, which is why the
    backward needs ``scatter_add`` (a plain indexed ``+=`` would keep only one of the repeated updates).

Token ids are not range-checked here: validate them on the host before they reach the device, where
CuPy silently wraps out-of-range indices instead of raising.
"""

from __future__ import annotations

from typing import NamedTuple

from ..backend import get_xp, scatter_add


class EmbeddingCache(NamedTuple):
    ids: object  # (...) integer ids that were looked up
    table_shape: tuple  # (V, C)


def embedding_forward(ids, table):
    """out[..., :] = table[ids[...], :].   ids: (...) int, table: (V, C) -> out: (..., C)."""
    # BEGIN SOLUTION a2: pick the rows of table named by ids
    return table[ids], EmbeddingCache(ids=ids, table_shape=table.shape)
    # END SOLUTION


def embedding_backward(dout, cache: EmbeddingCache):
    """Gradient of the lookup for the table.   dout: (..., C) -> dtable: (V, C).

    Derivation (a2):
        dtable[v] = sum of dout over every position whose id is v.
    """
    xp = get_xp(dout)
    V, C = cache.table_shape
    # BEGIN SOLUTION a2: send each row of dout back to the table row it was read from (ids repeat!)
    dtable = xp.zeros((V, C), dtype=dout.dtype)
    scatter_add(dtable, cache.ids.reshape(-1), dout.reshape(-1, C))
    # END SOLUTION
    return dtable
