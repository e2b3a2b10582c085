"""`python -m codeq.report DIR [DIR ...]`: one table and one Pareto plot over runs and sweeps.

Reads the run-dir files (metrics.jsonl, summary.json, failed.json, .hydra/overrides.yaml) of every
run found under the given dirs, prints a table, and writes report.csv, report.md, report.png and
pareto_front.yaml. Runs whose overrides differ only in `seed` share one row: mean ± std over the seeds.
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
from typing import TYPE_CHECKING

import yaml

from codeq import rundir
from codeq.paper import PAPER_RESULTS, PaperResult
from codeq.pareto import COSTS, pareto_front
from codeq.runlock import is_locked

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

RUN_MARKERS = ("metrics.jsonl", os.path.join(".hydra", "config.yaml"))
OUTPUT_NAMES = ("report.csv", "report.md", "report.png", "pareto_front.yaml")
SEED_KEY = "seed"
PAPER_RUNS_PER_RESULT = 3  # the paper reports means of 3 runs

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

# Shown when some run dir has export/export.json (written by `python -m codeq.export RUN_DIR`).
EXPORT_COLUMNS = (
    ("measured_macs", "measured MACs", "{:,.0f}"),
    ("packed_kb", "packed KB", "{:.1f}"),
    ("measured_speedup", "ORT speed-up", "{:.2f}x"),
)
EXPORT_FILE = Path("export") / "export.json"


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
    override_list: list[str] = field(default_factory=list)
    export: dict = field(default_factory=dict)

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
            **self.export_values(),
        }

    def export_values(self) -> dict[str, float | None]:
        """From export.json (None without one): the slimmed model's flop-counted MACs, its packed size, and its
        onnxruntime CPU speed-up over the dense model at the largest batch measured."""
        rows = [r for r in self.export.get("latency", {}).get("rows", []) if r.get("engine") == "onnxruntime"]
        largest = max(rows, key=lambda r: r.get("batch", 0), default={})
        packed = _finite(self.export.get("sizes", {}).get("packed_bytes"))
        return {
            "measured_macs": _finite(self.export.get("macs", {}).get("slimmed_measured")),
            "packed_kb": None if packed is None else packed / 1024,
            "measured_speedup": _finite(largest.get("speedup")),
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
    """`.hydra/overrides.yaml` ("key=value" strings) as {key: value}; {} when the file is absent."""
    return parse_overrides(read_override_list(run_dir))


def read_override_list(run_dir: Path) -> list[str]:
    """`.hydra/overrides.yaml` as written: the command line's "key=value" strings; [] when absent."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    try:
        items = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        first_line = str(exc).splitlines()[0]
        raise RunReadError(f".hydra/overrides.yaml is not valid YAML ({first_line})") from exc
    if items is None:
        return []
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise RunReadError(".hydra/overrides.yaml is not a list of 'key=value' strings")
    return items


def override_key(item: str) -> str:
    """The key of one "key=value" override, Hydra's `+`, `++` and `~` prefixes removed."""
    return item.partition("=")[0].lstrip("+~")


def parse_overrides(items: Sequence[str]) -> dict[str, str]:
    """Override strings as {key: value}: `+k=v` and `++k=v` add k, `~k` deletes it ("<deleted>")."""
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
    override_list = read_override_list(run_dir)

    final = rows[-1] if rows else summary.get("final") or {}
    accuracies = [_finite(row.get("eval/accuracy")) for row in rows]
    accuracies.append(_finite(summary.get("best_accuracy")))
    accuracies = [a for a in accuracies if a is not None]

    status = summary.get("status") or "unknown"
    error = summary.get("error")
    if status == "running" and not is_locked(run_dir):
        status = "killed"
        error = (
            f"its process ended after {len(rows)} completed epochs without a word: killed by a signal (SIGKILL, "
            "out of memory) or its machine went down; re-run its command with trainer.resume=true to finish it"
        )
    if failed is not None:
        error = error or failed.get("error")
        if status not in ("failed", "diverged", "interrupted"):
            status = "failed"

    planned, completed = summary.get("epochs"), summary.get("epochs_completed")
    return Run(
        path=run_dir,
        overrides=parse_overrides(override_list),
        status=str(status),
        epochs_completed=max(len(rows), completed if isinstance(completed, int) else 0),
        epochs_planned=planned if isinstance(planned, int) else None,
        final=final if isinstance(final, dict) else {},
        best_accuracy=max(accuracies) if accuracies else None,
        error=None if error is None else str(error),
        override_list=override_list,
        export=_read_json(run_dir / EXPORT_FILE) or {},
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


def seed_groups(runs: Sequence[Run]) -> list[list[int]]:
    """Indices of the runs that share a report row, in first-seen order: overrides equal except `seed`.

    Runs with the same seed as well are repeats, not seeds: they stay in rows of their own.
    """
    groups: list[tuple[tuple, list[int]]] = []
    for index, run in enumerate(runs):
        others = tuple(sorted((k, v) for k, v in run.overrides.items() if k != SEED_KEY))
        seed = run.overrides.get(SEED_KEY)
        for key, members in groups:
            if key == others and all(runs[i].overrides.get(SEED_KEY) != seed for i in members):
                members.append(index)
                break
        else:
            groups.append((others, [index]))
    return [members for _key, members in groups]


def _joined(values: Sequence[str]) -> str:
    """The distinct values in first-seen order, joined by commas ("0,1,2"; one value stays itself)."""
    return ",".join(dict.fromkeys(values))


@dataclass(frozen=True)
class Stat:
    """One metric over a row's runs: mean, sample standard deviation (n - 1; None below 2 values), count.

    Runs without the value are left out, so `count` can be below the row's number of runs.
    """

    mean: float | None
    std: float | None
    count: int

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Stat:
        present = [value for value in values if value is not None]
        if not present:
            return cls(None, None, 0)
        mean = math.fsum(present) / len(present)
        if len(present) < 2 or not math.isfinite(mean):
            return cls(mean, None, len(present))
        variance = math.fsum((value - mean) ** 2 for value in present) / (len(present) - 1)
        return cls(mean, math.sqrt(variance), len(present))


@dataclass
class Row:
    """One line of the report: a run, or the runs whose overrides differ only in `seed`."""

    name: str
    runs: list[Run]
    overrides: dict[str, str]
    stats: dict[str, Stat]

    @classmethod
    def of(cls, runs: Sequence[Run], names: Sequence[str]) -> Row:
        keys = [key for run in runs for key in run.overrides]
        overrides = {key: _joined([run.overrides.get(key, "-") for run in runs]) for key in dict.fromkeys(keys)}
        values = [run.values() for run in runs]
        stats = {column: Stat.of([v[column] for v in values]) for column in values[0]}
        return cls(_joined(names), list(runs), overrides, stats)

    def mean(self, column: str) -> float:
        """The column's mean, nan when no run of the row has it."""
        value = self.stats[column].mean
        return math.nan if value is None else value

    def epochs(self) -> str:
        return _joined(
            [f"{run.epochs_completed}/{'?' if run.epochs_planned is None else run.epochs_planned}" for run in self.runs]
        )

    def status(self) -> str:
        return _joined([run.status for run in self.runs])

    def error(self) -> str:
        if len(self.runs) == 1:
            return self.runs[0].error or ""
        return "; ".join(f"{run.path.name}: {run.error}" for run in self.runs if run.error)

    def front_overrides(self) -> dict:
        """How to run this row again: a run's own overrides; for seeds, the shared ones and the seeds."""
        if len(self.runs) == 1:
            return {"overrides": list(self.runs[0].override_list)}
        shared = [item for item in self.runs[0].override_list if override_key(item) != SEED_KEY]
        return {"overrides": shared, "seeds": [run.overrides.get(SEED_KEY, "default") for run in self.runs]}


@dataclass
class Report:
    """The report's rows (runs, or seeds of one setting), the override keys that tell them apart, and
    the paper's results shown beside them."""

    runs: list[Run]
    names: list[str]
    keys: list[str]
    rows: list[Row]
    paper: tuple[PaperResult, ...] = ()

    @classmethod
    def of(cls, runs: Sequence[Run], paper: Sequence[PaperResult] = ()) -> Report:
        runs = list(runs)
        names = run_names(runs)
        rows = [Row.of([runs[i] for i in group], [names[i] for i in group]) for group in seed_groups(runs)]
        return cls(runs, names, differing_override_keys([r.overrides for r in runs]), rows, tuple(paper))

    @property
    def columns(self) -> tuple:
        """The metric columns: the export columns too when some run was exported."""
        return METRIC_COLUMNS + (EXPORT_COLUMNS if any(run.export for run in self.runs) else ())

    @property
    def grouped(self) -> bool:
        """Whether some row holds several seeds: the table then has an `n` column and stds."""
        return any(len(row.runs) > 1 for row in self.rows)

    def label(self, index: int) -> str:
        """Row `index`'s point label: its differing overrides, or its name when nothing differs."""
        row = self.rows[index]
        short = short_key_names(self.keys)
        parts = [f"{short[k]}={row.overrides.get(k, '-')}" for k in self.keys]
        return ", ".join(parts) if parts else row.name

    def points(self, cost: str) -> list[tuple[float, float]]:
        """Per row (mean Rel. BOPs % of `cost`, mean final accuracy %), nan where missing."""
        return [(row.mean(f"{cost}_rel_bops_pct"), row.mean("final_accuracy_pct")) for row in self.rows]

    def fronts(self) -> dict[str, list[int]]:
        """Per cost (structured, unstructured): the rows on its Pareto front, cheapest first."""
        return {cost: pareto_front(self.points(cost)) for cost in COSTS}

    def front_marks(self) -> list[str]:
        """Per row: "S" on the structured front, "U" on the unstructured one, "S+U" on both, "-" on none."""
        marks: list[list[str]] = [[] for _ in self.rows]
        for cost, front in self.fronts().items():
            for index in front:
                marks[index].append(cost[0].upper())
        return ["+".join(mark) or "-" for mark in marks]

    def csv_columns(self) -> list[str]:
        metric_columns = []
        for column, _header, _fmt in self.columns:
            metric_columns.extend([column, f"{column}_std"] if self.grouped else [column])
        n = ["n"] if self.grouped else []
        return [
            "run",
            *self.keys,
            *n,
            *metric_columns,
            "epochs_completed",
            "epochs_planned",
            "status",
            "error",
            "front",
        ]

    def csv_rows(self) -> list[dict]:
        """One dict per row with raw numbers (means; inf stays inf, missing values are empty), then the paper's."""
        rows = []
        for row, front in zip(self.rows, self.front_marks()):
            line = {"run": row.name, **{k: row.overrides.get(k, "") for k in self.keys}}
            if self.grouped:
                line["n"] = len(row.runs)
            for column, _header, _fmt in self.columns:
                stat = row.stats[column]
                line[column] = "" if stat.mean is None else stat.mean
                if self.grouped:
                    line[f"{column}_std"] = "" if stat.std is None else stat.std
            line.update(
                epochs_completed=_joined([str(run.epochs_completed) for run in row.runs]),
                epochs_planned=_joined(["" if r.epochs_planned is None else str(r.epochs_planned) for r in row.runs]),
                status=row.status(),
                error=row.error(),
                front=front,
            )
            rows.append(line)
        for result in self.paper:
            line = {"run": f"paper: {result.label}", **paper_values(result), "status": "paper"}
            if self.grouped:
                line["n"] = PAPER_RUNS_PER_RESULT
            rows.append(line)
        return rows

    def table(self) -> tuple[list[str], list[list[str]]]:
        """Header and formatted cells of the human-readable table (rows, then the paper's results)."""
        n = ["n"] if self.grouped else []
        header = ["run", *self.keys, *n, *(h for _c, h, _f in self.columns), "epochs", "status", "front"]
        cells = []
        for row, front in zip(self.rows, self.front_marks()):
            count = [str(len(row.runs))] if self.grouped else []
            cells.append(
                [
                    row.name,
                    *(row.overrides.get(k, "-") for k in self.keys),
                    *count,
                    *(_format_stat(row.stats[column], fmt, len(row.runs)) for column, _h, fmt in self.columns),
                    row.epochs(),
                    row.status(),
                    front,
                ]
            )
        for result in self.paper:
            values = paper_values(result)
            count = [str(PAPER_RUNS_PER_RESULT)] if self.grouped else []
            cells.append(
                [
                    f"paper: {result.label}",
                    *("-" for _k in self.keys),
                    *count,
                    *(_format(values.get(column), fmt) for column, _h, fmt in self.columns),
                    "-",
                    "paper",
                    "-",
                ]
            )
        return header, cells


def paper_values(result: PaperResult) -> dict[str, float]:
    """A paper result in the report's columns: its accuracy, and its Rel. BOPs % (with the ratio, 100 / %)
    only in the columns of the counting convention it was measured by."""
    values = {"final_accuracy_pct": result.accuracy_pct}
    for cost in COSTS:
        if result.counts_as(cost):
            values[f"{cost}_rel_bops_pct"] = result.rel_bops_pct
            values[f"{cost}_bops_ratio"] = 100.0 / result.rel_bops_pct
    return values


def _format_stat(stat: Stat, fmt: str, runs: int) -> str:
    """`mean ± std`; the mean alone for one value; "[k]" when only k of the row's runs had the value."""
    text = _format(stat.mean, fmt)
    if stat.std is not None:
        text += f" ± {_format(stat.std, fmt)}"
    if runs > 1 and 0 < stat.count < runs:
        text += f" [{stat.count}]"
    return text


def _format(value: float | None, fmt: str) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if math.isnan(value):
        return "nan"
    return fmt.format(value)


# a number, optionally "± std" and "[count]"; epochs "done/planned" (several, comma-separated); "-"
_NUMBER = r"(-?[\d.]+x?|-?inf|nan)"
NUMBER_CELL = rf"{_NUMBER}( ± {_NUMBER})?( \[\d+\])?|[\d?]+/[\d?]+(,[\d?]+/[\d?]+)*|-"


def format_text_table(header: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell; text left-aligned, numbers right-aligned."""
    widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header))]

    def is_number(text: str) -> bool:
        return bool(re.fullmatch(NUMBER_CELL, text))

    numeric = [all(is_number(row[i]) for row in cells) for i in range(len(header))]
    lines = []
    for row in [header, *cells]:
        padded = [text.rjust(width) if num else text.ljust(width) for text, width, num in zip(row, widths, numeric)]
        lines.append("  ".join(padded).rstrip())
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def format_markdown(report: Report, plot_name: str | None) -> str:
    """report.md: the table (with each failed run's error), what its marks mean, and the plot below it."""
    header, cells = report.table()
    header = [*header, "error"]
    errors = [row.error() for row in report.rows] + ["" for _result in report.paper]
    cells = [[*cell, error.replace("|", "\\|")] for cell, error in zip(cells, errors)]
    lines = [f"# codeq report: {len(report.runs)} run(s)", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines.extend("| " + " | ".join(row) + " |" for row in cells)
    lines.append("")
    lines.append("Accuracies and sparsity in %; Rel. BOPs % = 100 / ratio vs the dense 32-bit model.")
    lines.append(
        "front: on the Pareto front of final accuracy vs structured (S) or unstructured (U) Rel. BOPs % "
        "(no other row is as accurate for as little compute); their overrides are in pareto_front.yaml."
    )
    if report.grouped:
        lines.append(
            "Runs that differ only in seed share a row: mean ± sample std (n - 1) over its n runs; "
            "[k] = only k of them logged the value."
        )
    if report.paper:
        lines.append(
            "paper: ResNet-20 / CIFAR-10, Wenshøj et al. 2025, Table 2 (mean of 3 runs); each Rel. BOPs % "
            "sits in the column of the convention it was counted by (in brackets)."
        )
    if plot_name:
        lines.extend(["", f"![accuracy vs Rel. BOPs]({plot_name})"])
    return "\n".join(lines) + "\n"


def write_csv(report: Report, path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=report.csv_columns())
        writer.writeheader()
        writer.writerows(report.csv_rows())


def write_front(report: Report, path: Path) -> None:
    """pareto_front.yaml: per cost, the non-dominated rows (cheapest first) with the overrides that made them."""
    fronts = {}
    for cost, front in report.fronts().items():
        entries = []
        for index in front:
            row = report.rows[index]
            entry = {"run": row.name, "n": len(row.runs)}
            for column in ("final_accuracy_pct", f"{cost}_rel_bops_pct"):
                entry[column] = row.stats[column].mean
                if row.stats[column].std is not None:
                    entry[f"{column}_std"] = row.stats[column].std
            entries.append({**entry, **row.front_overrides()})
        fronts[cost] = entries
    header = (
        "# The runs no other run beats: as accurate (final accuracy %) for as little compute (Rel. BOPs %),\n"
        "# per way of counting compute, cheapest first. Run one again: python -m codeq.main <overrides>\n"
        "# (a row of several seeds: python -m codeq.main -m <overrides> seed=<its seeds, comma-separated>)\n"
    )
    path.write_text(header + yaml.safe_dump(fronts, sort_keys=False, allow_unicode=True))


def plot_pareto(report: Report, path: Path) -> None:
    """report.png: `pareto_figure` of the report."""
    pareto_figure(report).savefig(path, dpi=120)


def pareto_figure(report: Report) -> Figure:
    """Accuracy % vs Rel. BOPs % (log x): structured and unstructured points, each kind's Pareto front.

    A row of several seeds is drawn at its means with error bars of ±1 std on both axes. Points without
    accuracy or with Rel. BOPs 0 % (every weight dead, ratio inf) have no place on a log axis and are left
    out with a log line. The paper's results are stars in the colour of the convention they were counted by.
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
        drawable = []
        for index, (bops, accuracy) in enumerate(report.points(kind)):
            if math.isnan(bops) or not math.isfinite(accuracy):
                continue
            if not (bops > 0 and math.isfinite(bops)):
                logger.warning(
                    "%s: %s Rel. BOPs %s %% cannot sit on the log axis, not drawn", report.rows[index].name, kind, bops
                )
                continue
            drawable.append(index)
        if not drawable:
            continue
        drawn += len(drawable)
        points = [report.points(kind)[i] for i in drawable]
        ax.scatter([p[0] for p in points], [p[1] for p in points], s=40, zorder=3, label=f"{kind} (runs)", **style)
        spreads = [
            (report.rows[i].stats[f"{kind}_rel_bops_pct"].std, report.rows[i].stats["final_accuracy_pct"].std)
            for i in drawable
        ]
        if any(x is not None or y is not None for x, y in spreads):
            ax.errorbar(
                [p[0] for p in points],
                [p[1] for p in points],
                xerr=[x or 0.0 for x, _ in spreads],
                yerr=[y or 0.0 for _, y in spreads],
                fmt="none",
                ecolor=style["color"],
                elinewidth=1,
                capsize=3,
                zorder=2,
                label=f"{kind}: ±1 std over seeds",
            )
        for (bops, accuracy), index in zip(points, drawable):
            ax.annotate(
                report.label(index),
                (bops, accuracy),
                xytext=(4, 4),
                textcoords="offset points",
                fontsize=7,
                color=style["color"],
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
    colours = {"structured": "tab:blue", "unstructured": "tab:orange", "dense": "black"}
    for counting, colour in colours.items():
        results = [result for result in report.paper if result.counting == counting]
        if results:
            ax.scatter(
                [r.rel_bops_pct for r in results],
                [r.accuracy_pct for r in results],
                marker="*",
                s=160,
                color=colour,
                edgecolors="black",
                linewidths=0.6,
                zorder=4,
                label=f"paper ResNet-20 / CIFAR-10, {counting} count",
            )
    by_cost = sorted(report.paper, key=lambda result: result.rel_bops_pct)
    for previous, result in zip([None, *by_cost], by_cost):
        # above the star when it is at least as accurate as the next cheaper one, else below: neighbours' labels part
        above = previous is not None and result.accuracy_pct >= previous.accuracy_pct
        offset = (4, 6) if above else (4, -10)
        ax.annotate(
            result.label,
            (result.rel_bops_pct, result.accuracy_pct),
            xytext=offset,
            textcoords="offset points",
            fontsize=7,
            color="black",
        )
    if drawn == 0 and not report.paper:
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
    return fig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m codeq.report",
        description=(
            "Summarise codeq runs: every dir below DIR holding metrics.jsonl or .hydra/config.yaml is "
            "a run (a single run dir, a sweep dir, or a folder of sweeps). Prints one row per run "
            "(the overrides that differ between runs, final/best accuracy, unstructured sparsity, mean "
            "bits, structured and unstructured Rel. BOPs % and ratio, epochs done/planned, status, and "
            "whether it is on a Pareto front) and writes report.csv, report.md, report.png (accuracy vs "
            "Rel. BOPs %, Pareto fronts) and pareto_front.yaml (the non-dominated runs' overrides). Runs "
            "whose overrides differ only in seed share one row: mean ± std over the seeds, and n."
        ),
        epilog=(
            "Unreadable runs and dirs without runs are reported in one line each on stderr; the other "
            "runs still report. Exit status: 0 when at least one run was reported; 1 when none was found "
            "or the report files could not be written."
        ),
    )
    parser.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="run dir, sweep dir or any folder above them")
    parser.add_argument(
        "--out", type=Path, metavar="DIR", help="where the report files go (default: into the first DIR)"
    )
    parser.add_argument(
        "--paper",
        action="store_true",
        help="add the CoDeQ paper's ResNet-20 / CIFAR-10 results (Table 2) to the table and "
        "the plot, each labelled by the convention its Rel. BOPs were counted by",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="codeq.report: %(message)s", stream=sys.stderr)
    runs = collect_runs(args.dirs)
    if not runs:
        return 1
    report = Report.of(runs, paper=PAPER_RESULTS if args.paper else ())
    print(format_text_table(*report.table()))
    for name, run in zip(report.names, report.runs):
        if run.error:
            print(f"{name}: {run.status}: {run.error}")

    out = args.out or args.dirs[0]
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_csv(report, out / "report.csv")
        plot_pareto(report, out / "report.png")
        (out / "report.md").write_text(format_markdown(report, "report.png"))
        write_front(report, out / "pareto_front.yaml")
    except OSError as exc:
        logger.error("cannot write the report into %s: %s", out, exc)
        return 1
    logger.info("wrote %s", ", ".join(str(out / name) for name in OUTPUT_NAMES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
