"""`python -m codeq.report DIR [DIR ...]`: one table and one Pareto plot over runs and sweeps.

Reads the run-dir files (metrics.jsonl, summary.json, failed.json, .hydra/overrides.yaml) of every
run found under the given dirs, prints a table, and writes report.csv, report.md and report.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from codeq import rundir

logger = logging.getLogger(__name__)

RUN_MARKERS = ("metrics.jsonl", os.path.join(".hydra", "config.yaml"))
OUTPUT_NAMES = ("report.csv", "report.md", "report.png")

# The paper's ResNet-20 / CIFAR-10 results: (label, top-1 %, Rel. BOPs %).
PAPER_POINTS = (
    ("CoDeQ MP", 91.86, 2.61),
    ("CoDeQ 4-bit", 91.88, 2.95),
    ("GETA (structured)", 91.42, 4.5),
    ("QST-Q", 91.60, 3.3),
    ("baseline 32-bit", 91.70, 100.0),
)

# (csv column, table header, how the table shows it); the override columns come before these.
METRIC_COLUMNS = (
    ("final_accuracy_pct", "final acc %", "{:.2f}"),
    ("best_accuracy_pct", "best acc %", "{:.2f}"),
    ("unstructured_sparsity_pct", "sparsity %", "{:.1f}"),
    ("mean_bits", "mean bits", "{:.2f}"),
    ("structured_rel_bops_pct", "struct BOPs %", "{:.2f}"),
    ("structured_bops_ratio", "struct ratio", "{:.1f}x"),
    ("unstructured_rel_bops_pct", "unstruct BOPs %", "{:.2f}"),
    ("unstructured_bops_ratio", "unstruct ratio", "{:.1f}x"),
)


class RunReadError(Exception):
    """A run dir whose files cannot be parsed; the report names it in one line and goes on."""


@dataclass
class Run:
    """What the report needs from one run dir; metric values are None when the run logged none."""

    path: Path
    overrides: dict[str, str]
    status: str
    epochs_completed: int
    epochs_planned: int | None
    final: dict = field(default_factory=dict)
    best_accuracy: float | None = None
    error: str | None = None

    def metric(self, key: str) -> float | None:
        """The final epoch's value of `key` as a float, or None when absent or not a number."""
        value = self.final.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        return float(value)

    def rel_bops_pct(self, kind: str) -> float | None:
        """Rel. BOPs % of `kind` (structured/unstructured); 100 / ratio when only the ratio was logged."""
        pct = self.metric(f"compression/{kind}_rel_bops_pct")
        if pct is not None:
            return pct
        ratio = self.metric(f"compression/{kind}_bops_ratio")
        return None if ratio is None or ratio == 0 else 100.0 / ratio

    def values(self) -> dict[str, float | None]:
        """The metric columns of this run's row (percentages already scaled to %)."""
        return {
            "final_accuracy_pct": _percent(self.metric("eval/accuracy")),
            "best_accuracy_pct": _percent(self.best_accuracy),
            "unstructured_sparsity_pct": _percent(self.metric("sparsity/unstructured")),
            "mean_bits": self.metric("bits/mean"),
            "structured_rel_bops_pct": self.rel_bops_pct("structured"),
            "structured_bops_ratio": self.metric("compression/structured_bops_ratio"),
            "unstructured_rel_bops_pct": self.rel_bops_pct("unstructured"),
            "unstructured_bops_ratio": self.metric("compression/unstructured_bops_ratio"),
        }


def _percent(fraction: float | None) -> float | None:
    return None if fraction is None else 100.0 * fraction


def _natural_key(name) -> list:
    """Sort key that orders sweep job dirs (and epochs) 0, 1, 2, ..., 10 rather than 0, 1, 10, 2."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(name))]


def find_run_dirs(root: Path) -> list[Path]:
    """Every dir under `root` (itself included) holding metrics.jsonl or .hydra/config.yaml."""
    runs = []
    for current, subdirs, _files in os.walk(root):
        if any(os.path.isfile(os.path.join(current, marker)) for marker in RUN_MARKERS):
            runs.append(Path(current))
            subdirs.clear()
        else:
            subdirs[:] = [d for d in subdirs if not d.startswith(".")]
    return sorted(runs, key=_natural_key)


def _read_json(path: Path) -> dict | None:
    """The JSON object in `path`, None when the file does not exist."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunReadError(f"{path.name} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise RunReadError(f"{path.name} holds a {type(data).__name__}, expected a JSON object")
    return data


def read_metrics(path: Path) -> list[dict]:
    """Rows of metrics.jsonl (codeq.rundir's reader), one per epoch: the last row written for an epoch wins."""
    try:
        rows = rundir.read_metrics(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise RunReadError(f"metrics.jsonl cannot be read ({exc})") from exc
    except ValueError as exc:
        raise RunReadError(str(exc)) from exc
    by_epoch = {row.get("epoch", number): row for number, row in enumerate(rows)}
    return [by_epoch[epoch] for epoch in sorted(by_epoch, key=_natural_key)]


def read_overrides(run_dir: Path) -> dict[str, str]:
    """`.hydra/overrides.yaml` ("key=value" strings) as {key: value}; {} when the file is absent.

    Hydra's prefixes are kept out of the key (`+k=v` and `++k=v` add k); `~k` deletes k.
    """
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    try:
        items = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        first_line = str(exc).splitlines()[0]
        raise RunReadError(f".hydra/overrides.yaml is not valid YAML ({first_line})") from exc
    if items is None:
        return {}
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise RunReadError(".hydra/overrides.yaml is not a list of 'key=value' strings")
    overrides = {}
    for item in items:
        key, _sep, value = item.partition("=")
        if key.startswith("~"):
            overrides[key[1:]] = "<deleted>"
        else:
            overrides[key.lstrip("+")] = value
    return overrides


def _finite(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def load_run(run_dir: Path) -> Run:
    """Read one run dir; raises RunReadError naming the file that cannot be parsed."""
    rows = read_metrics(run_dir / "metrics.jsonl")
    summary = _read_json(run_dir / "summary.json") or {}
    failed = _read_json(run_dir / "failed.json")
    overrides = read_overrides(run_dir)

    final = rows[-1] if rows else summary.get("final") or {}
    accuracies = [_finite(row.get("eval/accuracy")) for row in rows]
    accuracies.append(_finite(summary.get("best_accuracy")))
    accuracies = [a for a in accuracies if a is not None]

    status = summary.get("status") or "unknown"
    error = summary.get("error")
    if failed is not None:
        error = error or failed.get("error")
        if status not in ("failed", "diverged", "interrupted"):
            status = "failed"

    planned, completed = summary.get("epochs"), summary.get("epochs_completed")
    return Run(
        path=run_dir,
        overrides=overrides,
        status=str(status),
        epochs_completed=max(len(rows), completed if isinstance(completed, int) else 0),
        epochs_planned=planned if isinstance(planned, int) else None,
        final=final if isinstance(final, dict) else {},
        best_accuracy=max(accuracies) if accuracies else None,
        error=None if error is None else str(error),
    )


def collect_runs(dirs: Sequence[Path]) -> list[Run]:
    """Every readable run under `dirs`; a missing dir, a dir without runs, an unreadable run: one log line."""
    runs: list[Run] = []
    seen: set[Path] = set()
    for directory in dirs:
        if not directory.is_dir():
            logger.error("%s: no such directory", directory)
            continue
        found = find_run_dirs(directory)
        if not found:
            logger.error("%s: no runs found (no metrics.jsonl or .hydra/config.yaml below it)", directory)
        for run_dir in found:
            if run_dir.resolve() in seen:
                continue
            seen.add(run_dir.resolve())
            try:
                runs.append(load_run(run_dir))
            except RunReadError as exc:
                logger.error("%s: skipped, %s", run_dir, exc)
    return runs


def differing_override_keys(overrides: Sequence[dict[str, str]]) -> list[str]:
    """Keys whose value is not the same in every run (absent counts as a value), in first-seen order."""
    keys: list[str] = []
    for run_overrides in overrides:
        keys.extend(key for key in run_overrides if key not in keys)
    return [key for key in keys if len({run_overrides.get(key) for run_overrides in overrides}) > 1]


def short_key_names(keys: Sequence[str]) -> dict[str, str]:
    """Each key's last dotted part (`sparsity.weight` -> `weight`) unless two keys would share it."""
    last_parts = [key.rsplit(".", 1)[-1] for key in keys]
    return {key: last if last_parts.count(last) == 1 else key for key, last in zip(keys, last_parts)}


def run_names(runs: Sequence[Run]) -> list[str]:
    """Each run's path relative to the dir all runs share (a lone run: its dir name)."""
    if len(runs) == 1:
        return [runs[0].path.name or str(runs[0].path)]
    common = Path(os.path.commonpath([run.path.resolve() for run in runs]))
    return [os.path.relpath(run.path.resolve(), common) for run in runs]


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (cost, accuracy) points no other point beats: lower-or-equal cost with higher accuracy.

    Sorted by increasing cost. Among equal points the first is kept; points with a non-finite
    coordinate are ignored.
    """
    candidates = [i for i, (cost, acc) in enumerate(points) if math.isfinite(cost) and math.isfinite(acc)]
    candidates.sort(key=lambda i: (points[i][0], -points[i][1], i))
    front: list[int] = []
    best_accuracy = -math.inf
    for i in candidates:
        if points[i][1] > best_accuracy:
            front.append(i)
            best_accuracy = points[i][1]
    return front


@dataclass
class Report:
    """The report's rows: runs, their display names and the override keys that tell them apart."""

    runs: list[Run]
    names: list[str]
    keys: list[str]

    @classmethod
    def of(cls, runs: Sequence[Run]) -> Report:
        runs = list(runs)
        return cls(runs, run_names(runs), differing_override_keys([r.overrides for r in runs]))

    def label(self, index: int) -> str:
        """The point label: the run's differing overrides, or its name when nothing differs."""
        run = self.runs[index]
        short = short_key_names(self.keys)
        parts = [f"{short[k]}={run.overrides.get(k, '-')}" for k in self.keys]
        return ", ".join(parts) if parts else self.names[index]

    def csv_columns(self) -> list[str]:
        metric_columns = [column for column, _header, _fmt in METRIC_COLUMNS]
        return ["run", *self.keys, *metric_columns, "epochs_completed", "epochs_planned", "status", "error"]

    def csv_rows(self) -> list[dict]:
        """One dict per run with raw numbers (inf stays inf, missing values are empty)."""
        rows = []
        for name, run in zip(self.names, self.runs):
            row = {"run": name, **{k: run.overrides.get(k, "") for k in self.keys}}
            row.update({k: "" if v is None else v for k, v in run.values().items()})
            row.update(
                epochs_completed=run.epochs_completed,
                epochs_planned="" if run.epochs_planned is None else run.epochs_planned,
                status=run.status,
                error=run.error or "",
            )
            rows.append(row)
        return rows

    def table(self) -> tuple[list[str], list[list[str]]]:
        """Header and formatted cells of the human-readable table."""
        header = ["run", *self.keys, *(h for _c, h, _f in METRIC_COLUMNS), "epochs", "status"]
        cells = []
        for name, run in zip(self.names, self.runs):
            values = run.values()
            planned = "?" if run.epochs_planned is None else str(run.epochs_planned)
            cells.append(
                [
                    name,
                    *(run.overrides.get(k, "-") for k in self.keys),
                    *(_format(values[column], fmt) for column, _h, fmt in METRIC_COLUMNS),
                    f"{run.epochs_completed}/{planned}",
                    run.status,
                ]
            )
        return header, cells


def _format(value: float | None, fmt: str) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if math.isnan(value):
        return "nan"
    return fmt.format(value)


def format_text_table(header: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell; text left-aligned, numbers right-aligned."""
    widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header))]

    def is_number(text: str) -> bool:
        return bool(re.fullmatch(r"-?[\d.]+x?|-?inf|nan|[\d?]+/[\d?]+|-", text))

    numeric = [all(is_number(row[i]) for row in cells) for i in range(len(header))]
    lines = []
    for row in [header, *cells]:
        padded = [text.rjust(width) if num else text.ljust(width) for text, width, num in zip(row, widths, numeric)]
        lines.append("  ".join(padded).rstrip())
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def format_markdown(report: Report, plot_name: str | None) -> str:
    """report.md: the table (with each failed run's error) and the plot below it."""
    header, cells = report.table()
    header = [*header, "error"]
    cells = [[*row, (run.error or "").replace("|", "\\|")] for row, run in zip(cells, report.runs)]
    lines = [f"# codeq report: {len(report.runs)} run(s)", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines.extend("| " + " | ".join(row) + " |" for row in cells)
    lines.append("")
    lines.append("Accuracies and sparsity in %; Rel. BOPs % = 100 / ratio vs the dense 32-bit model.")
    if plot_name:
        lines.extend(["", f"![accuracy vs Rel. BOPs]({plot_name})"])
    return "\n".join(lines) + "\n"


def write_csv(report: Report, path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=report.csv_columns())
        writer.writeheader()
        writer.writerows(report.csv_rows())


def plot_pareto(report: Report, path: Path, paper: bool = False) -> None:
    """Accuracy % vs Rel. BOPs % (log x): structured and unstructured points, each kind's Pareto front.

    Points without accuracy or with Rel. BOPs 0 % (every weight dead, ratio inf) have no place on a
    log axis and are left out with a log line.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig = Figure(figsize=(9, 6), layout="constrained")
    ax = fig.add_subplot()
    styles = {
        "structured": dict(marker="o", color="tab:blue"),
        "unstructured": dict(marker="^", color="tab:orange"),
    }
    drawn = 0
    for kind, style in styles.items():
        points, labels = [], []
        for index, run in enumerate(report.runs):
            accuracy = _percent(run.metric("eval/accuracy"))
            bops = run.rel_bops_pct(kind)
            if accuracy is None or bops is None or not math.isfinite(accuracy):
                continue
            if not (bops > 0 and math.isfinite(bops)):
                logger.warning(
                    "%s: %s Rel. BOPs %s %% cannot sit on the log axis, not drawn", report.names[index], kind, bops
                )
                continue
            points.append((bops, accuracy))
            labels.append(report.label(index))
        if not points:
            continue
        drawn += len(points)
        ax.scatter([p[0] for p in points], [p[1] for p in points], s=40, zorder=3, label=f"{kind} (runs)", **style)
        for (bops, accuracy), label in zip(points, labels):
            ax.annotate(
                label, (bops, accuracy), xytext=(4, 4), textcoords="offset points", fontsize=7, color=style["color"]
            )
        front = [points[i] for i in pareto_front(points)]
        ax.plot(
            [p[0] for p in front],
            [p[1] for p in front],
            drawstyle="steps-post",
            linestyle="--",
            linewidth=1.2,
            color=style["color"],
            label=f"{kind} Pareto front",
        )
    if paper:
        ax.scatter(
            [p[2] for p in PAPER_POINTS],
            [p[1] for p in PAPER_POINTS],
            marker="*",
            s=120,
            color="black",
            zorder=4,
            label="paper, ResNet-20 / CIFAR-10",
        )
        by_cost = sorted(PAPER_POINTS, key=lambda point: point[2])
        for position, (name, accuracy, bops) in enumerate(by_cost):
            offset = (4, -10) if position % 2 == 0 else (4, 6)
            ax.annotate(name, (bops, accuracy), xytext=offset, textcoords="offset points", fontsize=7, color="black")
    if drawn == 0 and not paper:
        ax.text(
            0.5, 0.5, "no run has both accuracy and Rel. BOPs yet", transform=ax.transAxes, ha="center", va="center"
        )
    else:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _pos: f"{value:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("Rel. BOPs % (vs dense 32-bit model, log scale)")
    ax.set_ylabel("accuracy %")
    ax.set_title(f"Accuracy vs compute, {len(report.runs)} run(s)")
    ax.grid(True, which="both", alpha=0.3)
    fig.savefig(path, dpi=120)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m codeq.report",
        description=(
            "Summarise codeq runs: every dir below DIR holding metrics.jsonl or .hydra/config.yaml is "
            "a run (a single run dir, a sweep dir, or a folder of sweeps). Prints one row per run "
            "(the overrides that differ between runs, final/best accuracy, unstructured sparsity, mean "
            "bits, structured and unstructured Rel. BOPs % and ratio, epochs done/planned, status) and "
            "writes report.csv, report.md and report.png (accuracy vs Rel. BOPs %, Pareto fronts)."
        ),
        epilog=(
            "Unreadable runs and dirs without runs are reported in one line each on stderr; the other "
            "runs still report. Exit status: 0 when at least one run was reported; 1 when none was found "
            "or the report files could not be written."
        ),
    )
    parser.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="run dir, sweep dir or any folder above them")
    parser.add_argument(
        "--out", type=Path, metavar="DIR", help="where report.csv/.md/.png go (default: into the first DIR)"
    )
    parser.add_argument(
        "--paper", action="store_true", help="overlay the CoDeQ paper's ResNet-20 / CIFAR-10 points on the plot"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="codeq.report: %(message)s", stream=sys.stderr)
    runs = collect_runs(args.dirs)
    if not runs:
        return 1
    report = Report.of(runs)
    print(format_text_table(*report.table()))
    for name, run in zip(report.names, report.runs):
        if run.error:
            print(f"{name}: {run.status}: {run.error}")

    out = args.out or args.dirs[0]
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_csv(report, out / "report.csv")
        plot_pareto(report, out / "report.png", paper=args.paper)
        (out / "report.md").write_text(format_markdown(report, "report.png"))
    except OSError as exc:
        logger.error("cannot write the report into %s: %s", out, exc)
        return 1
    logger.info("wrote %s", ", ".join(str(out / name) for name in OUTPUT_NAMES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
