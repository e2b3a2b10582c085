"""`python -m codeq.export RUN_DIR [--checkpoint last|best] [--out DIR] [--force]`: the run's model, slimmed and proven.

Writes into DIR (default RUN_DIR/export), all or nothing (a temp dir renamed into place):
  model.pt2              torch.export of the slimmed model (dynamic batch)
  model.py, state_dict.pt the slimmed model as plain PyTorch, loadable without codeq (``model.load(path)``)
  model.onnx             ONNX of the slimmed model, checked with onnx.checker and run with onnxruntime
  packed.pt              quantized layers as bit-packed codes + zero index (``codeq.export.load_packed``)
  export.json            output parity, MAC parity against metrics.jsonl, sizes and latency, all measured here
Bad input (no checkpoint, a config this codeq cannot rebuild, an op the surgery cannot slim, an existing DIR
without --force) ends with one ``error:`` line and exit status 2; nothing is written then.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn
from torch.onnx import _constants as onnx_constants

from codeq.checkpoint import BEST_CHECKPOINT_FILE, CHECKPOINT_FILE, FORMAT_VERSION
from codeq.errors import ConfigError
from codeq.export.measure import (
    ParityError,
    check_mac_parity,
    layer_macs,
    median_latencies,
    output_difference,
    reported_layer_macs,
    speedup,
)
from codeq.export.packing import PackingError, pack_state_dict, packed_sizes, quantizer_grid, unpack_state_dict
from codeq.export.slim import SlimResult, bake_quantized, flat_name, slim_model
from codeq.quant import quantized_layers
from codeq.rundir import METRICS_FILE, read_metrics

EXPORT_DIR = "export"
EXPORT_FILE = "export.json"
CHECKPOINTS = {"last": CHECKPOINT_FILE, "best": BEST_CHECKPOINT_FILE}
TOLERANCE = 1e-4  # max |Δ logits| relative to max |logits|
PARITY_BATCH = 8
EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


def onnx_opset() -> int:
    """The installed onnx's opset, capped at what torch's TorchScript ONNX exporter writes."""
    return min(onnx.defs.onnx_opset_version(), onnx_constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)


# --------------------------------------------------------------------------- reading the run


def load_run(run_dir: Path, checkpoint: str) -> tuple[DictConfig, nn.Module, dict[str, Any], dict[str, Any]]:
    """(config, model with the checkpoint's weights and quantizers, checkpoint, its metrics.jsonl row)."""
    from codeq.main import attach_quantizers, instantiate_group  # Hydra-aware helpers that rebuild the run's model

    config_path = run_dir / ".hydra" / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"{config_path} not found: {run_dir} is not a codeq run dir")
    try:
        cfg = OmegaConf.load(config_path)
        missing = [
            key for key in ("model._target_", "dataset.input_size", "quantizer") if OmegaConf.select(cfg, key) is None
        ]
        if missing:
            raise ConfigError(f"{config_path} is not a config of this codeq version (no {', '.join(missing)})")
        input_size = tuple(int(v) for v in OmegaConf.to_container(cfg.dataset.input_size, resolve=True))
        model = instantiate_group(cfg, "model")
        attach_quantizers(cfg, model)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{config_path}: {' '.join(str(exc).split())}") from None
    path = run_dir / CHECKPOINTS[checkpoint]
    if not path.is_file():
        raise ConfigError(f"{path} not found: --checkpoint {checkpoint} needs {path.name} in the run dir")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for truncated or foreign files
        raise ConfigError(f"cannot read {path} ({' '.join(str(exc).split())[:200] or type(exc).__name__})") from None
    if not isinstance(state, dict) or not {"version", "epoch", "model"} <= set(state):
        raise ConfigError(f"{path} is not a codeq checkpoint")
    if state["version"] != FORMAT_VERSION:
        raise ConfigError(f"{path} has checkpoint format {state['version']}; this codeq reads {FORMAT_VERSION}")
    if state.get("partial") is not None:
        raise ConfigError(f"{path} was written in the middle of an epoch (an interrupted run); resume it first")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(f"{path} does not fit the model of {config_path}: {first}") from None
    row = next((r for r in read_metrics(run_dir / METRICS_FILE) if r.get("epoch") == state["epoch"]), None)
    if row is None:
        raise ConfigError(f"{run_dir / METRICS_FILE} has no row for epoch {state['epoch']}, the epoch of {path.name}")
    return cfg, model.eval(), state, {**row, "input_size": input_size}


# --------------------------------------------------------------------------- writing the artefacts


def plain_source(model: torch.fx.GraphModule) -> str:
    """The slimmed model as a Python file that needs only torch: its layers, buffers and forward."""
    lines = [
        '"""The slimmed model written by codeq.export; needs only torch. load("state_dict.pt") -> eval-mode model."""',
        "import operator  # noqa: F401",
        "",
        "import torch",
        "from torch import nn",
        "",
        "",
        "class SlimModel(nn.Module):",
        "    def __init__(self):",
        "        super().__init__()",
    ]
    for name, module in model.named_children():
        lines.append(f"        self.{name} = nn.{module!r}")
    for name, buffer in model.named_buffers(recurse=False):
        lines.append(
            f"        self.register_buffer({name!r}, torch.zeros({tuple(buffer.shape)}, dtype={buffer.dtype}))"
        )
    lines += ["    " + line if line.strip() else "" for line in model.code.strip("\n").splitlines()]
    lines += [
        "",
        "",
        "def load(state_dict_path):",
        '    """The slimmed model with its weights, in eval mode."""',
        "    model = SlimModel()",
        "    model.load_state_dict(torch.load(state_dict_path, weights_only=True))",
        "    return model.eval()",
        "",
    ]
    return "\n".join(lines)


def load_packed(path: Path) -> dict[str, torch.Tensor]:
    """The slimmed model's state dict from packed.pt, every quantized weight rebuilt exactly."""
    return unpack_state_dict(torch.load(path, weights_only=True))


def _onnx_bytes(model: nn.Module, example: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            model,
            (example,),
            buffer,
            dynamo=False,
            opset_version=onnx_opset(),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    data = buffer.getvalue()
    onnx.checker.check_model(onnx.load_from_string(data))
    return data


def _ort_session(data: bytes) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _state_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


# --------------------------------------------------------------------------- the export


def export_model(
    model: nn.Module, input_size: tuple[int, ...], row: dict[str, Any], out: Path, repeats: int, batches: Sequence[int]
) -> dict[str, Any]:
    """Write the artefacts of ``model`` (quantizers attached, eval mode) into ``out``; returns export.json's content.

    ``row`` is the metrics.jsonl row of the model's weights: its structured MACs are what the slimmed layers
    must hold exactly.
    """
    model = model.cpu().eval()
    slim: SlimResult = slim_model(model, input_size)
    dense = bake_quantized(model)
    names = {name: flat_name(name) for name in slim.layer_channels}
    x = torch.randn(PARITY_BATCH, *input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(x)
        outputs = {"eager": output_difference(reference, slim.model(x))}

    program = torch.export.export(slim.model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(program, out / "model.pt2")
    with torch.no_grad():
        outputs["torch_export"] = output_difference(reference, torch.export.load(out / "model.pt2").module()(x))
    (out / "model.py").write_text(plain_source(slim.model))
    torch.save(slim.model.state_dict(), out / "state_dict.pt")
    onnx_data = _onnx_bytes(slim.model, x)
    (out / "model.onnx").write_bytes(onnx_data)
    slim_session = _ort_session(str(out / "model.onnx"))
    outputs["onnxruntime"] = output_difference(reference, slim_session.run(None, {"input": x.numpy()})[0])
    failed = {engine: diff for engine, diff in outputs.items() if not diff <= TOLERANCE}
    if failed:
        raise ParityError(
            "output parity failed: "
            + ", ".join(f"{e} differs by {d:.2e} (tolerance {TOLERANCE:g})" for e, d in failed.items())
        )

    dense_macs = layer_macs(dense, input_size, {name: name for name in names})
    slim_macs = layer_macs(slim.model, input_size, names)
    reported = reported_layer_macs(row, dense_macs)
    check_mac_parity(slim_macs, reported)

    latents = {name: (m.parametrizations["weight"].original, fq.quantizer) for name, m, fq in quantized_layers(model)}
    grids = {flat_name(name): quantizer_grid(q, w) for name, (w, q) in latents.items() if name in names}
    packed = pack_state_dict(slim.model.state_dict(), grids)
    torch.save(packed, out / "packed.pt")
    rebuilt = load_packed(out / "packed.pt")
    if any(not torch.equal(rebuilt[k], v) for k, v in slim.model.state_dict().items()):
        raise PackingError("packing: packed.pt does not rebuild the slimmed model's state dict exactly")
    sizes = packed_sizes(packed)
    dense_layer_bytes = sum(4 * m.weight.numel() for n, m in dense.named_modules() if n in latents)

    latency = _latency(dense, slim.model, input_size, repeats, batches)
    total_dense, total_slim = sum(dense_macs.values()), sum(slim_macs.values())
    return {
        "epoch": row["epoch"],
        "input_size": list(input_size),
        "surgery": {
            "method": "codeq fx liveness (codeq.cost.liveness), constants folded",
            "layers": {name: {**channels, "module": names[name]} for name, channels in slim.layer_channels.items()},
            "bias_maps": slim.bias_maps,
        },
        "outputs": {"tolerance": TOLERANCE, "batch": PARITY_BATCH, "max_relative_difference": outputs},
        "macs": {
            "dense": total_dense,
            "slimmed_measured": total_slim,
            "reported_structured": sum(reported.values()),
            "measured_ratio": total_dense / total_slim if total_slim else None,
            "reported_structured_mac_ratio": row.get("compression/structured_mac_ratio"),
            "reported_structured_bops_ratio": row.get("compression/structured_bops_ratio"),
            "reported_structured_rel_bops_pct": row.get("compression/structured_rel_bops_pct"),
            "counter": "torch.utils.flop_counter, batch 1, MACs = FLOPs / 2",
            "layers": slim_macs,
        },
        "sizes": {
            "dense_fp32_bytes": _state_bytes(dense),
            "slimmed_fp32_bytes": _state_bytes(slim.model),
            "packed_bytes": sizes["packed_layers_bytes"] + sizes["plain_tensors_bytes"],
            "quantized_layers_dense_fp32_bytes": dense_layer_bytes,
            **sizes,
            "packed_file_bytes": (out / "packed.pt").stat().st_size,
        },
        "latency": latency,
        "onnx": {"opset": onnx_opset(), "onnxruntime": onnxruntime.__version__},
        "files": sorted(p.name for p in out.iterdir()) + [EXPORT_FILE],
    }


def _latency(dense: nn.Module, slim: nn.Module, input_size: tuple[int, ...], repeats: int, batches: Sequence[int]):
    """Median ms per forward of dense vs slimmed: eager (CPU, and CUDA when present) and onnxruntime (CPU)."""
    example = torch.zeros(1, *input_size)
    sessions = {"dense": _ort_session(_onnx_bytes(dense, example)), "slimmed": _ort_session(_onnx_bytes(slim, example))}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    variants: dict[tuple, Any] = {}
    for device in devices:
        models = {"dense": dense.to(device), "slimmed": slim.to(device)}
        for batch in batches:
            x = torch.randn(batch, *input_size, device=device)
            for kind, m in models.items():
                variants[("eager", device, batch, kind)] = _eager_call(m, x)
    for batch in batches:
        x = np.random.default_rng(0).standard_normal((batch, *input_size), dtype=np.float32)
        for kind, session in sessions.items():
            variants[("onnxruntime", "cpu", batch, kind)] = _ort_call(session, x)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    medians = median_latencies(variants, repeats, sync)
    dense.cpu(), slim.cpu()
    rows = []
    for engine, device, batch, kind in variants:
        if kind == "dense":
            d, s = medians[(engine, device, batch, "dense")], medians[(engine, device, batch, "slimmed")]
            rows.append(
                {
                    "engine": engine,
                    "device": device,
                    "batch": batch,
                    "dense_ms": 1e3 * d,
                    "slimmed_ms": 1e3 * s,
                    "speedup": speedup(d, s),
                }
            )
    return {
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "statistic": "median of alternated rounds",
        "rows": rows,
    }


def _eager_call(model: nn.Module, x: torch.Tensor):
    def call():
        with torch.inference_mode():
            model(x)

    return call


def _ort_call(session: onnxruntime.InferenceSession, x: np.ndarray):
    return lambda: session.run(None, {"input": x})


def export_run(
    run_dir: Path,
    checkpoint: str = "last",
    out: Path | None = None,
    force: bool = False,
    repeats: int = 20,
    batches: Sequence[int] = (1, 64),
) -> tuple[Path, dict[str, Any]]:
    """Export a run dir's model into ``out`` (default RUN_DIR/export), all files or none; returns (out, export.json)."""
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / EXPORT_DIR
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a directory")
    if out.exists() and not force:
        raise ConfigError(f"{out} exists; pass --force to replace it")
    _cfg, model, state, row = load_run(run_dir, checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        result = export_model(model, row.pop("input_size"), row, staging, repeats, batches)
        result = {
            "run_dir": str(run_dir),
            "checkpoint": {"file": CHECKPOINTS[checkpoint], "epoch": state["epoch"]},
            **result,
        }
        (staging / EXPORT_FILE).write_text(json.dumps(result, indent=2) + "\n")
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}-old-", dir=out.parent))
            out.rename(old / out.name)
            staging.rename(out)
            shutil.rmtree(old)
        else:
            staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out, result


def summary_table(result: dict[str, Any]) -> str:
    """A few lines: counted vs measured MACs, sizes, latency."""
    macs, sizes = result["macs"], result["sizes"]
    lines = [
        f"Exported epoch {result['epoch']}: outputs within {result['outputs']['tolerance']:g} of the quantized model "
        + ", ".join(f"({k} {v:.1e})" for k, v in result["outputs"]["max_relative_difference"].items()),
        f"  MACs      dense {macs['dense']:,}  slimmed {macs['slimmed_measured']:,} (flop_counter)  "
        f"= reported structured {macs['reported_structured']:,}  ({macs['measured_ratio']:.2f}x fewer)",
        f"  bytes     dense fp32 {sizes['dense_fp32_bytes']:,}  slimmed fp32 {sizes['slimmed_fp32_bytes']:,}  "
        f"packed {sizes['packed_bytes']:,}  (codes in theory {sizes['theoretical_code_bytes']:,})",
    ]
    for r in result["latency"]["rows"]:
        lines.append(
            f"  latency   {r['engine']:<11} {r['device']:<4} batch {r['batch']:<3} dense {r['dense_ms']:8.3f} ms"
            f"  slimmed {r['slimmed_ms']:8.3f} ms  {r['speedup']:.2f}x"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m codeq.export", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    parser.add_argument(
        "--checkpoint", choices=sorted(CHECKPOINTS), default="last", help="last.pt (default) or best.pt"
    )
    parser.add_argument("--out", type=Path, default=None, help="output dir (default RUN_DIR/export)")
    parser.add_argument("--force", action="store_true", help="replace an existing output dir")
    parser.add_argument("--repeats", type=int, default=20, help="latency rounds per variant (default 20)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64], help="latency batch sizes")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.repeats < 1 or any(b < 1 for b in args.batch_sizes):
        sys.stderr.write("error: --repeats and --batch-sizes must be integers >= 1\n")
        return EXIT_BAD_INPUT
    try:
        out, result = export_run(args.run_dir, args.checkpoint, args.out, args.force, args.repeats, args.batch_sizes)
    except ConfigError as exc:
        sys.stderr.write(f"error: {' '.join(str(exc).split())}\n")
        return EXIT_BAD_INPUT
    print(summary_table(result))
    print(f"Files: {out}/ ({', '.join(result['files'])})")
    return 0
