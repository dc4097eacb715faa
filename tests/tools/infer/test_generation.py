"""Batched generation equals a hand-written greedy loop, cut at the stop string."""

import io

import pytest
import torch

from megatron_patches.errors import ConfigError
from tests.tiny_hf import build_model
from tools.hf_runtime.generation import Sampling, check_sampling, generate, relay_until_stop, stream
from tools.hf_runtime.loading import load_model, load_tokenizer

PROMPTS = ["the capital of france is", "cats", "中国的首都是北京。 water boils at"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = build_model(tmp_path_factory.mktemp("gen") / "llama", seed=3)
    return load_model(path, device="cpu"), load_tokenizer(path)


def greedy_by_hand(model, tokenizer, prompt: str, steps: int) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(steps):
            token = model(input_ids=ids).logits[0, -1].argmax().item()
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return new


def test_left_padded_batches_generate_what_each_prompt_does_alone(tiny):
    model, tokenizer = tiny
    outputs = generate(model, tokenizer, PROMPTS, Sampling(max_new_tokens=6), batch_size=3)
    assert outputs == [tokenizer.decode(greedy_by_hand(model, tokenizer, p, 6)) for p in PROMPTS]


def test_generation_ends_at_the_stop_string(tiny):
    model, tokenizer = tiny
    full = tokenizer.decode(greedy_by_hand(model, tokenizer, PROMPTS[0], 12))
    stop = full[len(full) // 2]  # a character the greedy continuation reaches half-way
    [cut] = generate(model, tokenizer, PROMPTS[:1], Sampling(max_new_tokens=12, stop=stop))
    assert cut == full.split(stop, 1)[0]


def test_streaming_writes_the_same_text(tiny):
    model, tokenizer = tiny
    out = io.StringIO()
    text = stream(model, tokenizer, PROMPTS[0], Sampling(max_new_tokens=6), out=out)
    assert text == tokenizer.decode(greedy_by_hand(model, tokenizer, PROMPTS[0], 6))
    assert out.getvalue() == text + "\n"


def test_streaming_ends_at_the_stop_string_like_batched_generation(tiny):
    model, tokenizer = tiny
    full = tokenizer.decode(greedy_by_hand(model, tokenizer, PROMPTS[0], 12))
    stop = full[len(full) // 2 : len(full) // 2 + 2]  # two characters the continuation reaches half-way
    sampling = Sampling(max_new_tokens=12, stop=stop)
    out = io.StringIO()
    text = stream(model, tokenizer, PROMPTS[0], sampling, out=out)
    assert text == full.split(stop, 1)[0] == generate(model, tokenizer, PROMPTS[:1], sampling)[0]
    assert out.getvalue() == text + "\n"


def test_sampled_outputs_depend_on_seed_and_position_not_on_batching(tiny):
    model, tokenizer = tiny
    prompts = [p for p in PROMPTS for _ in range(3)]  # repeats: same prompt, different positions
    sampling = Sampling(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=5)
    whole = generate(model, tokenizer, prompts, sampling, batch_size=4)
    assert generate(model, tokenizer, prompts, sampling, batch_size=1) == whole
    # A second replica (or a resumed run) gets the tail with its positions in the whole input.
    assert generate(model, tokenizer, prompts[5:], sampling, batch_size=3, positions=range(5, 9)) == whole[5:]
    assert len(set(whole[:3])) > 1  # positions seed differently
    reseeded = generate(model, tokenizer, prompts, Sampling(max_new_tokens=8, temperature=1.0, seed=6))
    assert reseeded != whole
    greedy = generate(model, tokenizer, prompts, Sampling(max_new_tokens=8))
    assert greedy != whole and len(set(greedy[:3])) == 1


def test_the_nucleus_keeps_the_smallest_set_reaching_top_p():
    from tools.hf_runtime.seeded import nucleus

    probs = torch.tensor([[0.1, 0.5, 0.3, 0.1]])
    assert (nucleus(probs, 0.7) > 0).tolist() == [[False, True, True, False]]
    assert (nucleus(probs, 0.4) > 0).tolist() == [[False, True, False, False]]
    assert torch.equal(nucleus(probs, 0.7)[0, 1:3], probs[0, 1:3])
    assert nucleus(probs, 1.0) is probs


class _Recorder(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def test_a_stop_string_split_across_pieces_is_never_written():
    out = _Recorder()
    assert relay_until_stop(["Paris is", " lovely\n", "\nQuestion"], out, "\n\n") == "Paris is lovely"
    assert out.getvalue() == "Paris is lovely"
    assert all("\n" not in w for w in out.writes)
    out = _Recorder()
    assert relay_until_stop(["ab", "cd", "e"], out, None) == "abcde"
    assert out.writes[:3] == ["ab", "cd", "e"]  # without a stop nothing is held back


@pytest.mark.parametrize(
    "sampling", [Sampling(max_new_tokens=0), Sampling(temperature=-1), Sampling(top_p=0)]
)
def test_bad_sampling_is_refused(sampling):
    with pytest.raises(ConfigError):
        check_sampling(sampling)
