"""hydra/launcher=joblib for codeq: parallel jobs, each in a worker process of its own.

(Hydra accepts launchers only from the ``hydra_plugins`` package, hence this module's place.)

Hydra's joblib launcher runs a sweep in one shared loky pool. When the OS kills one worker (SIGKILL, the
out-of-memory killer) the pool is broken: loky ends the other workers, queued jobs never start, and the
sweep stops with a traceback. Here every job gets its own one-worker executor (``n_jobs`` of them at a
time), so a killed job fails alone with one line, the others finish, and re-running the same command with
trainer.resume=true continues the killed job from its last.pt.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra_plugins.hydra_joblib_launcher._core import execute_job
from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher
from joblib.externals.loky.process_executor import ProcessPoolExecutor, TerminatedWorkerError

from codeq.errors import JobFailed

log = logging.getLogger(__name__)


class IsolatedJoblibLauncher(JoblibLauncher):
    """JoblibLauncher with one worker process per job: a job killed by the OS cannot take the others with it."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        workers = parallel_jobs(self.joblib.get("n_jobs", -1), len(job_overrides))
        log.info(
            "Launching %d jobs, %d at a time, each in its own process; sweep dir: %s",
            len(job_overrides),
            workers,
            sweep_dir,
        )
        for idx, overrides in enumerate(job_overrides):
            log.info("\t#%d : %s", initial_job_idx + idx, " ".join(filter_overrides(overrides)))
        state = Singleton.get_state()

        def run(idx: int, overrides: Sequence[str]) -> JobReturn:
            executor = ProcessPoolExecutor(max_workers=1)
            try:
                job = executor.submit(
                    execute_job, idx, overrides, self.hydra_context, self.config, self.task_function, state
                )
                return job.result()
            except TerminatedWorkerError as exc:
                codes = re.search(r"exit codes of the workers are \{(.*?)\}", str(exc))
                return JobReturn(
                    overrides=list(overrides),
                    status=JobStatus.FAILED,
                    _return_value=JobFailed(
                        f"error: job #{idx} was killed (worker exit code {codes.group(1) if codes else 'unknown'}); "
                        f"its dir in {sweep_dir} keeps what it wrote; re-run the same multirun command with "
                        "trainer.resume=true to finish it"
                    ),
                )
            finally:
                executor.shutdown(wait=True)

        with ThreadPoolExecutor(workers) as pool:
            indices = range(initial_job_idx, initial_job_idx + len(job_overrides))
            return list(pool.map(run, indices, job_overrides))


def parallel_jobs(n_jobs: int | None, jobs: int) -> int:
    """joblib's n_jobs convention: -1 = every CPU, -2 = all but one, …; never more workers than jobs."""
    cpus = os.cpu_count() or 1
    wanted = cpus if n_jobs is None else n_jobs if n_jobs > 0 else max(1, cpus + 1 + n_jobs)
    return max(1, min(wanted, jobs))
