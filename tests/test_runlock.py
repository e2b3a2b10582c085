"""Two processes, one run dir: the second ends at once naming the holder; a SIGKILLed holder leaves no stale lock."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
from test_cli import TINY, run_in_process
from test_reliability import error_lines, start_cli, wait_for_rows

from codeq.rundir import read_metrics
from codeq.runlock import LOCK_FILE, RunDirBusy, RunDirLock

LONG_RUN = [*TINY, "trainer.epochs=6", "trainer.viz_interval=100", "logger=none"]


def hold_lock(run_dir):
    """A child process that takes the lock, says so on stdout, and sleeps until killed."""
    code = (
        f"import sys, time; from codeq.runlock import RunDirLock; RunDirLock({str(run_dir)!r}).acquire(); "
        "print('locked', flush=True); time.sleep(600)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    return child


def test_the_lock_names_its_holder_and_dies_with_it(tmp_path):
    child = hold_lock(tmp_path)
    with pytest.raises(RunDirBusy) as busy:
        RunDirLock(tmp_path).acquire()
    assert f"pid {child.pid} on host {socket.gethostname()}" in str(busy.value) and str(tmp_path) in str(busy.value)
    child.send_signal(signal.SIGKILL)
    child.wait()
    with RunDirLock(tmp_path):  # the kernel released the dead holder's lock; its file is simply reused
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_FILE).exists()  # a clean exit leaves nothing behind


@pytest.mark.slow  # ~20 s: a CLI subprocess start plus a resumed run
def test_a_second_run_on_a_busy_dir_stops_at_once_and_a_third_resumes_after_sigkill(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    first = start_cli(*LONG_RUN, f"hydra.run.dir={run_dir}")
    wait_for_rows(first, run_dir, 1)
    rows_before = read_metrics(run_dir / "metrics.jsonl")

    capsys.readouterr()
    code = run_in_process(*LONG_RUN, "trainer.resume=true", f"hydra.run.dir={run_dir}", monkeypatch=monkeypatch)
    stderr = capsys.readouterr().err
    assert code == 1 and "Traceback" not in stderr
    (line,) = error_lines(stderr)
    assert f"pid {first.pid} on host {socket.gethostname()}" in line and str(run_dir) in line
    # the second process wrote nothing: the first's rows and summary are its own
    assert read_metrics(run_dir / "metrics.jsonl")[: len(rows_before)] == rows_before
    assert not (run_dir / "failed.json").exists()
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "running"

    assert first.poll() is None, "the first run must still be running when it is killed"
    first.send_signal(signal.SIGKILL)
    first.communicate()
    code = run_in_process(*LONG_RUN, "trainer.resume=true", f"hydra.run.dir={run_dir}", monkeypatch=monkeypatch)
    assert code == 0
    assert [row["epoch"] for row in read_metrics(run_dir / "metrics.jsonl")] == list(range(6))
    assert not (run_dir / LOCK_FILE).exists()
