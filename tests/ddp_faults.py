"""Synthetic data whose training batches misbehave on one rank, for the data-parallel tests (``dataset._target_``).

``fault``: "sigterm" makes rank ``fault_rank`` send itself SIGTERM while it draws batch ``fault_step`` of epoch
``fault_epoch`` (a pre-emption reaching one rank); "crash" makes it raise there (a bug or a lost disk on one rank).
"""

import os
import signal

from codeq.data import synthetic


class InjectedFault(RuntimeError):
    """The crash the tests ask for."""


def synthetic_with_fault(fault: str, fault_rank: int, fault_epoch: int, fault_step: int, **kwargs):
    data = synthetic(**kwargs)
    clean = data.train_batches

    def train_batches(epoch, rank=0, world_size=1):
        for step, batch in enumerate(clean(epoch, rank, world_size)):
            if (rank, epoch, step) == (fault_rank, fault_epoch, fault_step):
                if fault == "sigterm":
                    os.kill(os.getpid(), signal.SIGTERM)
                else:
                    raise InjectedFault(f"injected fault at epoch {epoch}, step {step}")
            yield batch

    data.train_batches = train_batches
    return data
