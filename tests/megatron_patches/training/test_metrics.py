import importlib.machinery
import importlib.util
import json
import sys
import types

from megatron_patches.training import metrics
from megatron_patches.training.config import LoggingConfig


def test_a_requested_but_missing_wandb_is_named_in_one_line(tmp_path, capsys, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        metrics.importlib.util, "find_spec", lambda name: None if name == "wandb" else real_find_spec(name)
    )
    writer = metrics.MetricsWriter(tmp_path, LoggingConfig(wandb_project="my-project"), True, {})
    writer.close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    assert lines[0].endswith("note: wandb is not installed, so logging.wandb_project='my-project' is skipped")
    assert writer.wandb is None


def _fake_wandb(calls: list[dict]) -> types.ModuleType:
    """A ``wandb`` module whose ``init`` records its keyword arguments."""
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # find_spec() answers for it

    def init(**kwargs):
        calls.append(kwargs)
        return types.SimpleNamespace(log=lambda *a, **k: None, finish=lambda: None)

    fake.init = init
    return fake


def test_a_requeued_run_resumes_its_wandb_run_with_megatron_lm_names(tmp_path, monkeypatch):
    calls: list[dict] = []
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(calls))
    cfg = LoggingConfig(wandb_project="proj", wandb_exp_name="7b-run", wandb_entity="team")
    metrics.MetricsWriter(tmp_path, cfg, True, {"seed": 1}).close()
    run_id = (tmp_path / metrics.WANDB_ID_FILE).read_text().strip()
    metrics.MetricsWriter(tmp_path, cfg, True, {"seed": 1}, resumed_iteration=20).close()  # the requeue
    assert run_id
    assert [(c["id"], c["resume"]) for c in calls] == [(run_id, "allow")] * 2
    assert {(c["project"], c["name"], c["entity"], c["dir"]) for c in calls} == {
        ("proj", "7b-run", "team", str(tmp_path))
    }


def test_a_resume_cuts_the_iteration_log_back_to_the_checkpoint_atomically(tmp_path):
    log = tmp_path / metrics.METRICS_FILE
    log.write_text("".join(json.dumps({"iteration": i, "loss": 5.0 - i}) + "\n" for i in range(1, 7)))
    log.write_text(log.read_text() + '{"iteration": 7, "lo')  # torn by a kill
    assert metrics.keep_records_until(log, 4) == 3
    assert [json.loads(line)["iteration"] for line in log.read_text().splitlines()] == [1, 2, 3, 4]
    assert metrics.keep_records_until(log, 4) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [metrics.METRICS_FILE]  # no temporary file left
