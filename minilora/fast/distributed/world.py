"""Which rank this process is, out of how many: read from the MPI launcher, without importing MPI.

``mpirun -n N minilora pretrain ...`` starts N copies of the same command. Each copy learns its
place from the variables the launcher sets (Open MPI's ``OMPI_COMM_WORLD_SIZE``, MPICH's and
Slurm's ``PMI_SIZE``); a plain ``minilora pretrain`` sees none and is rank 0 of 1. Only when there
are several ranks is ``mpi4py`` imported (the ``minilora[mpi]`` extra), so a one-process run needs
no MPI at all.

Rank 0 is the writer: it alone claims the run folder, writes checkpoints and results, and shows the
progress bar. Every rank computes the same parameters, so any rank's copy would do; one writer keeps
two processes from replacing the same file.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache

SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")  # set by mpirun / mpiexec for each rank


@dataclass(frozen=True)
class World:
    rank: int  # this process, 0 .. size - 1
    size: int  # processes in the job
    comm: object = None  # mpi4py's COMM_WORLD when size > 1, else None

    @property
    def is_writer(self) -> bool:
        """Whether this rank writes files and prints progress (rank 0)."""
        return self.rank == 0


def launched_size() -> int:
    """Processes the MPI launcher started, from its environment (1 when not under a launcher)."""
    for name in SIZE_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


@cache
def current_world() -> World:
    """This process's World: rank 0 of 1 without a launcher, else MPI's COMM_WORLD (imports mpi4py)."""
    if launched_size() == 1:
        return World(0, 1)
    try:
        from mpi4py import MPI
    except ImportError as err:
        raise RuntimeError(
            f"started by an MPI launcher with {launched_size()} ranks, but mpi4py is missing: "
            "pip install 'minilora[mpi]'"
        ) from err
    comm = MPI.COMM_WORLD
    return World(comm.Get_rank(), comm.Get_size(), comm if comm.Get_size() > 1 else None)


def from_writer(world: World, compute):
    """``compute()`` on rank 0, its value sent to every rank (e.g. the size of a file rank 0 wrote)."""
    value = compute() if world.is_writer else None
    return value if world.comm is None else world.comm.bcast(value, root=0)


@contextmanager
def abort_on_error(world: World, what: str):
    """Turn an exception on any rank of a multi-rank job into one line and MPI_Abort of the whole job.

    Without it, a rank that fails while the others wait in a collective would leave them waiting,
    and its own exit would wait in MPI_Finalize for them: the job would hang. With one rank the
    exception passes through unchanged, to the command line's usual error path.
    """
    if world.comm is None:
        yield
        return
    try:
        yield
    except BaseException as err:  # noqa: B036 - KeyboardInterrupt too: every rank must stop
        message = str(err) or type(err).__name__
        print(f"minilora {what}: error on rank {world.rank} of {world.size}: {message}", file=sys.stderr)
        sys.stderr.flush()
        world.comm.Abort(130 if isinstance(err, KeyboardInterrupt) else 1)
