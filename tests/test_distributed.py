"""codeq.distributed without a process group: the rendezvous read from torchrun's or SLURM's variables, and the
single-process Distributed whose collectives return their input."""

import pytest
import torch

from codeq.distributed import Distributed, Rendezvous, first_host, rendezvous_from


@pytest.mark.parametrize(
    "nodelist, host",
    [("node7", "node7"), ("gpu[07-09,12]", "gpu07"), ("gpu[3,5],cpu1", "gpu3"), ("a[1-2]-b[08-09],c", "a1-b08")],
)
def test_first_host_of_a_slurm_node_list(nodelist, host):
    assert first_host(nodelist) == host


def test_torchrun_variables_make_a_rendezvous_and_one_process_none():
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "29500"}
    assert rendezvous_from(torchrun) == Rendezvous(3, 4, 1, "torchrun")
    assert rendezvous_from({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}) is None
    assert rendezvous_from({}) is None


def test_an_srun_step_of_several_tasks_makes_a_rendezvous_on_its_first_node():
    step = {
        "SLURM_PROCID": "5",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_ID": "123456",
        "SLURM_STEP_NODELIST": "gpu[11-14]",
        "SLURM_JOB_NODELIST": "gpu[11-14]",
    }
    assert rendezvous_from(step) == Rendezvous(5, 8, 1, "slurm", "gpu11", 20000 + 123456 % 20000)
    # the batch script itself (no srun step) and one-task jobs (slurm_1gpu) train alone
    assert rendezvous_from({**step, "SLURM_STEP_NUM_TASKS": "1"}) is None
    del step["SLURM_STEP_NUM_TASKS"]
    assert rendezvous_from({**step, "SLURM_NTASKS": "8"}) is None


def test_one_process_collectives_return_their_input():
    single = Distributed()
    assert (single.rank, single.world_size, single.is_main, single.active) == (0, 1, True, False)
    model = torch.nn.Linear(2, 2)
    assert single.wrap(model) is model and single.broadcast_object("dir") == "dir"
    assert torch.equal(single.all_reduce(torch.ones(2)), torch.ones(2))
    single.check_replicas_agree(model)
    assert single.peer_failure() is None and single.device(torch.device("cuda")) == torch.device("cuda")
