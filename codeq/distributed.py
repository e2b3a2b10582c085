"""Data-parallel training on torch.distributed: one process per device, started by torchrun or by SLURM.

``setup()`` reads the rendezvous from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)
or, inside an ``srun`` step of several tasks, from SLURM's (SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID,
the step's first node, a port derived from the job id), and joins the process group: gloo for CPU tensors,
NCCL for CUDA ones. Without either it returns the single-process ``Distributed``, whose collectives are
no-ops, so the trainer has one code path. Rank 0 alone writes files; every rank uses rank 0's run dir.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from codeq.errors import ConfigError

log = logging.getLogger(__name__)

FAILURE_KEY = "codeq/failure"
# How long a rank that lost its peers waits for the failed rank's own account of why (it is written first).
FAILURE_WAIT = datetime.timedelta(seconds=5)
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 20000


@dataclass(frozen=True)
class Rendezvous:
    """Where this process sits in the job, and where rank 0 listens (None: torchrun's env:// variables)."""

    rank: int
    world_size: int
    local_rank: int
    source: str
    master_addr: str | None = None
    master_port: int | None = None


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[07-09,12],cpu3`` -> ``gpu07``."""
    first = re.match(r"[^,\[]*(\[[^\]]*\][^,\[]*)*", nodelist).group(0)
    return re.sub(r"\[([^\],-]+)[^\]]*\]", r"\1", first)


def rendezvous_from(environ: Mapping[str, str]) -> Rendezvous | None:
    """torchrun's variables, else those of an ``srun`` step of several tasks, else None (one process)."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        if int(environ["WORLD_SIZE"]) < 2:
            return None
        return Rendezvous(
            int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", 0)), "torchrun"
        )
    tasks = int(environ.get("SLURM_STEP_NUM_TASKS", environ.get("SLURM_NTASKS", "1")))
    if "SLURM_STEP_NUM_TASKS" not in environ or tasks < 2:
        return None
    nodelist = environ.get("SLURM_STEP_NODELIST", environ.get("SLURM_JOB_NODELIST", ""))
    port = SLURM_PORT_BASE + int(environ.get("SLURM_JOB_ID", "0")) % SLURM_PORT_SPAN
    return Rendezvous(
        int(environ["SLURM_PROCID"]), tasks, int(environ.get("SLURM_LOCALID", 0)), "slurm", first_host(nodelist), port
    )


class Distributed:
    """This process's rank among ``world_size`` data-parallel replicas, and the collectives the trainer uses.

    With ``world_size == 1`` every collective returns its input: the single-process run is the same code.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0):
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files, logs to W&B and prints progress."""
        return self.rank == 0

    def device(self, requested: torch.device) -> torch.device:
        """The device this rank trains on: ``cuda`` becomes ``cuda:LOCAL_RANK`` (one GPU per process)."""
        if self.active and requested.type == "cuda":
            if requested.index is not None:
                raise ConfigError(
                    f"trainer.device={requested} under data-parallel training: each rank takes cuda:LOCAL_RANK; "
                    "use trainer.device=cuda or auto"
                )
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
            return device
        return requested

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (a picklable object, e.g. the run dir)."""
        if not self.active:
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``tensor`` over ranks, in place."""
        if self.active:
            dist.all_reduce(tensor)
        return tensor

    def barrier(self) -> None:
        """Wait until every rank gets here (e.g. rank 0's checkpoint is written before any rank exits)."""
        self.all_reduce(torch.zeros(1))

    def agreed_signal(self, signum: int | None) -> int | None:
        """The stop signal any rank received (the largest number if several), None if none did; the same answer
        on every rank, so that all stop at the same step. One all-reduce."""
        if not self.active:
            return signum
        value = torch.tensor([signum or 0])
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return int(value) or None

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` under DistributedDataParallel: the replicas start from rank 0's parameters and buffers and
        their gradients are averaged over ranks in ``backward``. Single process: ``model`` itself."""
        if not self.active:
            return model
        device = next(model.parameters()).device
        return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    def check_replicas_agree(self, model: nn.Module) -> None:
        """Raise ReplicaMismatch unless every parameter and buffer matches rank 0's (a float64 sum per tensor,
        compared exactly): the quantizers' weights, dead-zone and bit logits among them, so that every rank
        quantizes alike. One broadcast and one all-reduce of a number per tensor."""
        if not self.active:
            return
        names, tensors = zip(*[*model.named_parameters(), *model.named_buffers()])
        local = torch.stack([t.detach().double().sum() for t in tensors]).cpu()
        reference = local.clone()
        dist.broadcast(reference, src=0)
        differs = (local != reference) & ~(local.isnan() & reference.isnan())
        mismatched = differs.float()
        dist.all_reduce(mismatched)
        if mismatched.any():
            first = names[int(mismatched.nonzero()[0, 0])]
            raise ReplicaMismatch(
                f"the replicas diverged: {first} differs from rank 0's on {int(mismatched.max())} rank(s)"
            )

    def failure(self, exc: BaseException, message: str) -> tuple[str, str, bool]:
        """(the job's one-line reason for failing, the error's type, whether this rank says it) after ``exc``
        (described by ``message``) ended this rank.

        The first rank to fail leaves ``rank R failed: <type>: <message>`` in the rendezvous store and says
        it; the others, whose collectives broke when it left, read it there. A rank lost without a word
        (killed outright) is reported by rank 0 from its own error.
        """
        lost_peer = isinstance(exc, dist.DistError) or _is_collective_error(exc)
        record = self.peer_failure(wait=lost_peer)
        if record is not None:
            return record["message"], record["type"], False
        error_type = type(exc).__name__
        if lost_peer:
            return f"rank {self.rank} lost another rank: {error_type}: {message}", error_type, self.is_main
        record = {"message": f"rank {self.rank} failed: {error_type}: {message}", "type": error_type}
        try:
            dist.distributed_c10d._get_default_store().set(FAILURE_KEY, json.dumps(record))
        except Exception:  # noqa: BLE001 - the store may be gone with rank 0; the line on stderr remains
            log.debug("could not record the failure in the rendezvous store", exc_info=True)
        return record["message"], error_type, True

    def peer_failure(self, wait: bool = False) -> dict[str, str] | None:
        """{message, type} another rank recorded for leaving, waiting up to FAILURE_WAIT if ``wait``; or None."""
        if not self.active:
            return None
        try:
            store = dist.distributed_c10d._get_default_store()
            if wait:
                store.wait([FAILURE_KEY], FAILURE_WAIT)
            elif not store.check([FAILURE_KEY]):
                return None
            return json.loads(store.get(FAILURE_KEY))
        except Exception:  # noqa: BLE001 - no record (a rank killed outright) or rank 0's store gone
            return None

    def teardown(self) -> None:
        """Leave the process group (after the last collective)."""
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


def _is_collective_error(exc: BaseException) -> bool:
    """An error raised by a collective because a peer went away (gloo and NCCL raise RuntimeErrors)."""
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        word in text for word in ("Connection closed by peer", "Connection reset by peer", "gloo", "NCCL")
    )


class ReplicaMismatch(RuntimeError):
    """A parameter or buffer differs between ranks: training would no longer be one model."""


_current: Distributed | None = None


def setup(environ: Mapping[str, str] | None = None) -> Distributed:
    """Join the job's process group once (later calls return the same object); one process: world size 1.

    The group serves CPU tensors with gloo and, where CUDA exists, CUDA tensors with NCCL.
    """
    global _current
    if _current is not None:
        return _current
    rendezvous = rendezvous_from(os.environ if environ is None else environ)
    if rendezvous is None:
        _current = Distributed()
        return _current
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    init_method = f"tcp://{rendezvous.master_addr}:{rendezvous.master_port}" if rendezvous.master_addr else "env://"
    dist.init_process_group(backend, init_method=init_method, rank=rendezvous.rank, world_size=rendezvous.world_size)
    if torch.cuda.is_available() and rendezvous.local_rank < torch.cuda.device_count():
        torch.cuda.set_device(rendezvous.local_rank)  # NCCL collectives (and object broadcasts) use this GPU
    _current = Distributed(rendezvous.rank, rendezvous.world_size, rendezvous.local_rank)
    log.debug(
        "rank %d of %d (%s rendezvous, backend %s)", rendezvous.rank, rendezvous.world_size, rendezvous.source, backend
    )
    return _current


def teardown() -> None:
    """Leave the process group set up by ``setup``."""
    global _current
    if _current is not None:
        _current.teardown()
        _current = None


class _SumOverRanks(torch.autograd.Function):
    """``Σ_ranks x`` with its gradient: every rank's sum feeds every rank's loss, so the gradient of ``x`` is the
    sum over ranks of the incoming gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        summed = x.clone()
        dist.all_reduce(summed)
        return summed

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        summed = grad.clone()
        dist.all_reduce(summed)
        return summed


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch for CPU tensors (gloo), where ``nn.SyncBatchNorm`` refuses to run.

    Training: per-channel sums are all-reduced over ranks (differentiably, so gradients flow to every
    rank's inputs): ``mean = Σx / n``, ``var = Σ(x - mean)² / n`` over all ranks' ``n`` values;
    ``running_var`` takes the unbiased ``var · n / (n - 1)``, as BatchNorm does. Eval: running statistics.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1, *[1] * (x.dim() - 2)]
        count = x.new_full((1,), x.numel() // max(x.shape[1], 1))
        sums = _SumOverRanks.apply(torch.cat((x.sum(dims), count)))
        n = sums[-1]
        mean = sums[:-1] / n
        centered = x - mean.view(shape)
        var = _SumOverRanks.apply(centered.square().sum(dims)) / n
        y = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * n / (n - 1).clamp_min(1), momentum)
        return y


def synchronize_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of ``model`` computes its training statistics over the global batch: torch's
    SyncBatchNorm on accelerators, GlobalBatchNorm on the CPU. Parameters and buffers are kept (same
    state_dict keys), so build the optimizer afterwards."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _replace_batchnorm(model)


def _replace_batchnorm(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        replaced = GlobalBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        if module.affine:
            replaced.weight, replaced.bias = module.weight, module.bias
        if module.track_running_stats:
            replaced.running_mean, replaced.running_var = module.running_mean, module.running_var
            replaced.num_batches_tracked = module.num_batches_tracked
        replaced.training = module.training
        return replaced
    for name, child in module.named_children():
        module.add_module(name, _replace_batchnorm(child))
    return module
