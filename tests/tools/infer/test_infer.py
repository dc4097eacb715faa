"""Multi-replica batch inference: device groups, resumable ordered output, a real kill and resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_patches.errors import ConfigError
from tests.tiny_hf import build_model
from tools.hf_runtime.generation import Sampling, generate
from tools.hf_runtime.loading import load_model, load_tokenizer
from tools.infer.records import OrderedWriter, read_inputs, recover_output
from tools.infer.replicas import device_groups, parse_devices, physical_group

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(
    ("replicas", "groups"),
    [
        (8, [(str(i),) for i in range(8)]),
        (4, [("0", "1"), ("2", "3"), ("4", "5"), ("6", "7")]),
        (2, [("0", "1", "2", "3"), ("4", "5", "6", "7")]),
        (1, [tuple(str(i) for i in range(8))]),
    ],
)
def test_eight_gpus_split_into_equal_groups(replicas, groups):
    assert device_groups(parse_devices("0,1,2,3,4,5,6,7"), replicas) == groups


def test_bad_device_layouts_are_named():
    assert device_groups(parse_devices("cpu"), 2) == [("cpu",), ("cpu",)]
    with pytest.raises(ConfigError, match="8 devices cannot be split evenly into 3 replicas"):
        device_groups(parse_devices("0,1,2,3,4,5,6,7"), 3)
    with pytest.raises(ConfigError, match="--devices must be 'cpu' or distinct GPU indices"):
        parse_devices("0,0,1")


def test_device_indices_map_through_the_parents_visible_devices():
    groups = device_groups(parse_devices("0,1,2,3"), 2)
    assert [physical_group(g, None) for g in groups] == [("0", "1"), ("2", "3")]
    assert [physical_group(g, "4,5,6,7") for g in groups] == [("4", "5"), ("6", "7")]
    uuids = "GPU-aa, GPU-bb,GPU-cc,GPU-dd"
    assert [physical_group(g, uuids) for g in groups] == [("GPU-aa", "GPU-bb"), ("GPU-cc", "GPU-dd")]
    assert physical_group(("cpu",), "4,5") == ("cpu",)
    with pytest.raises(ConfigError, match="--devices names GPU 2 but CUDA_VISIBLE_DEVICES='6,7' shows 2 GPU"):
        physical_group(("2", "3"), "6,7")


def test_a_torn_last_line_is_cut_and_not_counted_as_done(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"id": 1, "output": "a"}\n{"id": 2, "output": "b"}\n{"id": 3, "outp')
    assert recover_output(out) == {"1", "2"}
    assert out.read_bytes() == b'{"id": 1, "output": "a"}\n{"id": 2, "output": "b"}\n'
    out.write_bytes(b'{"id": 1, "output": "a"}\nnot an output line\n')
    with pytest.raises(ConfigError, match="out.jsonl:2 is not an inference output line"):
        recover_output(out)


def test_results_are_written_in_input_order_whatever_order_they_arrive_in(tmp_path):
    writer = OrderedWriter(tmp_path / "out.jsonl", ['"a"', '"b"', '"c"'])
    assert [writer.add({"id": i}) for i in ("c", "a", "b")] == [0, 1, 2]
    writer.close()
    assert [json.loads(line)["id"] for line in (tmp_path / "out.jsonl").read_text().splitlines()] == [
        "a",
        "b",
        "c",
    ]


def test_duplicate_and_malformed_inputs_are_refused(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": 1, "prompt": "a"}\n{"prompt": "b"}\n')
    assert [r["id"] for r in read_inputs(path)] == [1, 2]  # id defaults to the line number
    path.write_text('{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n')
    with pytest.raises(ConfigError, match="in.jsonl:2: id 1 appears twice"):
        read_inputs(path)
    path.write_text('{"id": 1, "text": "a"}\n')
    with pytest.raises(ConfigError, match="in.jsonl:1 has no string 'prompt'"):
        read_inputs(path)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.slow
def test_two_replicas_killed_mid_run_resume_to_each_id_exactly_once(tmp_path):
    model_dir = build_model(tmp_path / "llama", seed=4, hidden_size=64, num_hidden_layers=3)
    prompts = [{"id": f"q{i}", "prompt": f"the capital of {'abcdefgh'[i % 8]} is {i}"} for i in range(48)]
    data, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    command = [
        sys.executable,
        "-m",
        "tools.infer",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--out",
        str(out),
        "--replicas",
        "2",
        "--devices",
        "cpu",
        "--batch-size",
        "1",
        "--max-new-tokens",
        "24",
    ]
    proc = subprocess.Popen(
        command, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 240
    while len(_lines(out)) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job, replicas included, as a scheduler would
    proc.wait()
    written = len(_lines(out))
    assert 3 <= written < len(prompts), f"the kill landed after {written} lines"
    with out.open("ab") as f:  # and the kill tore the line being written
        f.write(b'{"id": "q' + str(written).encode() + b'", "prompt": "the cap')

    resumed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"48 prompts, {written} already in" in resumed.stdout
    records = [json.loads(line) for line in _lines(out)]
    assert [r["id"] for r in records] == [p["id"] for p in prompts]  # each once, in input order
    model, tokenizer = load_model(model_dir, device="cpu"), load_tokenizer(model_dir)
    expected = generate(
        model, tokenizer, [p["prompt"] for p in prompts], Sampling(max_new_tokens=24), batch_size=1
    )
    assert [r["output"] for r in records] == expected
