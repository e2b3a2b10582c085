"""Bad-input fuzzing: bad overrides generated from the config tree and its schemas, each one rejected with
one `error:` line naming the key, exit code 2, no traceback and no file of a run in the run dir.

Every option of every group in conf/ is composed; for each key its schema declares, the cases are the
wrong types (a word, an empty list, a list for a scalar, a scalar for a list), nan/inf, a fraction for an
integer, negative/zero/too-large numbers where the schema's range excludes them, and an unknown option
for keys with choices. All of them go through Hydra's override parser and codeq's own check (fast); a
sample runs the real entry point in this process, one the real CLI; the slow test runs every case.
"""

import copy
import dataclasses
import typing
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from test_cli import REPO, run_cli, run_in_process

from codeq.errors import ConfigError
from codeq.main import RunKeys, check_config
from codeq.schema import Allowed, schema_of

CONF = REPO / "conf"
# groups whose options are whole runs or Hydra settings, not one node with a _target_
NOT_NODES = {"experiment", "hydra"}
# what a run rejected for bad input may leave in its dir: Hydra's record of the config, the log, the failure
ALLOWED_FILES = {
    "failed.json",
    "summary.json",
    "main.log",
    ".hydra/config.yaml",
    ".hydra/hydra.yaml",
    ".hydra/overrides.yaml",
}
MIN_CASES = 60


def config_groups() -> dict[str, list[str]]:
    """{group: options} of every config group under conf/ (whatever options other modules have added)."""
    groups = {}
    for folder in sorted(p for p in CONF.iterdir() if p.is_dir() and p.name not in NOT_NODES):
        options = sorted(p.stem for p in folder.glob("*.yaml"))
        if options:
            groups[folder.name] = options
    return groups


def bad_values(hint, limits: Allowed) -> list[str]:
    """Override texts of values that ``hint`` + ``limits`` exclude."""
    if typing.get_origin(hint) in (typing.Union, type(int | None)):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is list:
        cases = ["x"]
        item = typing.get_args(hint)[0]
        if item in (int, float):
            cases.append("[x]")
        if limits.length:
            cases.append("[" + ",".join(["1"] * (limits.length - 1)) + "]")
        if limits.minimum is not None and limits.length:
            cases.append("[" + ",".join([f"{limits.minimum - 1:g}"] * limits.length) + "]")
        return cases
    if limits.choices is not None:
        return ["no_such_option", "5", "[]"]
    if hint is bool:
        return ["x", "2", "[]"]
    if hint is str:
        return ["[]"]
    cases = ["x", "[]"]
    if hint is int:
        cases += ["nan", "1.5"]
    elif limits.finite:
        cases += ["nan", "inf"]
    for number in (-1, 0):
        if limits.minimum is not None and number < limits.minimum:
            cases.append(str(number))
    if limits.maximum is not None:
        cases.append(f"{limits.maximum + 1:g}")
    if limits.below is not None:
        cases.append(f"{limits.below:g}")
    return cases


def schema_cases(schema: type, prefix: str) -> list[str]:
    hints = typing.get_type_hints(schema)
    return [
        f"{prefix}{f.name}={text}"
        for f in dataclasses.fields(schema)
        for text in bad_values(hints[f.name], f.metadata.get("allowed", Allowed()))
    ]


def compose_options() -> dict[str, object]:
    """{"": the default config, "group=option": that config} for one option per schema (options sharing
    their ``_target_`` share its schema and its cases, so one of them is composed)."""
    targets = {}
    for group, options in config_groups().items():
        for option in options:
            target = OmegaConf.load(CONF / group / f"{option}.yaml").get("_target_")
            schema = schema_of(target) if isinstance(target, str) else None
            if schema is not None:
                targets.setdefault(schema, f"{group}={option}")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return {option: compose("config", overrides=[option] if option else []) for option in ["", *targets.values()]}


def generate_cases(configs) -> list[tuple[str, str]]:
    """[(group option override, bad override)] for the root keys and every key each option's schema declares."""
    cases = [("", case) for case in schema_cases(RunKeys, "")]
    for option in configs:
        if option:
            group = option.split("=")[0]
            node = configs[option][group]
            schema = schema_of(node["_target_"])
            cases += [
                (option, case) for case in schema_cases(schema, f"{group}.") if key_of(case).split(".")[1] in node
            ]
    return cases


def key_of(override: str) -> str:
    return override.split("=", 1)[0]


CONFIGS = compose_options()
CASES = generate_cases(CONFIGS)
IDS = [" ".join(filter(None, case)) for case in CASES]
# every 20th case through the real entry point in the fast suite (a fraction of a second each); all when slow
SAMPLE = CASES[::20]


def test_enough_cases_over_every_group():
    assert len(CASES) >= MIN_CASES
    groups = {key_of(case).split(".")[0] for _, case in CASES if "." in key_of(case)}
    assert {"trainer", "dataset", "quantizer", "sparsity", "schedule", "optimizer", "logger"} <= groups


def test_every_generated_override_is_rejected_naming_its_key():
    parser = OverridesParser.create()
    accepted = []
    for option, case in CASES:
        cfg = copy.deepcopy(CONFIGS[option])
        (override,) = parser.parse_overrides([case])
        OmegaConf.update(cfg, key_of(case), override.value(), merge=False)
        try:
            check_config(cfg, RunKeys)
        except ConfigError as exc:
            message = str(exc)
            assert message.startswith(f"{key_of(case)} must be "), (case, message)
            assert "\n" not in message and ", got " in message, (case, message)
            continue
        accepted.append(case)
    assert accepted == []


def files_in(run_dir: Path) -> set[str]:
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()}


def assert_rejected_by_the_entry_point(option, case, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    overrides = [option] if option else []
    code = run_in_process(
        "trainer.device=cpu", "logger=none", *overrides, case, f"hydra.run.dir={run_dir}", monkeypatch=monkeypatch
    )
    stderr = capsys.readouterr().err
    assert code == 2, (case, stderr)
    assert "Traceback" not in stderr
    (line,) = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: {key_of(case)} must be "), line
    assert files_in(run_dir) <= ALLOWED_FILES, files_in(run_dir)


@pytest.mark.parametrize("option, case", SAMPLE, ids=IDS[::20])
def test_a_sample_through_the_entry_point(option, case, tmp_path, monkeypatch, capsys):
    assert_rejected_by_the_entry_point(option, case, tmp_path, monkeypatch, capsys)


@pytest.mark.slow
@pytest.mark.parametrize("option, case", CASES, ids=IDS)
def test_every_case_through_the_entry_point(option, case, tmp_path, monkeypatch, capsys):
    assert_rejected_by_the_entry_point(option, case, tmp_path, monkeypatch, capsys)


def test_the_cases_that_crashed_the_error_path_through_the_real_cli(tmp_path):
    """trainer.epochs=[] once crashed writing summary.json; now: one line, exit 2, the failure recorded."""
    proc = run_cli("trainer.epochs=[]", "trainer.device=cpu", "logger=none", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: trainer.epochs must be an integer >= 1, got []"]
    assert files_in(tmp_path) <= ALLOWED_FILES
