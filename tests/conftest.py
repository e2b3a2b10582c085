"""Shared test settings."""

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_intra_op_thread():
    """One intra-op thread for the whole session: on a shared 2-core machine two OpenMP threads per process
    spin against each other (a step gets many times slower), and one thread makes runs comparable bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
