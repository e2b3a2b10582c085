"""Files from outside the run: CIFAR pickles are read without running code, torch.load always weights_only."""

import ast
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from test_cli import REPO, run_in_process
from test_data import cifar_pixels, write_cifar

from codeq.safepickle import UnsafePickleError, load_data_pickle


class RunsACommand:
    """What an attacker would put in a CIFAR batch: unpickling it calls os.system(command)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        import os

        return os.system, (self.command,)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_a_cifar_batch_round_trips_at_every_protocol(protocol, tmp_path):
    batch = {
        b"batch_label": b"training batch 1 of 5",
        b"data": cifar_pixels(3, 5).astype(np.uint8),
        b"labels": [0, 9, 4],
        b"scale": np.float64(0.5),
        b"shape": (3, 32, 32),
    }
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(batch, protocol=protocol))
    loaded = load_data_pickle(path)
    assert loaded.keys() == batch.keys()
    assert np.array_equal(loaded[b"data"], batch[b"data"]) and loaded[b"data"].dtype == np.uint8
    assert loaded[b"labels"] == [0, 9, 4] and loaded[b"scale"] == 0.5 and loaded[b"shape"] == (3, 32, 32)


def test_a_pickle_that_would_run_a_command_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": RunsACommand(f"touch {marker}")}, protocol=2))
    with pytest.raises(UnsafePickleError, match=r"posix\.system, which is not plain data"):
        load_data_pickle(path)
    assert not marker.exists()
    pickle.loads(path.read_bytes())  # the file is a real attack: plain pickle runs the command
    assert marker.exists()


def test_a_crafted_cifar_file_ends_the_run_with_one_line(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "pwned"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    write_cifar(
        tmp_path,
        "cifar-10-batches-py",
        {name: (cifar_pixels(2, 0).astype(np.uint8), [0, 1]) for name in names},
        b"labels",
        ("batches.meta", b"label_names"),
    )
    crafted = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    crafted.write_bytes(pickle.dumps({b"data": RunsACommand(f"touch {marker}"), b"labels": [0]}))
    run_dir = tmp_path / "run"
    code = run_in_process(
        "dataset=cifar10",
        f"dataset.root={tmp_path}",
        "trainer.device=cpu",
        "logger=none",
        f"hydra.run.dir={run_dir}",
        monkeypatch=monkeypatch,
    )
    stderr = capsys.readouterr().err
    assert code == 2 and "Traceback" not in stderr
    (line,) = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert str(crafted) in line and "not plain data" in line
    assert not marker.exists()
    assert json.loads((run_dir / "failed.json").read_text())["type"] == "UnsafePickleError"


def torch_load_calls(root: Path):
    """(file, line, the weights_only argument's source) of every torch.load(...) call under ``root``."""
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                flag = next((ast.unparse(k.value) for k in node.keywords if k.arg == "weights_only"), None)
                yield str(path.relative_to(root)), node.lineno, flag


def test_every_torch_load_in_the_package_is_weights_only():
    calls = list(torch_load_calls(REPO / "codeq"))
    assert calls, "the checkpoint reader calls torch.load"
    assert [call for call in calls if call[2] != "True"] == []
