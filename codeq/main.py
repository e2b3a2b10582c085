"""`python -m codeq.main [group=option ...] [key=value ...]`: the experiment CLI, the only Hydra-aware module.

It validates and seeds, instantiates every config group, builds the Evaluator on the dense model,
attaches the quantizers, builds the optimizer, and hands plain objects to codeq.trainer. Bad input
ends the job with one line naming the key (exit 2); a failed job leaves failed.json in its run dir.
Under torchrun (or an srun step of several tasks) each process is one data-parallel rank (codeq.distributed):
all run in rank 0's run dir, rank 0 alone writes there and reports how the job ended.
"""

from __future__ import annotations

import logging
import random
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from codeq import distributed, pareto
from codeq.checkpoint import CHECKPOINT_FILE, load_checkpoint
from codeq.cost import Evaluator
from codeq.device import resolve_device
from codeq.distributed import Distributed
from codeq.errors import ConfigError, JobFailed
from codeq.loggers import Logger
from codeq.models import first_and_last_layers
from codeq.plots import compression_figures
from codeq.quant import attach_weight_quantizers, quantized_layers
from codeq.resume import TrainingInterrupted
from codeq.rundir import RunFileError, RunFiles
from codeq.runlock import RunDirBusy, RunDirLock
from codeq.schema import allowed, check_config, check_values, schema_of
from codeq.trainer import Trainer, TrainerConfig, TrainingDiverged

log = logging.getLogger("codeq.main")

# An absolute path: Hydra resolves a relative one against the *module* codeq.main under `python -m`,
# where "../conf" would name a package that does not exist. conf/ lives beside the codeq package.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
# The one convention for keys of a group that are not arguments of its _target_: they are read here, by
# codeq.main, and dropped before instantiation. Each group YAML marks them with "# run key".
RUN_KEYS = {"quantizer": ("exclude_layers",), "sparsity": ("weight",)}
EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
# A data-parallel rank other than 0 started by `cli` gets rank 0's run dir before Hydra starts.
_rank0_run_dir: Path | None = None


@dataclass
class RunKeys:
    """The top-level keys of conf/config.yaml."""

    name: str = "codeq"
    seed: int = allowed(default=0, minimum=0)


def check_group(cfg: DictConfig, group: str) -> dict[str, Any]:
    """``cfg[group]`` resolved, its keys checked against its ``_target_``'s schema (when it has one)."""
    node = OmegaConf.to_container(cfg[group], resolve=True)
    schema = schema_of(node.get("_target_"))
    if schema is not None:
        check_values(schema, f"{group}.", node)
    return node


def instantiate_group(cfg: DictConfig, group: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(cfg[group])`` without the group's RUN_KEYS; bad values -> ConfigError."""
    node = check_group(cfg, group)
    for key in RUN_KEYS.get(group, ()):
        node.pop(key, None)
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        if isinstance(cause, (ValueError, TypeError)):
            raise bad_value(cfg, group, cause) from None
        if isinstance(cause, ImportError):
            raise ConfigError(f"{group}._target_: cannot import {node.get('_target_')!r}") from None
        if cause is None:  # Hydra's own complaint about the node (a _target_ it cannot locate, a bad _partial_)
            raise ConfigError(f"{group}: {one_line(exc)}") from None
        raise
    except (TypeError, ValueError) as exc:  # Hydra's checks of the node itself (e.g. a non-bool _partial_)
        raise bad_value(cfg, group, exc) from None


def bad_value(cfg: DictConfig, group: str, exc: Exception) -> ConfigError:
    """A ConfigError for a ValueError/TypeError raised while building ``group``.

    When the message starts with one of the group's keys it becomes ``group.key …``, else ``group: …``.
    """
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    first_word = message.split(" ", 1)[0].strip("'\":,")
    if isinstance(cfg.get(group), DictConfig) and first_word in cfg[group]:
        return ConfigError(f"{group}.{message}")
    return ConfigError(f"{group}: {message}")


def seed_everything(seed: Any) -> None:
    """Seed python, numpy and torch (model init); the data order is seeded by the dataset itself."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def attach_quantizers(cfg: DictConfig, model: nn.Module) -> list[str]:
    """Attach the configured weight quantizer to every Conv/Linear not excluded; quantizer=none attaches nothing.

    ``exclude_layers: auto`` leaves the model's first and last Conv/Linear (stem and classifier) unquantized.
    """
    exclude = cfg.quantizer.get("exclude_layers")
    exclude = [] if exclude is None else first_and_last_layers(model) if exclude == "auto" else exclude
    if not isinstance(exclude, (list, ListConfig)) or not all(isinstance(name, str) for name in exclude):
        raise ConfigError(f"quantizer.exclude_layers must be auto or a list of module names or globs, got {exclude!r}")
    factory = instantiate_group(cfg, "quantizer")
    if factory is None:
        return []
    try:
        return attach_weight_quantizers(model, exclude_layers=list(exclude), quantizer=factory)
    except (ValueError, TypeError) as exc:
        raise bad_value(cfg, "quantizer", exc) from None


def sparsity_layer_of(model: nn.Module, requested: str | None) -> str:
    """trainer.sparsity_layer, checked; by default the first quantized conv (else the first conv)."""
    convs = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    quantized = [name for name, module, _ in quantized_layers(model) if isinstance(module, nn.Conv2d)]
    layer = requested if requested is not None else (quantized or convs or [None])[0]
    if layer not in convs:
        raise ConfigError(f"trainer.sparsity_layer={requested!r} is not a conv layer; allowed: {', '.join(convs)}")
    return layer


def sparsity_of(cfg: DictConfig) -> tuple[Any, float]:
    """(the sparsity option — a loss or a ``codeq.sparsity.Proximal`` step — or None, λ).

    λ = 0 means no sparsity term at all: nothing is computed for it.
    """
    weight = check_group(cfg, "sparsity").get("weight", 0.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < float("inf"):
        raise ConfigError(f"sparsity.weight must be a finite number >= 0, got {weight!r}")
    if weight == 0:
        return None, 0.0
    return instantiate_group(cfg, "sparsity"), float(weight)


def shape_from_data(cfg: DictConfig, data: Any) -> None:
    """dataset.num_classes / dataset.input_size left null are read from the data (the model interpolates them)."""
    if cfg.dataset.get("num_classes", 0) is None:
        cfg.dataset.num_classes = data.num_classes
    if cfg.dataset.get("input_size", 0) is None:
        cfg.dataset.input_size = list(data.input_size)


def wandb_naming(cfg: DictConfig, hydra_cfg: DictConfig) -> dict[str, str | None]:
    """W&B name from the job's overrides; group (the sweep dir) and job_type (cfg.name) for multirun jobs."""
    name = hydra_cfg.job.override_dirname or cfg.name
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return {"name": name, "group": Path(hydra_cfg.sweep.dir).as_posix(), "job_type": cfg.name}
    return {"name": name, "group": None, "job_type": None}


def build(cfg: DictConfig, run_dir: Path, ranks: Distributed) -> tuple[Trainer, dict[str, Any] | None]:
    """Every object of the run, in order; the trainer is restored from last.pt when resuming."""
    check_config(cfg, RunKeys)  # every key with a schema, before anything is built or read from disk
    trainer_cfg: TrainerConfig = instantiate_group(cfg, "trainer")
    device = ranks.device(resolve_device(trainer_cfg.device))
    checkpoint = None
    if trainer_cfg.resume:
        path = run_dir / CHECKPOINT_FILE
        if path.exists():
            checkpoint = load_checkpoint(path)
        else:  # in a sweep (resume=true so that a requeued job resumes) this is every job's first start
            level = logging.INFO if HydraConfig.get().mode == RunMode.MULTIRUN else logging.WARNING
            log.log(level, "trainer.resume=true but %s does not exist: starting from epoch 0", path)
    seed_everything(cfg.seed)
    sparsity_fn, sparsity_weight = sparsity_of(cfg)
    schedule = instantiate_group(cfg, "schedule")
    data = instantiate_group(cfg, "dataset", device=device)
    shape_from_data(cfg, data)

    model = instantiate_group(cfg, "model")
    evaluator = Evaluator(model, input_size=tuple(data.input_size))  # the dense 32-bit baseline
    attach_quantizers(cfg, model)
    sparsity_layer = sparsity_layer_of(model, trainer_cfg.sparsity_layer)
    model.to(device)
    if trainer_cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if ranks.active and trainer_cfg.sync_bn:
        model = distributed.synchronize_batchnorm(model, device)
    optimizer = instantiate_group(cfg, "optimizer")(model)
    lr_scheduler = instantiate_group(cfg, "lr_scheduler")(optimizer)

    trainer = Trainer(
        trainer_cfg,
        model=model,
        data=data,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        evaluator=evaluator,
        schedule=schedule,
        sparsity_fn=sparsity_fn,
        sparsity_weight=sparsity_weight,
        figure_fn=lambda m, result: compression_figures(m, result, sparsity_layer),
        files=RunFiles(run_dir, epochs=trainer_cfg.epochs),
        device=device,
        ranks=ranks,
    )
    if checkpoint is not None:
        trainer.load_state_dict(checkpoint)
    log.info(
        "Run dir %s | device %s%s | %s on %s (%d train / %d test images)",
        run_dir,
        device,
        f" | {ranks.world_size} ranks, global batch {data.batch_size}" if ranks.active else "",
        type(model).__name__,
        cfg.dataset.get("name", "?"),
        data.num_train,
        data.num_test,
    )
    return trainer, checkpoint


def build_logger(cfg: DictConfig, run_dir: Path, hydra_cfg: DictConfig, run_id: str | None) -> Logger:
    """The configured logger with the run's identity (resolved config, names, the W&B id to resume)."""
    factory = instantiate_group(cfg, "logger")
    config = OmegaConf.to_container(cfg, resolve=True)
    return factory(run_dir=run_dir, config=config, run_id=run_id, **wandb_naming(cfg, hydra_cfg))


def final_table(summary: dict[str, Any], run_dir: Path) -> str:
    """The end-of-run table: accuracy, sparsity, bits, structured/unstructured ratio and Rel. BOPs %, the dead
    channels of every layer, files."""
    final = summary["final"]
    figures = sorted(p.name for p in run_dir.glob("*.png"))
    lines = [
        f"Final after {summary['epochs_completed']} of {summary['epochs']} epochs "
        f"(best accuracy {summary['best_accuracy']:.4f}: epoch {summary['best_epoch']} in metrics.jsonl)",
        f"  accuracy               {final['eval/accuracy']:.4f}",
        f"  unstructured sparsity  {final['sparsity/unstructured']:.4f}",
        f"  mean bits              {final['bits/mean']:.2f}",
        "                         ratio     Rel. BOPs %",
    ]
    for kind in ("structured", "unstructured"):
        ratio = final[f"compression/{kind}_bops_ratio"]
        pct = final[f"compression/{kind}_rel_bops_pct"]
        lines.append(f"  {kind:<21}{ratio:>8.2f}x  {pct:>10.3f}")
    dead = {
        key.removeprefix("layers/").removesuffix("/dead_channels"): count
        for key, count in final.items()
        if key.startswith("layers/") and key.endswith("/dead_channels")
    }
    if dead:
        lines.append(
            f"  dead channels          {sum(dead.values()):.0f} (per layer: dead / channels, see channel_liveness.png)"
        )
        cells = [f"{name:<18}{count:>4.0f} /{final[f'layers/{name}/channels']:>4.0f}" for name, count in dead.items()]
        lines += ["    " + "    ".join(cells[i : i + 4]) for i in range(0, len(cells), 4)]
    lines.append(f"Files:   {run_dir}/ (metrics.jsonl, summary.json, last.pt, main.log)")
    lines.append(f"Figures: {', '.join(figures) if figures else 'none'}")
    return "\n".join(lines)


def one_line(exc: BaseException) -> str:
    """An exception's message on one line."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def stop(code: int, message: str, quiet: bool = False) -> NoReturn:
    """End the job with ``message``: one stderr line and ``code``; in a sweep, fail only this job.

    ``quiet``: a data-parallel rank whose ending another rank reports exits with ``code`` alone.
    """
    if not quiet:
        log.error(message)
    if code in (EXIT_BAD_INPUT, EXIT_FAILED) and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise JobFailed(f"error: {message}") from None
    if not quiet:
        sys.stdout.flush()
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()
    sys.exit(code)


def end(
    ranks: Distributed,
    files: RunFiles,
    status: str,
    code: int,
    message: str,
    error_type: str | None = None,
    quiet: bool | None = None,
) -> NoReturn:
    """Record how the job ended (rank 0: summary.json, and failed.json with ``error_type``), then ``stop``.
    By default rank 0 alone says it: every rank ends the same way."""
    if ranks.is_main:
        record_ending(files, status, message, error_type)
    stop(code, message, quiet=not ranks.is_main if quiet is None else quiet)


def shared_run_dir(ranks: Distributed, own: Path) -> Path:
    """Rank 0's run dir, on every rank (Hydra's ``${now:}`` differs between processes started apart)."""
    if ranks.is_main:
        ranks.broadcast_object(str(own))
        return own
    if _rank0_run_dir is not None:  # received by `cli` before Hydra started
        return _rank0_run_dir
    return Path(ranks.broadcast_object(None))


def log_as_replica(run_dir: Path) -> None:
    """A rank other than 0: no log file (rank 0 writes main.log), warnings and errors only on the console."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == run_dir.resolve():
            root.removeHandler(handler)
            handler.close()
    logging.getLogger("codeq").setLevel(logging.WARNING)


def two_objective_cost(cfg: DictConfig, hydra_cfg: DictConfig) -> str | None:
    """`pareto.cost` when the sweeper wants (accuracy, Rel. BOPs %) from each job (hydra/sweeper=pareto), else None."""
    cost = pareto.check_cost(OmegaConf.select(cfg, "pareto.cost", default=None))
    directions = OmegaConf.select(hydra_cfg, "sweeper.direction", default=None)
    if isinstance(directions, ListConfig):
        directions = OmegaConf.to_container(directions)
    return cost if pareto.is_two_objective(directions) else None


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | tuple[float, float] | None:
    """One job: lock the run dir (rank 0), build, train, print the final table; every ending leaves the dir
    consistent. Returns the best accuracy, or to a two-objective sweeper the final (accuracy, Rel. BOPs %).
    """
    hydra_cfg = HydraConfig.get()
    ranks = distributed.setup()
    run_dir = shared_run_dir(ranks, Path(hydra_cfg.runtime.output_dir))
    if not ranks.is_main:
        log_as_replica(run_dir)
    lock = RunDirLock(run_dir) if ranks.is_main else None
    if lock is not None:
        try:
            lock.acquire()
        except (RunDirBusy, OSError) as exc:  # nothing of the other process's run is touched
            stop(EXIT_FAILED, one_line(exc))
    files = RunFiles(run_dir)  # its epochs come with the trainer: an unchecked value must not reach summary.json
    logger: Logger | None = None
    status = "failed"
    try:
        cost = two_objective_cost(cfg, hydra_cfg)
        trainer, checkpoint = build(cfg, run_dir, ranks)
        files = trainer.files
        run_id = checkpoint["wandb_run_id"] if checkpoint else None
        logger = build_logger(cfg, run_dir, hydra_cfg, run_id) if ranks.is_main else Logger(run_dir, {}, cfg.name)
        summary = trainer.fit(logger)
        distributed.teardown()
        status = "completed"
        if not ranks.is_main:
            return None
        print(final_table(summary, run_dir), flush=True)
        return pareto.job_objectives(summary["final"], cost) if cost else summary["best_accuracy"]
    except TrainingInterrupted as exc:
        status = "interrupted"
        end(ranks, files, status, 128 + exc.signum, one_line(exc))
    except KeyboardInterrupt:
        status = "interrupted"
        message = f"aborted by the user; {checkpoint_note(run_dir)}"
        end(ranks, files, status, 130, message)
    except TrainingDiverged as exc:
        status = "diverged"
        end(ranks, files, status, EXIT_FAILED, one_line(exc), type(exc).__name__)
    except RunFileError as exc:
        advice = f"free space or fix permissions, then {resume_hint(run_dir)}"
        message = f"{one_line(exc)}; {checkpoint_note(run_dir)}; {advice}"
        end(ranks, files, status, EXIT_FAILED, message, type(exc).__name__)
    except (ConfigError, OmegaConfBaseException) as exc:
        end(ranks, files, status, EXIT_BAD_INPUT, one_line(exc), type(exc).__name__)
    except Exception as exc:
        if not ranks.active:
            record_ending(files, status, one_line(exc), type(exc).__name__)
            raise
        # one line naming the rank that failed first and why, said by that rank; the traceback at debug level.
        # torchrun stops the other ranks with SIGTERM once one exits: rank 0 first records the failure.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        log.debug("rank %d failed", ranks.rank, exc_info=True)
        message, error_type, own = ranks.failure(exc, one_line(exc))
        end(ranks, files, status, EXIT_FAILED, message, error_type, quiet=not own)
    finally:
        if logger is not None:
            logger.finish(status)
        if lock is not None:
            lock.release()


def record_ending(files: RunFiles | None, status: str, message: str, error_type: str | None = None) -> None:
    """summary.json (and failed.json when ``error_type`` is given) for a job ending early.

    The error being reported matters more than these files: a failure to write them (disk full, a
    metrics.jsonl that cannot be read) is logged on one line and never replaces that error.
    """
    if files is None:
        log.error("summary.json not written: the run dir's metrics.jsonl could not be read")
        return
    try:
        files.write_summary(status, message)
        if error_type is not None:
            files.write_failed(message, error_type)
    except Exception as exc:
        log.error("could not record the job's end in %s: %s", files.run_dir, one_line(exc))


def checkpoint_note(run_dir: Path) -> str:
    """Where the run's checkpoint is — only when the file exists."""
    path = run_dir / CHECKPOINT_FILE
    if path.exists():
        return f"the last checkpoint {path} is intact"
    return f"no checkpoint was written ({path} does not exist)"


def resume_hint(run_dir: Path) -> str:
    """The command that continues this job: the same one plus trainer.resume=true (a sweep: the same sweep)."""
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        return "re-run the same multirun command with trainer.resume=true"
    return f"re-run the same command with trainer.resume=true hydra.run.dir={run_dir}"


def hydra_quoted(value: str) -> str:
    """``value`` as a quoted Hydra override value."""
    return "'" + value.replace("'", "\\'") + "'"


def cli() -> None:
    """``python -m codeq.main``: one process, or one rank of a torchrun job (no multirun there). A rank other
    than 0 waits for rank 0's run dir and runs in it, leaving Hydra's files there to rank 0."""
    global _rank0_run_dir
    ranks = distributed.setup()
    if ranks.active and {"-m", "--multirun"} & set(sys.argv[1:]):
        if ranks.is_main:
            sys.stderr.write(
                "error: -m/--multirun cannot run under torchrun: start one torchrun per job, or use "
                "hydra/launcher=slurm_ddp for data-parallel sweeps\n"
            )
        sys.exit(EXIT_BAD_INPUT)
    if ranks.active and not ranks.is_main:
        try:
            _rank0_run_dir = Path(ranks.broadcast_object(None))
        except Exception:  # noqa: BLE001 - rank 0 ended before its run started (bad input, --help): it said why
            sys.exit(EXIT_FAILED)
        sys.argv += [f"hydra.run.dir={hydra_quoted(str(_rank0_run_dir))}", "hydra.output_subdir=null"]
    main()


if __name__ == "__main__":
    cli()
