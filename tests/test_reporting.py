"""reporting.py: metrics.jsonl / wandb / training plot are written by process 0 only; JSON conversion."""
import json
import sys
import types

import jax
import ml_collections
import numpy as np
import pytest

from mixtral_jax.training import reporting


class FakeWandb(types.ModuleType):
  """Stands in for the wandb module: records what the writer asked of it (a real offline run would start
  wandb's service process, seconds per test, and would not tell us more)."""

  def __init__(self):
    super().__init__("wandb")
    self.calls = []
    self.Settings = lambda **kw: kw

  def init(self, **kw):
    self.calls.append("init")
    return types.SimpleNamespace(log=lambda data, step: self.calls.append(("log", step)),
                                 finish=lambda: self.calls.append("finish"))


def write_a_run(workdir, resume_step=0):
  """What the trainer does with the reporting module: a writer, two steps of records, close, plot."""
  logging = ml_collections.ConfigDict(dict(wandb="offline", project="p", name=""))
  writer = reporting.MetricsWriter(str(workdir), logging, {"seed": 0}, resume_step=resume_step)
  for step in (1, 2):
    writer.write(step, {"loss": np.float32(3.0 / step), "expert_load": np.full((2, 3), 1 / 3),
                        "load_cv": np.zeros(2)})
  writer.write(2, {"eval_loss": 2.5})
  writer.close()
  return writer, reporting.plot_training(writer.path, str(workdir / "training.png"))


@pytest.fixture
def fake_wandb(monkeypatch):
  fake = FakeWandb()
  monkeypatch.setitem(sys.modules, "wandb", fake)
  return fake


def test_process_0_writes_metrics_wandb_and_plot(tmp_path, monkeypatch, fake_wandb):
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  writer, plot = write_a_run(tmp_path)
  records = reporting.read_metrics(writer.path)
  assert [r["step"] for r in records] == [1, 2, 2] and records[0]["expert_load"][1] == [1 / 3] * 3
  assert fake_wandb.calls == ["init", ("log", 1), ("log", 2), ("log", 2), "finish"]
  assert plot == str(tmp_path / "training.png") and (tmp_path / "training.png").stat().st_size > 1000


def test_other_processes_write_nothing(tmp_path, monkeypatch, fake_wandb):
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  writer, plot = write_a_run(tmp_path)
  assert list(tmp_path.iterdir()) == [] and fake_wandb.calls == [] and plot is None
  assert reporting.read_metrics(writer.path) == []
  # A resumed run on a shared workdir: process 1 must not truncate the file process 0 keeps.
  (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n" + json.dumps({"step": 5}) + "\n")
  write_a_run(tmp_path, resume_step=1)
  assert [r["step"] for r in reporting.read_metrics(writer.path)] == [1, 5]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_bad_wandb_mode_fails_on_every_process(tmp_path, monkeypatch):
  from mixtral_jax.config import ConfigError
  for index in (0, 1):
    monkeypatch.setattr(jax, "process_index", lambda: index)
    with pytest.raises(ConfigError, match="config.logging.wandb='sometimes'"):
      reporting.MetricsWriter(str(tmp_path), ml_collections.ConfigDict(dict(wandb="sometimes")), {})


def test_to_json_and_flatten():
  assert reporting.to_json(np.float32(np.nan)) == "nan" and reporting.to_json(np.arange(2)) == [0, 1]
  assert reporting.flatten({"loss": 1.0, "load_cv": [0.1, 0.2], "expert_load": [[0.5, 0.5]]}) == {
      "loss": 1.0, "load_cv/layer0": 0.1, "load_cv/layer1": 0.2,
      "expert_load/layer0/expert0": 0.5, "expert_load/layer0/expert1": 0.5}
