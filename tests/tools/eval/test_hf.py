"""Loading HF exports: unknown families and remote code give one-line errors, never a traceback."""

import json
import subprocess
import sys

import pytest

from megatron_patches.errors import ConfigError
from tests.tiny_hf import build_model
from tests.tools.eval.cli import REPO, run_eval
from tools.eval import inspect
from tools.eval.families import require_family
from tools.hf_runtime.loading import load_model, load_tokenizer, model_type


def _with_model_type(directory, model_type: str, **extra) -> str:
    """A tiny llama export whose config.json claims another family."""
    path = build_model(directory)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": model_type, **extra}))
    return str(path)


def _run_infer(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "tools.infer", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)


def _assert_one_line_error(proc: subprocess.CompletedProcess, prog: str, message: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith(f"{prog}: error: ") and message in proc.stderr, proc.stderr


def test_an_unknown_family_is_one_line_on_both_clis(tmp_path):
    path = _with_model_type(tmp_path / "foo", "gpt_neox_foo")
    expected = "unknown model family 'gpt_neox_foo'"
    _assert_one_line_error(_run_infer("--model", path, "--prompt", "hi"), "python -m tools.infer", expected)
    held_out = tmp_path / "held.jsonl"
    held_out.write_text('{"text": "the capital of france is paris."}\n')
    proc = run_eval("ppl", "--hf", path, "--data", str(held_out), "--device", "cpu")
    _assert_one_line_error(proc, "python -m tools.eval", expected)


def test_remote_code_needs_consent(tmp_path):
    auto_map = {"AutoConfig": "configuration_baichuan.BaichuanConfig"}
    path = _with_model_type(tmp_path / "baichuan", "baichuan", auto_map=auto_map)
    with pytest.raises(ConfigError, match="'baichuan' ships its own modeling code; pass --trust-remote-code"):
        model_type(path)
    with pytest.raises(ConfigError, match="cannot read the model config: .*configuration_baichuan.py"):
        model_type(path, trust_remote_code=True)  # consent given, but the code is not there
    proc = run_eval("probes", "--hf", path, "--probes", str(tmp_path / "p.yaml"), "--trust-remote-code")
    assert "unrecognized arguments" not in proc.stderr  # the flag exists (the probes file is missing)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr


def test_a_tokenizer_with_remote_code_needs_consent(tmp_path):
    path = build_model(tmp_path / "m")
    config = json.loads((path / "tokenizer_config.json").read_text())
    auto_map = {"AutoTokenizer": ["tokenization_baichuan.BaichuanTokenizer", None]}
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "auto_map": auto_map}))
    with pytest.raises(ConfigError, match="the tokenizer ships its own modeling code"):
        load_tokenizer(path)


def test_the_lenses_refuse_baichuan_and_say_why(tmp_path):
    path = _with_model_type(tmp_path / "baichuan", "baichuan", auto_map={"AutoConfig": "x.Y"})
    with pytest.raises(ConfigError, match="do not support 'baichuan': .*cannot return attention weights"):
        require_family(path)
    proc = run_eval("inspect", "--hf", path, "--text", "hi", "--trust-remote-code")
    _assert_one_line_error(proc, "python -m tools.eval", "hf2hf --hf DIR --out OUT --to llama")
    with pytest.raises(ConfigError, match="do not support 'baichuan'"):
        inspect.load(path)


def test_a_known_family_loads(tmp_path):
    path = build_model(tmp_path / "m", family="qwen2")
    assert model_type(path) == "qwen2"
    assert load_model(path, device="cpu").config.model_type == "qwen2"
