"""Training metrics for Prometheus: a Lightning callback in the NeMo trainer, served by global rank 0 on port 9401.

finetune.py adds ``TrainingMetricsCallback`` to the trainer's callbacks (a nemo_run ``Config``; ``fdl.build`` makes
it). On global rank 0 it starts an HTTP server on ``0.0.0.0:PORT`` (``/metrics``, text exposition format 0.0.4)
when the fit begins and updates the gauges at every training step and after every validation; on every other rank
it does nothing. The training pods' PodMonitor scrapes the container port named ``metrics`` (= PORT). NeMo's own
logging (console, TensorBoard, the progress bar) is untouched: the callback only reads what NeMo already logged.

Metrics (alerts and dashboards use exactly these names; every one is a gauge with the single label ``run_id``,
run.json's run id; a series appears once it has a value):

    nemo_training_loss                          last reduced training loss: token-mean cross-entropy over the
                                                global batch (NeMo's ``reduced_train_loss``)
    nemo_validation_loss                        loss of the last validation run, mean over its batches (``val_loss``)
    nemo_throughput_tokens_per_sec              global tokens per second of the last step:
                                                global_batch_size x seq_length / step time (all ranks together;
                                                counts sequence capacity, i.e. padding included, as the sizing plan)
    nemo_step_time_seconds                      wall time of the last training step (NeMo's TimingCallback value
                                                ``train_step_timing in s``; the callback's own clock without it)
    nemo_training_step                          trainer.global_step: optimizer steps completed (restored on resume)
    nemo_training_steps_total                   trainer.max_steps (a gauge despite the suffix: a fixed target)
    nemo_training_running                       1 while the fit loop runs; 0 once it ended or failed
    nemo_training_last_step_timestamp_seconds   Unix time the last step ended: ``time() - x`` finds a stalled run

Where the values come from (nemo_toolkit 2.7.3, Lightning 2.4):

- ``nemo/lightning/pytorch/strategies/megatron_strategy.py`` (``MegatronStrategy.training_step``) logs
  ``reduced_train_loss`` every step (unless ``NEMO_LOG_TRAIN_LOSS=0``, which leaves the training loss unset). The
  value is ``MaskedTokenLossReduction.reduce`` (``nemo/lightning/megatron_parallel.py``): summed over the
  micro-batches and all-reduced over the data- (and context-) parallel group, so it is the global-batch loss.
  With pipeline parallelism only the last stage computes it; ``_sync_from_last_pipeline_stage(loss,
  broadcast=False)`` (``nemo/lightning/_strategy_lib.py``) sends it point-to-point from the last stage to global
  rank 0, the first stage of its pipeline group. Global rank 0 therefore holds the real loss for any TP/PP/CP/DP
  layout, which is why it alone serves (other ranks log 0.0 with PP > 1; no extra collective is needed).
- ``MegatronStrategy.validation_step`` logs ``val_loss`` with ``on_epoch=True`` (with PP > 1 synced over the
  pipeline group and scaled by its size), so after a validation run every rank, rank 0 included, has the mean.
- ``nemo/utils/exp_manager.py`` ``TimingCallback`` (in ``default_finetune_trainer``'s callbacks, ahead of ours)
  logs ``train_step_timing in s`` from its on_train_batch_start to its on_train_batch_end.
- Reading ``trainer.callback_metrics`` (lightning/pytorch/trainer/connectors/logger_connector) inside
  on_train_batch_end returns the step's cached values (no collective, so rank 0 may read alone); in
  on_validation_end the epoch values were already computed and synced by the evaluation loop on all ranks.
  Turning the CUDA loss into a float waits for the step's kernels once per step, on rank 0 only, after the
  optimizer step (which already synchronises for the gradient norm).

The exporter never fails the run: a port that cannot be bound or an update that raises is reported once on
stderr and training goes on. It is also left out of the checkpoints' trainer context (``leave_out_of_checkpoints``).

prometheus_client renders the metrics when it is importable (it is in .venv-nemo, through leptonai); without it a
few lines of the standard library do (the same format), so a training pod never fails for want of it. The HTTP
server is the standard library's in both cases.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

try:  # NeMo 2 trains with lightning.pytorch; the main test environment has no torch and drives the hooks with fakes
    from lightning.pytorch import Callback as _CallbackBase
except ImportError:  # pragma: no cover - depends on the environment
    _CallbackBase = object

PORT = 9401
LABEL = "run_id"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

TRAINING_LOSS = "nemo_training_loss"
VALIDATION_LOSS = "nemo_validation_loss"
THROUGHPUT = "nemo_throughput_tokens_per_sec"
STEP_TIME = "nemo_step_time_seconds"
TRAINING_STEP = "nemo_training_step"
STEPS_TOTAL = "nemo_training_steps_total"
RUNNING = "nemo_training_running"
LAST_STEP_TIME = "nemo_training_last_step_timestamp_seconds"

METRICS: dict[str, str] = {  # name -> help text, in exposition order; all gauges labelled run_id
    TRAINING_LOSS: "Last reduced training loss (NeMo reduced_train_loss): token-mean cross-entropy, global batch.",
    VALIDATION_LOSS: "Loss of the last validation run (NeMo val_loss).",
    THROUGHPUT: "Global tokens per second of the last step: global_batch_size x seq_length / step time.",
    STEP_TIME: "Wall time of the last training step in seconds.",
    TRAINING_STEP: "Optimizer steps completed (trainer.global_step).",
    STEPS_TOTAL: "Steps the run trains for (trainer.max_steps).",
    RUNNING: "1 while the fit loop runs, 0 once it ended or failed.",
    LAST_STEP_TIME: "Unix time the last training step ended.",
}

# What NeMo logs (see the module docstring)
NEMO_TRAIN_LOSS = "reduced_train_loss"
NEMO_VAL_LOSS = "val_loss"
NEMO_STEP_TIMING = "train_step_timing in s"


# --------------------------------------------------------------------------------------------------
# From logged metrics to gauge values (plain functions: no torch, no Lightning)


def scalar(value: Any) -> float | None:
    """A logged value (0-d tensor or number) as a float; None for what is missing or not a single number."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)  # a 0-d (CUDA) tensor converts too
    except (TypeError, ValueError, RuntimeError):
        return None


def step_values(logged: Mapping[str, Any], *, global_step: int, global_batch_size: int, seq_length: int,
                measured_seconds: float | None = None, now: float | None = None) -> dict[str, float]:
    """The gauges after a training step, from the trainer's callback metrics. The step time is NeMo's timing when
    logged, else ``measured_seconds``; throughput needs a positive step time. A NaN loss is kept (it is news)."""
    values = {TRAINING_STEP: float(global_step), LAST_STEP_TIME: time.time() if now is None else now}
    loss = scalar(logged.get(NEMO_TRAIN_LOSS))
    if loss is not None:
        values[TRAINING_LOSS] = loss
    seconds = scalar(logged.get(NEMO_STEP_TIMING))
    if seconds is None or not seconds > 0:
        seconds = measured_seconds
    if seconds is not None and math.isfinite(seconds) and seconds > 0:
        values[STEP_TIME] = seconds
        values[THROUGHPUT] = global_batch_size * seq_length / seconds
    return values


def validation_values(logged: Mapping[str, Any]) -> dict[str, float]:
    loss = scalar(logged.get(NEMO_VAL_LOSS))
    return {} if loss is None else {VALIDATION_LOSS: loss}


# --------------------------------------------------------------------------------------------------
# The gauges and their exposition


def _sample_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _label_value(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


class Gauges:
    """The run's gauges. ``backend``: "prometheus_client", "stdlib" or None (prometheus_client when importable)."""

    def __init__(self, run_id: str, backend: str | None = None):
        self.run_id = str(run_id)
        self._values: dict[str, float] = {}
        self._lock = threading.Lock()
        self._registry = None
        if backend not in (None, "prometheus_client", "stdlib"):
            raise ValueError(f"backend {backend!r}: expected 'prometheus_client', 'stdlib' or None")
        if backend != "stdlib":
            try:
                import prometheus_client
            except ImportError:
                if backend == "prometheus_client":
                    raise
            else:
                # a registry of our own: a second Gauges in the process (tests) must not collide in the global one
                self._registry = prometheus_client.CollectorRegistry(auto_describe=True)
                self._gauges = {name: prometheus_client.Gauge(name, help_text, [LABEL], registry=self._registry)
                                for name, help_text in METRICS.items()}
                self._generate = prometheus_client.generate_latest
        self.backend = "stdlib" if self._registry is None else "prometheus_client"

    def update(self, values: Mapping[str, float]) -> None:
        unknown = set(values) - set(METRICS)
        if unknown:
            raise KeyError(f"not training metrics: {sorted(unknown)}")
        with self._lock:
            for name, value in values.items():
                self._values[name] = float(value)
                if self._registry is not None:
                    self._gauges[name].labels(self.run_id).set(float(value))

    def values(self) -> dict[str, float]:
        with self._lock:
            return dict(self._values)

    def render(self) -> bytes:
        """The text exposition format 0.0.4."""
        if self._registry is not None:
            return self._generate(self._registry)
        with self._lock:
            values = dict(self._values)
        lines = []
        for name, help_text in METRICS.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
            if name in values:
                lines.append(f'{name}{{{LABEL}="{_label_value(self.run_id)}"}} {_sample_value(values[name])}')
        return ("\n".join(lines) + "\n").encode("utf-8")


def serve(gauges: Gauges, port: int = PORT, host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """Serve ``gauges`` at http://host:port/metrics from a daemon thread; ``port=0`` picks a free port
    (``server.server_address[1]``). Raises OSError when the port cannot be bound."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path.split("?", 1)[0] not in ("/metrics", "/"):
                self.send_error(404)
                return
            body = gauges.render()
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:  # a scrape every 30 s would flood the training log
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="training-metrics", daemon=True).start()
    return server


# --------------------------------------------------------------------------------------------------
# The Lightning callback


def leave_out_of_checkpoints(trainer: Any) -> None:
    """Drop this module's callbacks from the trainer's ``__io__``, the configuration NeMo writes into every
    checkpoint's context (io.json; nemo/lightning/pytorch/trainer.py ``Trainer.io_init`` deep-copies the callbacks
    into it, nemo/lightning/io/pl.py ``TrainerContext.io_dump`` writes it) and rebuilds trainers from. The exporter is
    a side channel of this process, not part of how the model trains, and a context naming ``training_metrics``
    could not be loaded whole where this module is not importable: ``nemo.lightning.io.load`` looks up every
    object's class (``pydoc.locate``) and ``RestrictedUnpickler`` refuses classes outside nemo, lightning, torch and
    a few more. Subpath loads (``subpath="model"``: export_ckpt, merge_lora) never read the trainer either way."""
    io = getattr(trainer, "__io__", None)
    callbacks = getattr(io, "callbacks", None) if io is not None else None
    if isinstance(callbacks, (list, tuple)):
        io.callbacks = [c for c in callbacks if not isinstance(c, TrainingMetricsCallback)]


class TrainingMetricsCallback(_CallbackBase):
    """Exports the training metrics (module docstring) from global rank 0; a no-op on every other rank.

    ``global_batch_size`` and ``seq_length`` are the run's (finetune.py passes run.json's): the throughput is
    computed from them because Megatron's hooks see a dataloader iterator, not the batch."""

    def __init__(self, run_id: str, global_batch_size: int, seq_length: int, port: int = PORT,
                 host: str = "0.0.0.0", backend: str | None = None):
        super().__init__()
        self._configure(run_id, global_batch_size, seq_length, port, host, backend)

    def _configure(self, run_id: str, global_batch_size: int, seq_length: int, port: int, host: str,
                   backend: str | None) -> None:
        self.run_id = run_id
        self.global_batch_size = int(global_batch_size)
        self.seq_length = int(seq_length)
        self.port = port
        self.host = host
        self.backend = backend
        self.gauges: Gauges | None = None  # set on global rank 0 once serving
        self.server: ThreadingHTTPServer | None = None
        self._step_started: float | None = None
        self._warned = False

    @property
    def serving(self) -> bool:
        return self.server is not None

    @property
    def bound_port(self) -> int | None:
        return None if self.server is None else self.server.server_address[1]

    def _update(self, values: Mapping[str, float]) -> None:
        if self.gauges is not None and values:
            self.gauges.update(values)

    # -- Lightning hooks (lightning.pytorch.Callback signatures)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Once the ranks are known (distributed init is done before Lightning calls setup), before any checkpoint."""
        leave_out_of_checkpoints(trainer)
        if stage != "fit" or self.server is not None or not trainer.is_global_zero:
            return
        gauges = Gauges(self.run_id, self.backend)
        try:
            self.server = serve(gauges, self.port, self.host)
        except OSError as exc:
            print(f"training metrics: cannot serve on port {self.port}: {exc}; training continues without them",
                  file=sys.stderr, flush=True)
            return
        self.gauges = gauges
        max_steps = getattr(trainer, "max_steps", None)
        self._update({RUNNING: 0.0, **({STEPS_TOTAL: float(max_steps)} if max_steps and max_steps > 0 else {})})
        print(f"training metrics: serving on {self.host}:{self.bound_port}/metrics ({gauges.backend})", flush=True)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._update({RUNNING: 1.0, TRAINING_STEP: float(trainer.global_step)})  # a resumed run starts past 0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.gauges is not None:
            self._step_started = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.gauges is None:
            return
        measured = None if self._step_started is None else time.perf_counter() - self._step_started
        self._step_started = None
        self._guarded(lambda: step_values(trainer.callback_metrics, global_step=trainer.global_step,
                                          global_batch_size=self.global_batch_size, seq_length=self.seq_length,
                                          measured_seconds=measured))

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self.gauges is None or getattr(trainer, "sanity_checking", False):
            return  # the sanity check's couple of batches are not the model's validation loss
        self._guarded(lambda: validation_values(trainer.callback_metrics))

    def _guarded(self, values: Callable[[], Mapping[str, float]]) -> None:
        """Update from ``values()``; an error costs the metrics of this step, never the training run."""
        try:
            self._update(values())
        except Exception as exc:  # noqa: BLE001 - a days-long run must not die of its metrics
            if not self._warned:
                self._warned = True
                print(f"training metrics: update failed ({exc!r}); training continues", file=sys.stderr, flush=True)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._update({RUNNING: 0.0})

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._update({RUNNING: 0.0})

    # -- copies

    def __deepcopy__(self, memo: dict) -> TrainingMetricsCallback:
        """The configuration without the server (nemo.lightning.Trainer deep-copies its callbacks into ``__io__``).
        Made without calling ``__init__``, which NeMo's ``track_io`` may have wrapped to record a config."""
        copied = type(self).__new__(type(self))
        copied._configure(self.run_id, self.global_batch_size, self.seq_length, self.port, self.host, self.backend)
        return copied

    # The server keeps serving the final values until the process exits (rank 0 still writes the training marker).

    def close(self) -> None:
        """Stop serving (tests; the pod's process simply exits)."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        self.gauges = None
