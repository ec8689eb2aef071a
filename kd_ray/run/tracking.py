"""A run's figures, as the driver follows them, sent to TensorBoard and MLflow (the `logging:` section).

    TensorBoard   event files under RUN_DIR/tensorboard (tensorboardX, which Ray Train brings: on by
                  default). Each (re)start writes the run's history again from metrics.jsonl, hiding
                  every earlier event: the events hold what metrics.jsonl holds, even the records a
                  killed driver never received.
    MLflow        one MLflow run per kd_ray run (its id kept in RUN_DIR/mlflow.json, so a resumed run
                  goes on in the same one): the job spec flattened as params, every record's figures
                  as metrics, and at the end the exported student, summary.json and report.png as
                  artifacts. Needs the `observe` extra (or mlflow-skinny).

The names of the figures are kd_ray.run.metrics.scalars'. A tracker that fails (a server that
went away) says so once and is dropped: it never stops the run.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Any, Callable

from kd_ray.core import storage
from kd_ray.core.errors import UserError, clip, reason
from kd_ray.core.network import unanswered, url_endpoint
from kd_ray.run.metrics import as_record, read_metrics, scalars
from kd_ray.spec import JobSpec

TENSORBOARD = "tensorboard"
MLFLOW_RUN = "mlflow.json"


# How long an MLflow server has to answer: at validate, and for each request of a run (MLflow's
# own default retries a server that went away for minutes, holding the driver's progress).
MLFLOW_SECONDS = 10
MLFLOW_REQUESTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                   "MLFLOW_HTTP_REQUEST_TIMEOUT": str(MLFLOW_SECONDS)}


def check_logging(spec: JobSpec) -> None:
    """Asked-for trackers that are not installed, or a tracking server nobody answers at: the
    usual one-line error, before Ray starts."""
    if spec.logging.mlflow is not None:
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise UserError("logging.mlflow", "needs MLflow, which is not installed: pip install 'kd_ray[observe]' "
                            "(or mlflow-skinny), or remove logging.mlflow") from None
        uri = spec.logging.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
        endpoint = url_endpoint(uri)
        why = unanswered(*endpoint, MLFLOW_SECONDS) if endpoint else None
        if why:
            raise UserError("logging.mlflow.tracking_uri", f"nothing answers at {clip(uri, 200)} ({why}); start the MLflow "
                            "server or fix the URI (or MLFLOW_TRACKING_URI), or remove logging.mlflow")


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """A nested dict as dotted keys -> strings (MLflow params), lists kept whole."""
    if isinstance(tree, dict) and tree:
        out: dict[str, str] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): json.dumps(tree) if isinstance(tree, (list, dict)) else str(tree)}


def _history(records: list[dict], start: dict) -> list[dict] | None:
    """The records before a (re)start in metrics.jsonl, or None if the file does not hold that start."""
    for i in range(len(records) - 1, -1, -1):
        r = records[i]
        if r.get("kind") == "start" and r.get("step") == start["step"] and r.get("time") == start.get("time"):
            return records[:i]
    return None


class TensorBoard:
    def __init__(self, run_dir: str):
        # Event files are appended to as the run goes, which object storage cannot do: on a
        # bucket they are written locally and copied to RUN_DIR/tensorboard when the run ends.
        self.run_dir, self.dest = run_dir, storage.join(run_dir, TENSORBOARD)
        self.local = tempfile.mkdtemp(prefix="kd_ray_tb_") if storage.is_remote(run_dir) else None
        self.logdir = self.local or self.dest
        self.writer, self.writers = None, 0

    def record(self, record: dict) -> None:
        from tensorboardX import SummaryWriter

        if record["kind"] == "start" or self.writer is None:
            if self.writer is not None:
                self.writer.close()
            # The progress board writes each record to metrics.jsonl before the trainer's next
            # checkpoint (kd_ray.run.metrics); the driver polls it twice a second, and a driver
            # killed in between never sent the last ones here. So a (re)start hides every earlier
            # event (purge from step 0) and writes the records metrics.jsonl keeps before it again.
            # Without that history in the file, only the events past this start's step are hidden.
            history = self._history(record) if record["kind"] == "start" else None
            purge = 0 if history is not None else record["step"] + 1 if record["kind"] == "start" else None
            # A file per attempt, named apart (a file is named by the second it was opened in).
            self.writers += 1
            self.writer = SummaryWriter(self.logdir, purge_step=purge, filename_suffix=f".{os.getpid()}.{self.writers:04d}")
            for past in history or []:
                self._add(past)
        self._add(record)
        self.writer.flush()

    def _history(self, start: dict) -> list[dict] | None:
        try:
            return _history(read_metrics(self.run_dir), start)
        except OSError:  # metrics.jsonl unreadable for now: the events past this start's step are hidden
            return None

    def _add(self, record: dict) -> None:
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, global_step=record["step"], walltime=record.get("time"))

    def close(self, summary: dict) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.local is not None:
            storage.copy_out(self.local, self.dest)
            shutil.rmtree(self.local, ignore_errors=True)


class MLflow:
    def __init__(self, spec: JobSpec):
        from mlflow.tracking import MlflowClient

        uri = spec.logging.mlflow.tracking_uri
        if uri and (uri.startswith("file:") or ":" not in uri):
            # A directory as the tracking store: MLflow 3 keeps it working only on request.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        for name, value in MLFLOW_REQUESTS.items():  # a value the user set is kept
            os.environ.setdefault(name, value)
        self.client = MlflowClient(uri)
        self.run_id = self._run(spec)

    def _run(self, spec: JobSpec) -> str:
        """The MLflow run of this kd_ray run: the one a resumed run began, or a new one."""
        kept = storage.join(spec.run_dir, MLFLOW_RUN)
        if storage.exists(kept):
            run_id = json.loads(storage.read_bytes(kept))["run_id"]
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        name = spec.logging.mlflow.experiment
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        run_id = self.client.create_run(experiment_id, run_name=spec.run.name, tags={"kd_ray.task": spec.task}).info.run_id
        from mlflow.entities import Param

        params = [Param(k, v[:6000]) for k, v in flatten(spec.model_dump(mode="json", exclude={"job_dir"})).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(run_id, params=params[i:i + 100])
        storage.write_bytes(kept, json.dumps({"run_id": run_id, "experiment_id": experiment_id,
                                              "tracking_uri": spec.logging.mlflow.tracking_uri}).encode())
        return run_id

    def record(self, record: dict) -> None:
        from mlflow.entities import Metric

        stamp = int(1000 * record.get("time", time.time()))
        metrics = [Metric(name, value, stamp, record["step"]) for name, value in scalars(record).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, summary: dict) -> None:
        run_dir = summary["run_dir"]
        for name in ("summary.json", "report.png", "student.json", "student.safetensors"):
            if storage.exists(storage.join(run_dir, name)):
                with storage.local_copy(storage.join(run_dir, name)) as local:
                    self.client.log_artifact(self.run_id, local, artifact_path="student" if "student" in name else None)
        if storage.is_dir(storage.join(run_dir, "student")):  # a language model's Hugging Face directory
            with storage.local_copy(storage.join(run_dir, "student")) as local:
                self.client.log_artifacts(self.run_id, local, artifact_path="student/hf")
        status = {"finished": "FINISHED", "stopped": "KILLED"}.get(summary.get("status"), "FAILED")
        self.client.set_terminated(self.run_id, status=status)


class Trackers:
    """The trackers a job asks for, fed each recorded event by the driver."""

    def __init__(self, spec: JobSpec, echo: Callable[[str], None]):
        self.echo = echo
        self.items: list = []
        if spec.logging.tensorboard:
            self._add("tensorboard", lambda: TensorBoard(spec.run_dir))
        if spec.logging.mlflow is not None:
            self._add("mlflow", lambda: MLflow(spec))

    def _add(self, name: str, make) -> None:
        try:
            self.items.append((name, make()))
        except Exception as e:
            self.echo(f"warning: {name}: {reason(e)}; the run goes on without it")

    def _each(self, method: str, arg) -> None:
        for name, tracker in list(self.items):
            try:
                getattr(tracker, method)(arg)
            except Exception as e:
                self.items.remove((name, tracker))
                self.echo(f"warning: {name}: {reason(e)}; the run goes on without it")

    def record(self, event: dict) -> None:
        record = as_record(event)
        if record is not None:
            self._each("record", record)

    def close(self, summary: dict) -> None:
        self._each("close", summary)
