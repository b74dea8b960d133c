"""The training metrics exporter with the real NeMo 2 objects (nemo_toolkit 2.7.3, Lightning 2.4, CPU).

Runs in .venv-nemo via tests/nemo/run.sh. The recipe finetune.build_recipe makes from every stack's run.json carries
the exporter as a nemo_run Config; fdl.build turns it into a Lightning Callback; its hooks, driven by a minimal
trainer and then by a real Lightning fit that logs what MegatronStrategy and NeMo's TimingCallback log, update
what an in-process scrape of /metrics returns. The servers bind 127.0.0.1 on a free port, never 9401.
"""

from __future__ import annotations

import copy
import os
import sys
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "workloads" / "entrypoints"))

import finetune  # noqa: E402
from test_finetune_nemo import build_for_test  # noqa: E402
import training_metrics as tm  # noqa: E402

RUNS_DIR = os.environ.get("NEMO_EKS_RUNS_DIR")
RUN_FILES = sorted(Path(RUNS_DIR).glob("*.json")) if RUNS_DIR else []

pytestmark = pytest.mark.skipif(not RUNS_DIR, reason="run through tests/nemo/run.sh (sets NEMO_EKS_RUNS_DIR)")


def scrape(port: int) -> dict[str, tuple[dict[str, str], float]]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode("utf-8")
    families = list(text_string_to_metric_families(text))
    assert {f.name: f.type for f in families} == {name: "gauge" for name in tm.METRICS}
    return {s.name: (dict(s.labels), s.value) for f in families for s in f.samples}


def values(port: int, run_id: str) -> dict[str, float]:
    samples = scrape(port)
    assert all(labels == {"run_id": run_id} for labels, _ in samples.values())
    return {name: value for name, (_, value) in samples.items()}


def exporters(callbacks) -> list:
    return [c for c in callbacks if isinstance(c, tm.TrainingMetricsCallback)]


@pytest.fixture(scope="module", params=RUN_FILES, ids=lambda p: p.stem)
def built(request):
    run, recipe, _, keywords = build_for_test(request.param)
    return run, recipe, keywords


@pytest.fixture
def local_exporter(built):
    """The built exporter, told to serve on a free loopback port; closed after the test."""
    run, _, objects = built
    (callback,) = exporters(objects["trainer"].callbacks)
    configured = callback.port, callback.host
    callback.port, callback.host = 0, "127.0.0.1"
    yield run, objects, callback
    callback.close()
    callback.port, callback.host = configured


def test_the_recipe_configures_the_exporter(built):
    from nemo.utils.exp_manager import TimingCallback

    run, recipe, _ = built
    configs = recipe.trainer.callbacks
    classes = [c.__fn_or_cls__ for c in configs]
    assert classes.count(tm.TrainingMetricsCallback) == 1
    # after NeMo's TimingCallback, whose step time it reads in the same hook
    assert classes.index(TimingCallback) < classes.index(tm.TrainingMetricsCallback)
    config = configs[classes.index(tm.TrainingMetricsCallback)]
    batch = run["training"]["batch"]
    assert (config.run_id, config.port, config.global_batch_size, config.seq_length) == (
        run["run_id"], 9401, batch["global_batch_size"], batch["seq_length"])
    assert "TrainingMetricsCallback" in finetune.summary(recipe)["callbacks"]  # what --dry-run prints


def test_fdl_build_gives_a_lightning_callback(built):
    import lightning.pytorch as pl
    from nemo.utils.exp_manager import TimingCallback

    run, _, objects = built
    trainer = objects["trainer"]
    (callback,) = exporters(trainer.callbacks)
    assert isinstance(callback, pl.Callback)
    assert (callback.run_id, callback.port, callback.host) == (run["run_id"], tm.PORT, "0.0.0.0")
    assert not callback.serving  # nothing is bound before the fit sets it up
    kinds = [type(c) for c in trainer.callbacks]
    assert kinds.index(TimingCallback) < kinds.index(tm.TrainingMetricsCallback)  # Lightning kept the order


def test_hooks_with_a_minimal_trainer_update_the_scrape(local_exporter):
    import torch

    run, objects, callback = local_exporter
    batch, max_steps = run["training"]["batch"], run["training"]["schedule"]["max_steps"]

    class Trainer:  # what the hooks read of a Lightning trainer
        is_global_zero, global_step, max_steps, sanity_checking = True, 0, objects["trainer"].max_steps, False
        callback_metrics: dict = {}

    trainer = Trainer()
    callback.setup(trainer, None, "fit")
    port = callback.bound_port
    callback.on_train_start(trainer, None)
    assert values(port, run["run_id"]) == {"nemo_training_running": 1.0, "nemo_training_step": 0.0,
                                           "nemo_training_steps_total": float(max_steps)}

    callback.on_train_batch_start(trainer, None, iter(()), 0)
    trainer.global_step = 1
    # as MegatronStrategy.training_step and TimingCallback log them: 0-d tensors
    trainer.callback_metrics = {"reduced_train_loss": torch.tensor(2.5), "train_step_timing in s": torch.tensor(8.0),
                                "global_step": torch.tensor(1.0)}
    callback.on_train_batch_end(trainer, None, torch.tensor(2.5), iter(()), 0)
    callback.on_validation_end(trainer, None)
    got = values(port, run["run_id"])
    tokens = batch["global_batch_size"] * batch["seq_length"]
    assert (got["nemo_training_loss"], got["nemo_training_step"], got["nemo_step_time_seconds"]) == (2.5, 1.0, 8.0)
    assert got["nemo_throughput_tokens_per_sec"] == tokens / 8.0
    assert "nemo_validation_loss" not in got  # val_loss not logged yet

    trainer.callback_metrics = {"val_loss": torch.tensor(2.25)}
    callback.on_validation_end(trainer, None)
    assert values(port, run["run_id"])["nemo_validation_loss"] == 2.25


def test_only_global_rank_zero_serves(built):
    _, _, objects = built
    (built_callback,) = exporters(objects["trainer"].callbacks)
    callback = copy.deepcopy(built_callback)
    callback.port, callback.host = 0, "127.0.0.1"

    class Trainer:
        is_global_zero, global_step, max_steps = False, 0, 10

    callback.setup(Trainer(), None, "fit")
    assert not callback.serving and callback.gauges is None


@pytest.mark.parametrize("built", RUN_FILES[:1], indirect=True, ids=lambda p: p.stem)  # the callbacks are the same
def test_the_checkpoint_context_does_not_name_the_exporter(local_exporter, tmp_path):
    """NeMo writes the trainer's __io__ into every checkpoint (context/io.json); a context naming our module could
    not be loaded whole where the module is not importable (RestrictedUnpickler, pydoc.locate)."""
    from nemo.lightning import io
    from nemo.lightning.io.pl import TrainerContext

    run, objects, callback = local_exporter
    trainer, model = objects["trainer"], objects["model"]
    assert exporters(trainer.__io__.callbacks)  # nemo.lightning.Trainer.io_init copied it in
    callback.setup(trainer, None, "fit")
    assert callback.serving and not exporters(trainer.__io__.callbacks)
    context = tmp_path / "context"
    TrainerContext(model=model, trainer=trainer, extra={}).io_dump(context, yaml_attrs=["model"])
    assert "training_metrics" not in (context / "io.json").read_text()
    loaded = io.load_context(context)  # the whole context, trainer included
    assert not exporters(loaded.trainer.callbacks)
    assert type(io.load_context(context, subpath="model")).__name__ == "LlamaModel"
    assert exporters(trainer.callbacks) == [callback]  # the running trainer keeps it


def test_a_real_lightning_fit_feeds_the_exporter():
    """A tiny CPU fit whose module logs what MegatronStrategy logs (reduced_train_loss per step, val_loss on epoch),
    with NeMo's TimingCallback ahead of the exporter, as in the recipe. A probe after the exporter scrapes /metrics
    in the same hooks and compares with what was logged."""
    import lightning.pytorch as pl
    import torch
    from nemo.utils.exp_manager import TimingCallback

    run_id, gbs, seq = "fit-test", 16, 512

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)
            self.train_losses: dict[int, float] = {}

        def training_step(self, batch, batch_idx):
            loss = self.layer(batch).pow(2).mean()
            # MegatronStrategy.training_step: log("reduced_train_loss", loss, prog_bar=True, batch_size=1, ...)
            self.log("reduced_train_loss", loss.detach(), prog_bar=True, batch_size=1, sync_dist=False)
            self.train_losses[self.trainer.global_step + 1] = loss.item()  # the step this batch completes
            return loss

        def validation_step(self, batch, batch_idx):
            # val loss made to depend on the step, so the sanity check's differs from the real validations'
            value = torch.tensor(10.0 + self.trainer.global_step + batch_idx)
            self.log("val_loss", value, prog_bar=True, on_epoch=True)  # as MegatronStrategy.validation_step

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class Probe(pl.Callback):
        def __init__(self, exporter):
            self.exporter, self.steps, self.validations = exporter, [], []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            timing = float(trainer.callback_metrics["train_step_timing in s"])
            self.steps.append((trainer.global_step, timing, values(self.exporter.bound_port, run_id)))

        def on_validation_end(self, trainer, pl_module):
            scraped = values(self.exporter.bound_port, run_id)
            self.validations.append((trainer.sanity_checking, scraped.get("nemo_validation_loss")))

    exporter = tm.TrainingMetricsCallback(run_id, gbs, seq, port=0, host="127.0.0.1")
    probe = Probe(exporter)
    module = Module()
    data = torch.utils.data.DataLoader(torch.randn(64, 4), batch_size=8)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=4, val_check_interval=2, limit_val_batches=2,
                         num_sanity_val_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[TimingCallback(), exporter, probe])
    try:
        trainer.fit(module, train_dataloaders=data, val_dataloaders=data)
        assert [step for step, _, _ in probe.steps] == [1, 2, 3, 4]
        for step, timing, scraped in probe.steps:
            assert scraped["nemo_training_step"] == step
            assert scraped["nemo_training_loss"] == pytest.approx(module.train_losses[step])
            assert scraped["nemo_step_time_seconds"] == pytest.approx(timing)  # NeMo's own number
            assert scraped["nemo_throughput_tokens_per_sec"] == pytest.approx(gbs * seq / timing)
            assert scraped["nemo_training_running"] == 1.0 and scraped["nemo_training_steps_total"] == 4.0
        # sanity check (step 0) ignored; after steps 2 and 4: the mean of that validation's two batches
        assert probe.validations == [(True, None), (False, 12.5), (False, 14.5)]
        final = values(exporter.bound_port, run_id)  # still served after the fit, marked finished
        assert final["nemo_training_running"] == 0.0 and final["nemo_training_step"] == 4.0
        assert final["nemo_validation_loss"] == 14.5
    finally:
        exporter.close()
