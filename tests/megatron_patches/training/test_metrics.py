import importlib.util

from megatron_patches.training import metrics


def test_a_requested_but_missing_wandb_is_named_in_one_line(tmp_path, capsys, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        metrics.importlib.util, "find_spec", lambda name: None if name == "wandb" else real_find_spec(name)
    )
    writer = metrics.MetricsWriter(tmp_path, None, True, "my-project", {})
    writer.close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    assert lines[0].endswith("note: wandb is not installed, so logging.wandb_project='my-project' is skipped")
    assert writer.wandb is None
