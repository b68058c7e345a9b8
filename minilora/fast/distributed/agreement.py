"""Ranks agree or stop: every rank's run compared with one collective before the first step.

``mpirun -n N minilora ...`` starts N copies of a command, and nothing makes the copies the same. A
rank given another ``--seed``, ``--batch-size`` or ``--lr`` draws other batches or takes other steps,
and the summed gradients train a mixture that no one asked for; a rank given fewer ``--steps``
leaves the gradient exchange early and the others wait in it forever. So before the first step each
rank describes its run as one flat dict (``run_identity``), the dicts are gathered to every rank
(``comm.allgather``: one collective, on the MPI and NCCL paths alike, since the NCCL step sets
itself up over the same MPI communicator), and each rank compares them with the pure
``disagreement_line``. Every rank compares the same gathered list, so every rank reaches the same
verdict: all of them train, or all of them raise the same one line ("ranks disagree on batch_size:
rank 0 has 8, rank 1 has 4"), which ``world.abort_on_error`` turns into the end of the job.

What is compared: the training settings under their own names (the seed policy is one number:
every per-rank stream, such as the dropout masks of (seed, stream, step, rank), derives from the
base seed and the rank, so the base seed is what must agree), everything else the job records
about its run (the model config, the adapter config, the mode, the dtype, the frozen base's
fingerprint ...), the device, the step the run starts at, fingerprints of the trainable weights and
of the optimiser's state as training starts, and one of the corpus's tokens. Not compared: what may
differ between machines in a run that is the same (``NOT_COMPARED``).
"""

from __future__ import annotations

import hashlib

from ...backend import device_of, weights_fingerprint
from .world import World

NOT_COMPARED = {
    "provenance": "the command line and the machine (the device is compared, from the weights)",
    "corpus": "a name or a path, which may differ between machines: the corpus's tokens are compared",
    "base": "a path for a checkpoint: the base's fingerprint is compared",
    "base_spec": "a path too",
    "val_bits_per_byte_before": "computed in floats, which may round differently on two machines",
}
MAX_FIELDS_SHOWN = 3  # a line stays readable when, say, the whole adapter config differs
MAX_VALUE_CHARS = 30  # a fingerprint is shown by its first characters


class RanksDisagree(ValueError):
    """The ranks of one job were started with different runs; every rank raises it at once."""


def agree_across_ranks(world: World, metadata: dict, optimizer, corpus, start_step: int) -> None:
    """Under several ranks: gather every rank's ``run_identity`` and raise ``RanksDisagree`` unless all are equal.

    ``metadata``: what the job records about its run (``settings``: the TrainSettings as a dict, and
    whatever else describes it: ``config``, ``lora_config``, ``base_fingerprint`` ...);
    ``optimizer``: the optimiser as training starts (its trainable weights and, when resumed, its
    state); ``corpus``: the Corpus trained on; ``start_step``: 0, or the step a resumed run continues
    from. Called on every rank before the step is built (the NCCL step's setup is a collective too).
    One rank: nothing to compare, nothing computed.
    """
    if world.comm is None:
        return
    identity = run_identity(metadata, optimizer, corpus, start_step)
    gathered = world.comm.allgather(identity)  # [rank 0's dict, rank 1's, ...] on every rank
    line = disagreement_line(gathered)
    if line is not None:
        raise RanksDisagree(line)


def run_identity(metadata: dict, optimizer, corpus, start_step: int) -> dict:
    """This rank's run as one flat dict: the settings by their own names first, then the rest, dotted."""
    identity = dict(metadata["settings"])  # steps, batch_size, lr, seed, ...
    for key, value in metadata.items():
        if key != "settings" and key not in NOT_COMPARED:
            identity.update(flattened(key, value))
    identity["device"] = device_of(optimizer.params[optimizer.names[0]])  # "cpu": the MPI step, "cuda": NCCL
    identity["start_step"] = start_step
    identity["trainable_weights"] = weights_fingerprint(
        {name: optimizer.params[name] for name in optimizer.names}
    )
    identity["optimizer_state"] = weights_fingerprint(optimizer.state_dict()["buffers"])  # {} for a new run
    identity["corpus_tokens"] = corpus_fingerprint(corpus)
    return identity


def flattened(key: str, value) -> dict:
    """{key: value}, or a nested dict's leaves under dotted keys ({"config.n_layer": 2, ...})."""
    if not isinstance(value, dict):
        return {key: value}
    leaves = {}
    for inner, inner_value in value.items():
        leaves.update(flattened(f"{key}.{inner}", inner_value))
    return leaves


def corpus_fingerprint(corpus) -> str:
    """SHA-256 over the corpus's training and validation tokens (their dtype and bytes)."""
    digest = hashlib.sha256()
    for tokens in (corpus.train, corpus.val):
        digest.update(f"{tokens.dtype}:{tokens.size}".encode())
        digest.update(tokens.tobytes())
    return "sha256:" + digest.hexdigest()


def disagreement_line(identities: list[dict]) -> str | None:
    """None if every rank's dict is the same, else one line naming each differing field and its ranks.

    ``identities[r]``: rank r's ``run_identity``. A field that a rank lacks shows as "unset".
    """
    fields = list(dict.fromkeys(key for identity in identities for key in identity))  # first-seen order
    differing = [key for key in fields if len({compared(identity, key) for identity in identities}) > 1]
    if not differing:
        return None
    parts = [f"{key}: {who_has_what(identities, key)}" for key in differing[:MAX_FIELDS_SHOWN]]
    more = len(differing) - MAX_FIELDS_SHOWN
    return "ranks disagree on " + "; ".join(parts) + (f"; and {more} more fields" if more > 0 else "")


def who_has_what(identities: list[dict], key: str) -> str:
    """The ranks grouped by their value of ``key``: "rank 0 has 8, ranks 1 and 2 have 4"."""
    ranks_by_value = {}
    for rank, identity in enumerate(identities):
        ranks_by_value.setdefault(compared(identity, key), []).append(rank)
    return ", ".join(f"{ranks_phrase(ranks)} {shortened(value)}" for value, ranks in ranks_by_value.items())


def ranks_phrase(ranks: list[int]) -> str:
    """The subject for ``ranks``: "rank 0 has", "ranks 1 and 2 have", "ranks 1, 2 and 3 have"."""
    if len(ranks) == 1:
        return f"rank {ranks[0]} has"
    listed = ", ".join(str(rank) for rank in ranks[:-1])
    return f"ranks {listed} and {ranks[-1]} have"


def compared(identity: dict, key: str) -> str:
    """The value of ``key`` as ranks compare it: its repr (lists and dicts compare too), or "unset"."""
    return repr(identity[key]) if key in identity else "unset"


def shortened(text: str) -> str:
    """``text`` as the line shows it: a long one (a fingerprint) by its first characters."""
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 3] + "..."
