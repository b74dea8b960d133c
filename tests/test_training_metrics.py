"""The training metrics exporter (workloads/entrypoints/training_metrics.py), scraped in-process over HTTP.

No torch or Lightning here: the callback's hooks are driven by a stand-in trainer holding what NeMo logs (plain
floats in ``callback_metrics``); tests/nemo/test_training_metrics_nemo.py repeats this with the real NeMo objects
and a real Lightning fit. Servers bind 127.0.0.1 on a free port, never 9401.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import re
import socket
import sys
import types
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ENTRYPOINTS = Path(__file__).resolve().parents[1] / "workloads" / "entrypoints"
sys.path.insert(0, str(ENTRYPOINTS))

import finetune  # noqa: E402
import training_metrics as tm  # noqa: E402

RUN_ID = "llama31-8b-lora-0123456789"
GBS, SEQ = 128, 4096
EXPECTED = {  # every one a gauge labelled run_id
    "nemo_training_loss", "nemo_validation_loss", "nemo_throughput_tokens_per_sec", "nemo_step_time_seconds",
    "nemo_training_step", "nemo_training_steps_total", "nemo_training_running",
    "nemo_training_last_step_timestamp_seconds",
}
BACKENDS = ["stdlib", pytest.param("prometheus_client", marks=pytest.mark.skipif(
    importlib.util.find_spec("prometheus_client") is None, reason="prometheus_client is not installed"))]


# --------------------------------------------------------------------------------------------------
# scraping


def parse(text: str) -> tuple[dict[str, str], dict[str, tuple[dict[str, str], float]]]:
    """(family types, samples name -> (labels, value)) of an exposition; prometheus_client's parser when present."""
    try:
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:
        types_, samples = {}, {}
        for line in text.splitlines():
            if m := re.fullmatch(r"# TYPE (\S+) (\S+)", line):
                types_[m.group(1)] = m.group(2)
            elif line and not line.startswith("#"):
                m = re.fullmatch(r'([a-zA-Z_:][\w:]*)\{(.*)\} (\S+)', line)
                assert m, f"not a sample line: {line!r}"
                labels = {k: re.sub(r"\\(.)", lambda e: "\n" if e.group(1) == "n" else e.group(1), v)
                          for k, v in re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2))}
                samples[m.group(1)] = (labels, float(m.group(3)))
        return types_, samples
    families = list(text_string_to_metric_families(text))
    samples = {}
    for family in families:
        for sample in family.samples:
            assert sample.name not in samples, f"{sample.name} has more than one series"
            samples[sample.name] = (dict(sample.labels), sample.value)
    return {f.name: f.type for f in families}, samples


def get(port: int, path: str = "/metrics") -> tuple[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return response.headers["Content-Type"], response.read().decode("utf-8")


def scrape(port: int) -> dict[str, float]:
    content_type, text = get(port)
    assert content_type.startswith("text/plain; version=0.0.4")
    types_, samples = parse(text)
    assert types_ == {name: "gauge" for name in tm.METRICS}  # every family is declared, typed gauge
    for name, (labels, _) in samples.items():
        assert labels == {"run_id": RUN_ID}, name
    return {name: value for name, (_, value) in samples.items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeTrainer:
    """What the callback reads of a Lightning trainer."""

    def __init__(self, rank: int = 0, max_steps: int = 1000):
        self.is_global_zero = rank == 0
        self.global_step = 0
        self.max_steps = max_steps
        self.sanity_checking = False
        self.callback_metrics: dict = {}


@pytest.fixture
def make_callback():
    made = []

    def make(backend=None, port=0, **kwargs):
        cb = tm.TrainingMetricsCallback(RUN_ID, GBS, SEQ, port=port, host="127.0.0.1", backend=backend, **kwargs)
        made.append(cb)
        return cb

    yield make
    for cb in made:
        cb.close()


# --------------------------------------------------------------------------------------------------
# names and values


def test_metric_names_are_the_documented_ones():
    assert set(tm.METRICS) == EXPECTED
    assert tm.PORT == 9401
    for name in tm.METRICS:  # the module docstring is the reference alerts and dashboards are written against
        assert re.search(rf"^\s+{name}\s", tm.__doc__, re.M), name
    for name in tm.METRICS:
        assert re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", name)


def test_step_values_from_what_nemo_logs():
    logged = {"reduced_train_loss": 1.75, "train_step_timing in s": 4.0, "global_step": 12.0, "lr": 1e-4}
    values = tm.step_values(logged, global_step=12, global_batch_size=GBS, seq_length=SEQ, measured_seconds=9.0,
                            now=1000.0)
    assert values == {"nemo_training_loss": 1.75, "nemo_step_time_seconds": 4.0,
                      "nemo_throughput_tokens_per_sec": GBS * SEQ / 4.0, "nemo_training_step": 12.0,
                      "nemo_training_last_step_timestamp_seconds": 1000.0}


def test_step_values_fall_back_to_the_measured_time():
    values = tm.step_values({"reduced_train_loss": 2.0}, global_step=3, global_batch_size=8, seq_length=1024,
                            measured_seconds=2.0)
    assert values["nemo_step_time_seconds"] == 2.0 and values["nemo_throughput_tokens_per_sec"] == 4096.0
    zero_timing = tm.step_values({"train_step_timing in s": 0.0}, global_step=3, global_batch_size=8, seq_length=1024,
                                 measured_seconds=0.5)
    assert zero_timing["nemo_step_time_seconds"] == 0.5


def test_step_values_leave_out_what_is_unknown():
    values = tm.step_values({}, global_step=0, global_batch_size=GBS, seq_length=SEQ)
    assert set(values) == {"nemo_training_step", "nemo_training_last_step_timestamp_seconds"}
    # NEMO_LOG_TRAIN_LOSS=0 or an unusable value: no loss rather than a made-up one
    assert "nemo_training_loss" not in tm.step_values({"reduced_train_loss": [1, 2]}, global_step=1,
                                                      global_batch_size=GBS, seq_length=SEQ)


def test_a_nan_loss_is_reported():
    values = tm.step_values({"reduced_train_loss": float("nan")}, global_step=1, global_batch_size=GBS, seq_length=SEQ)
    assert math.isnan(values["nemo_training_loss"])


def test_validation_values():
    assert tm.validation_values({"val_loss": 1.5, "reduced_train_loss": 1.2}) == {"nemo_validation_loss": 1.5}
    assert tm.validation_values({}) == {}


def test_unknown_gauges_are_refused():
    with pytest.raises(KeyError, match="not training metrics"):
        tm.Gauges(RUN_ID, "stdlib").update({"nemo_loss": 1.0})
    with pytest.raises(ValueError, match="backend"):
        tm.Gauges(RUN_ID, "statsd")


@pytest.mark.parametrize("backend", BACKENDS)
def test_both_renderers_agree(backend):
    gauges = tm.Gauges('run "7"\\x', backend)
    assert gauges.backend == backend
    gauges.update({"nemo_training_loss": 0.5, "nemo_training_step": 3, "nemo_validation_loss": float("inf")})
    types_, samples = parse(gauges.render().decode())
    assert types_ == {name: "gauge" for name in tm.METRICS}
    assert samples["nemo_training_loss"] == ({"run_id": 'run "7"\\x'}, 0.5)
    assert samples["nemo_training_step"][1] == 3.0 and samples["nemo_validation_loss"][1] == math.inf
    assert set(samples) == {"nemo_training_loss", "nemo_training_step", "nemo_validation_loss"}


# --------------------------------------------------------------------------------------------------
# the callback, scraped


@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_zero_serves_the_training_metrics(make_callback, backend):
    cb, trainer = make_callback(backend), FakeTrainer(max_steps=500)
    cb.setup(trainer, None, "fit")
    assert cb.serving and cb.gauges.backend == backend
    port = cb.bound_port
    assert scrape(port) == {"nemo_training_running": 0.0, "nemo_training_steps_total": 500.0}

    trainer.global_step = 40  # resumed from a checkpoint at step 40
    cb.on_train_start(trainer, None)
    assert scrape(port)["nemo_training_step"] == 40.0 and scrape(port)["nemo_training_running"] == 1.0

    cb.on_train_batch_start(trainer, None, None, 0)
    trainer.global_step = 41
    trainer.callback_metrics = {"reduced_train_loss": 1.25, "train_step_timing in s": 2.0}
    cb.on_train_batch_end(trainer, None, None, None, 0)
    metrics = scrape(port)
    assert metrics["nemo_training_loss"] == 1.25
    assert metrics["nemo_training_step"] == 41.0
    assert metrics["nemo_step_time_seconds"] == 2.0
    assert metrics["nemo_throughput_tokens_per_sec"] == GBS * SEQ / 2.0
    assert metrics["nemo_training_last_step_timestamp_seconds"] > 1.7e9
    assert "nemo_validation_loss" not in metrics  # no validation yet: no series

    # the callback's own clock when NeMo's TimingCallback is absent
    cb.on_train_batch_start(trainer, None, None, 1)
    trainer.global_step = 42
    trainer.callback_metrics = {"reduced_train_loss": 1.0}
    cb.on_train_batch_end(trainer, None, None, None, 1)
    metrics = scrape(port)
    assert metrics["nemo_training_loss"] == 1.0 and metrics["nemo_training_step"] == 42.0
    assert 0 < metrics["nemo_step_time_seconds"] < 5
    assert metrics["nemo_throughput_tokens_per_sec"] == pytest.approx(GBS * SEQ / metrics["nemo_step_time_seconds"])

    trainer.sanity_checking, trainer.callback_metrics = True, {"val_loss": 9.0}
    cb.on_validation_end(trainer, None)  # the sanity check is not a validation of the model
    assert "nemo_validation_loss" not in scrape(port)
    trainer.sanity_checking, trainer.callback_metrics = False, {"val_loss": 1.5, "reduced_train_loss": 1.0}
    cb.on_validation_end(trainer, None)
    assert scrape(port)["nemo_validation_loss"] == 1.5

    cb.on_train_end(trainer, None)
    metrics = scrape(port)
    assert metrics["nemo_training_running"] == 0.0 and metrics["nemo_training_loss"] == 1.0  # final values stay


def test_other_ranks_serve_nothing(make_callback):
    port = free_port()
    cb, trainer = make_callback(port=port), FakeTrainer(rank=1)
    cb.setup(trainer, None, "fit")
    assert not cb.serving and cb.gauges is None and cb.bound_port is None
    cb.on_train_start(trainer, None)
    cb.on_train_batch_start(trainer, None, None, 0)
    trainer.callback_metrics = {"reduced_train_loss": 0.0}  # what non-final pipeline stages log
    cb.on_train_batch_end(trainer, None, None, None, 0)
    cb.on_validation_end(trainer, None)
    cb.on_train_end(trainer, None)
    with pytest.raises(urllib.error.URLError):
        get(port)


def test_only_the_fit_starts_the_server(make_callback):
    cb = make_callback()
    cb.setup(FakeTrainer(), None, "validate")
    assert not cb.serving


def test_a_busy_port_costs_the_metrics_not_the_run(make_callback, capsys):
    first = make_callback()
    first.setup(FakeTrainer(), None, "fit")
    second = make_callback(port=first.bound_port)
    second.setup(FakeTrainer(), None, "fit")  # no exception
    assert not second.serving
    assert "cannot serve on port" in capsys.readouterr().err
    trainer = FakeTrainer()
    trainer.callback_metrics = {"reduced_train_loss": 1.0}
    second.on_train_batch_end(trainer, None, None, None, 0)  # a no-op


def test_a_failing_update_does_not_stop_training(make_callback, capsys):
    cb = make_callback()
    cb.setup(FakeTrainer(), None, "fit")

    class Broken(FakeTrainer):
        @property
        def callback_metrics(self):
            raise RuntimeError("logger connector exploded")

        @callback_metrics.setter
        def callback_metrics(self, value):
            pass

    cb.on_train_batch_end(Broken(), None, None, None, 0)
    cb.on_validation_end(Broken(), None)
    err = capsys.readouterr().err
    assert err.count("update failed") == 1 and "exploded" in err  # reported once
    assert scrape(cb.bound_port)["nemo_training_running"] == 0.0  # still serving


def test_other_paths_are_not_found(make_callback):
    cb = make_callback()
    cb.setup(FakeTrainer(), None, "fit")
    with pytest.raises(urllib.error.HTTPError) as exc:
        get(cb.bound_port, "/debug")
    assert exc.value.code == 404
    assert "nemo_training_running" in get(cb.bound_port, "/")[1]


def test_an_exception_marks_the_run_stopped(make_callback):
    cb, trainer = make_callback(), FakeTrainer()
    cb.setup(trainer, None, "fit")
    cb.on_train_start(trainer, None)
    cb.on_exception(trainer, None, RuntimeError("NCCL timeout"))
    assert scrape(cb.bound_port)["nemo_training_running"] == 0.0


def test_two_exporters_in_one_process_keep_their_own_values(make_callback):
    a, b = make_callback(), make_callback()
    for cb, loss in ((a, 1.0), (b, 2.0)):
        trainer = FakeTrainer()
        cb.setup(trainer, None, "fit")
        trainer.callback_metrics = {"reduced_train_loss": loss}
        cb.on_train_batch_end(trainer, None, None, None, 0)
    assert scrape(a.bound_port)["nemo_training_loss"] == 1.0 and scrape(b.bound_port)["nemo_training_loss"] == 2.0


# --------------------------------------------------------------------------------------------------
# copies and checkpoints


def test_a_copy_is_the_configuration_without_the_server(make_callback):
    cb = make_callback()
    cb.setup(FakeTrainer(), None, "fit")
    copied = copy.deepcopy(cb)
    assert type(copied) is tm.TrainingMetricsCallback and not copied.serving and copied.gauges is None
    assert (copied.run_id, copied.global_batch_size, copied.seq_length, copied.host) == (RUN_ID, GBS, SEQ, "127.0.0.1")
    assert cb.serving


def test_the_exporter_is_left_out_of_the_checkpoint_context(make_callback):
    cb = make_callback()
    trainer = FakeTrainer()
    other = object()
    trainer.__io__ = types.SimpleNamespace(callbacks=[other, copy.deepcopy(cb)])  # nemo.lightning.Trainer.io_init
    cb.setup(trainer, None, "fit")
    assert trainer.__io__.callbacks == [other]
    tm.leave_out_of_checkpoints(FakeTrainer())  # a trainer without __io__: nothing to do


def test_finetune_uses_the_module():
    assert finetune.training_metrics is tm
