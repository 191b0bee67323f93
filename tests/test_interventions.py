"""Interventions: steering (add, clamp) with a KV cache, per-token ablation, ablation sparsity."""

from __future__ import annotations

import pytest
import torch

from trainer.errors import ConfigError
from trainer.interventions import (
    READ_POSITIONS,
    LatentReader,
    Steering,
    ablation_effects,
    ablation_sparsity,
    effect_sparsity,
    first_divergence,
    generate,
    steering_edit,
    strongest,
    summed_top_tokens,
)
from trainer.runfolder import load_harvest, load_sae

PROMPT = "def read_file(path):\n    with open(path) as f:\n        return"


@pytest.fixture(scope="module")
def tiny(tiny_run):
    cfg, sae = load_sae(tiny_run)
    lm = cfg.language_model("cpu")
    reader = LatentReader(sae, cfg.norm, cfg.fast_matmul)
    max_activation = load_harvest(tiny_run, cfg).max_activation
    prompt = lm.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    return cfg, sae, lm, reader, max_activation, prompt


def firing(reader, lm, ids) -> torch.Tensor:
    """(T, n) every latent's activation on ids."""
    resid = lm.residual(torch.tensor([ids]))[0]
    x_n, _ = reader.norm.normalize(resid)
    chosen = reader.sae.encode_selected(x_n, reader.dtype)
    return torch.zeros(len(ids), reader.sae.n_latents).scatter_(-1, chosen.indices, chosen.values)


def to_residual_by_hand(norm, clean: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """A change `delta` in the SAE's space as the residual stream (T, d) sees it: divided by the
    run's scale, or per token times the deviation of the clean residual (decoding multiplies by it)."""
    if norm.kind == "scale":
        return delta / norm.scale
    return delta * (clean - clean.mean(-1, keepdim=True)).std(-1, keepdim=True)


def test_strength_zero_gives_exactly_the_default(tiny):
    _, _, lm, reader, max_activation, prompt = tiny
    steering = Steering("add", (3, 7), (0.0, 0.0), (float(max_activation[3]), float(max_activation[7])))
    for sampler in ({}, {"temperature": 1.0, "top_p": 0.9, "seed": 5}):
        default = generate(lm, prompt, 24, **sampler)
        steered = generate(lm, prompt, 24, steering=steering, reader=reader, **sampler)
        assert steered.token_ids == default.token_ids
        assert steered.activations.shape == (len(prompt) + len(steered.token_ids), 2)


def test_clamping_to_its_own_activation_gives_exactly_the_default(tiny):
    _, sae, lm, reader, max_activation, prompt = tiny
    z = firing(reader, lm, prompt[:1])[0]  # a one-token prompt: its one position is the one edited
    latent = int(z.argmax())
    assert z[latent] > 0
    own = Steering("clamp", (latent,), (1.0,), (float(z[latent]),))  # strength 1 x "max" = its own activation
    assert generate(lm, prompt[:1], 1, steering=own, reader=reader).token_ids == generate(lm, prompt[:1], 1).token_ids
    # a latent silent on the whole text and its continuation, clamped to its own 0, over many tokens
    default = generate(lm, prompt, 16)
    silent = int((firing(reader, lm, prompt + default.token_ids).amax(0) == 0).nonzero()[0])
    zero = Steering("clamp", (silent,), (0.0,), (float(max_activation[silent]),))
    assert generate(lm, prompt, 16, steering=zero, reader=reader).token_ids == default.token_ids


def test_add_hook_adds_exactly_strength_times_max_activation_times_the_decoder_row(tiny):
    cfg, sae, lm, reader, max_activation, prompt = tiny
    latent, strength = 5, 3.5
    steering = Steering("add", (latent,), (strength,), (float(max_activation[latent]),))
    ids = torch.tensor([prompt])
    clean = lm.residual(ids)
    with lm.loaded.editing(lm.layer, steering_edit(reader, steering)):
        steered = lm.residual(ids)  # block L's output as the next block reads it
    expected = to_residual_by_hand(cfg.norm, clean[0], strength * float(max_activation[latent]) * sae.W_dec[latent].detach())
    torch.testing.assert_close(steered[0] - clean[0], expected.expand_as(clean[0]), rtol=1e-5, atol=1e-5)


def test_an_edit_is_its_threads_own(tiny):
    """The probe reads the same model object on its own threads: it never sees a steering."""
    from concurrent.futures import ThreadPoolExecutor

    _, _, lm, _, _, prompt = tiny
    ids = torch.tensor([prompt])
    clean = lm.residual(ids)
    with lm.loaded.editing(lm.layer, lambda resid: resid + 1.0), ThreadPoolExecutor(1) as other:
        torch.testing.assert_close(lm.residual(ids), clean + 1.0)
        torch.testing.assert_close(other.submit(lm.residual, ids).result(), clean, rtol=0, atol=0)
    torch.testing.assert_close(lm.residual(ids), clean, rtol=0, atol=0)


def test_clamp_sets_the_latent_to_its_value_and_keeps_the_error(tiny):
    cfg, sae, lm, reader, max_activation, prompt = tiny
    latent = 9
    steering = Steering("clamp", (latent,), (2.0,), (float(max_activation[latent]),))
    ids = torch.tensor([prompt])
    clean = lm.residual(ids)[0]
    with lm.loaded.editing(lm.layer, steering_edit(reader, steering)):
        steered = lm.residual(ids)[0]
    z = firing(reader, lm, prompt)[:, latent]
    v = 2.0 * float(max_activation[latent])
    expected = clean + to_residual_by_hand(cfg.norm, clean, (v - z)[:, None] * sae.W_dec[latent].detach())
    torch.testing.assert_close(steered, expected, rtol=1e-5, atol=1e-5)


def test_the_kv_cache_gives_what_recomputing_the_whole_text_gives(tiny):
    _, _, lm, _, _, prompt = tiny
    new = generate(lm, prompt, 12).token_ids
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(len(new)):  # every token from the whole text so far, no cache (the head in fp32, as generate's)
            with lm.loaded.autocast():
                hidden = lm.loaded.base(input_ids=torch.tensor([ids]), use_cache=False).last_hidden_state[0, -1]
            ids.append(int(lm.unembed(hidden.float()).argmax()))
    assert ids[len(prompt):] == new


def test_sampling_is_seeded(tiny):
    _, _, lm, _, _, prompt = tiny
    runs = [generate(lm, prompt, 20, temperature=1.5, seed=seed).token_ids for seed in (1, 1, 2)]
    assert runs[0] == runs[1] != runs[2]


def test_steering_is_checked_before_any_work():
    with pytest.raises(ConfigError, match="between -100 and 100"):
        Steering("add", (1,), (101.0,), (1.0,))
    with pytest.raises(ConfigError, match="1 to 8 latents"):
        Steering("add", tuple(range(9)), (1.0,) * 9, (1.0,) * 9)
    with pytest.raises(ConfigError, match="mode"):
        Steering("scale", (1,), (1.0,), (1.0,))
    assert first_divergence([1, 2, 3], [1, 2, 4]) == 2 and first_divergence([1, 2], [1, 2]) is None


def test_ablating_a_latent_that_does_not_fire_changes_nothing(tiny):
    _, _, lm, reader, _, prompt = tiny
    z = firing(reader, lm, prompt)
    silent = int((z.amax(0) == 0).nonzero()[0])
    effects = ablation_effects(lm, reader, torch.tensor([prompt, prompt]), silent)
    assert (effects.delta_logprob == 0).all() and (effects.activations == 0).all()
    assert effects.raised == [] and effects.lowered == []


def test_ablating_a_firing_latent_changes_only_what_comes_after_it(tiny):
    _, _, lm, reader, _, prompt = tiny
    z = firing(reader, lm, prompt)
    z[0] = 0  # the first position is left out, as the harvest leaves it
    latent = int(z.amax(0).argmax())
    first = int((z[:, latent] > 0).nonzero()[0])
    effects = ablation_effects(lm, reader, torch.tensor([prompt]), latent)
    assert (effects.activations[0, first] > 0) and (effects.activations[0, :first] == 0).all()
    assert (effects.delta_logprob[0, : first + 1] == 0).all()  # token t is predicted at t - 1
    assert (effects.delta_logprob[0, first + 1 :] != 0).any()
    assert effects.raised and effects.lowered


def whole_model_twice(lm, reader, prompt: list[int], latent: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The final hidden states (T, d) over `prompt` as it is and, by hand, with `latent` removed
    (x − z·W_dec where it fires, the first position left out), the whole model run each time."""
    z = firing(reader, lm, prompt)[:, latent]
    z[0] = 0
    loaded, ids = lm.loaded, torch.tensor([prompt])

    def removed(resid):
        delta = to_residual_by_hand(reader.norm, resid[0], z[:, None] * reader.sae.W_dec[latent].detach()[None])
        return torch.where((z > 0)[None, :, None], resid - delta[None].to(resid.dtype), resid)

    with torch.no_grad(), loaded.autocast():
        clean = loaded.base(input_ids=ids, use_cache=False).last_hidden_state[0].float()
        with loaded.editing(lm.layer, removed):
            ablated = loaded.base(input_ids=ids, use_cache=False).last_hidden_state[0].float()
    return clean, ablated


def densest_latent(reader, lm, prompt: list[int]) -> int:
    """The latent firing at the most positions of `prompt` (the first position left out)."""
    z = firing(reader, lm, prompt)
    z[0] = 0
    return int((z > 0).sum(0).argmax())


def test_the_lm_head_gives_the_modules_logits(tiny):
    _, _, lm, _, _, _ = tiny
    hidden = torch.randn(3, 7, lm.d_model)
    with torch.no_grad():
        torch.testing.assert_close(lm.logits(hidden), lm.unembed(hidden), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lm.logits(hidden[0, :1]), lm.unembed(hidden[0, :1]), rtol=1e-5, atol=1e-5)


def test_the_change_of_each_tokens_log_probability_is_the_whole_model_run_twice(tiny):
    _, _, lm, reader, _, prompt = tiny
    latent = densest_latent(reader, lm, prompt)
    effects = ablation_effects(lm, reader, torch.tensor([prompt]), latent)
    clean, ablated = whole_model_twice(lm, reader, prompt, latent)
    next_ids = torch.tensor(prompt[1:])[:, None]

    def log_p(hidden):  # of token t + 1 at position t
        return torch.log_softmax(lm.unembed(hidden[:-1]), -1).gather(-1, next_ids)[:, 0]

    expected = torch.zeros(len(prompt))
    with torch.no_grad():
        expected[1:] = log_p(ablated) - log_p(clean)
    assert expected.abs().max() > 1e-2  # the removal changes something to compare
    torch.testing.assert_close(torch.from_numpy(effects.delta_logprob[0]), expected, rtol=0, atol=1e-4)


def test_the_raised_and_lowered_tokens_are_the_probability_change_where_it_was_removed(tiny):
    """Against the whole model run twice by hand: softmax of the logits with and without the
    latent (x − z·W_dec where it fires), their difference summed over its strongest positions."""
    _, _, lm, reader, _, prompt = tiny
    latent = densest_latent(reader, lm, prompt)
    z = firing(reader, lm, prompt)[:, latent]
    z[0] = 0
    assert (z > 0).sum() > READ_POSITIONS  # so that the reading is at its strongest positions only
    read = z.topk(READ_POSITIONS).indices
    effects = ablation_effects(lm, reader, torch.tensor([prompt]), latent, top_n=5)
    clean, ablated = whole_model_twice(lm, reader, prompt, latent)
    with torch.no_grad():
        change = (torch.softmax(lm.unembed(ablated[read]), -1) - torch.softmax(lm.unembed(clean[read]), -1)).sum(0).double()
    expected_up, expected_down = change.topk(5), change.topk(5, largest=False)
    assert [i for i, _ in effects.raised] == expected_up.indices[expected_up.values > 0].tolist()
    assert [i for i, _ in effects.lowered] == expected_down.indices[expected_down.values < 0].tolist()
    assert [v for _, v in effects.raised] == pytest.approx(expected_up.values[expected_up.values > 0].tolist(), abs=1e-4)
    assert [v for _, v in effects.lowered] == pytest.approx(expected_down.values[expected_down.values < 0].tolist(), abs=1e-4)
    assert sum(v for _, v in effects.raised) <= READ_POSITIONS  # a probability change, at most 1 per position


def test_top_tokens_sum_each_contexts_strongest():
    tokens = torch.tensor([[3, 7, -1, -1], [7, 9, 2, -1]])
    change = torch.tensor([[0.5, -0.2, 0.0, 0.0], [-0.4, 0.3, 0.1, 0.0]])
    raised, lowered = summed_top_tokens(tokens, change, vocab_size=10, top_n=2)
    assert raised == [(3, 0.5), (9, pytest.approx(0.3))]
    assert lowered == [(7, pytest.approx(-0.6))]  # -0.2 - 0.4: both contexts lowered it
    ids, values = strongest(torch.tensor([0.1, -0.5, 0.0, 0.7]), m=3)  # a vocabulary of 4: the two ends meet
    assert sorted(ids[ids >= 0].tolist()) == [0, 1, 2, 3] and len(ids) == 6


def test_effect_sparsity_against_a_hand_computed_case():
    # L1 = 3 + 4 = 7, L2 = 5: (7 / 5)^2 / 4 entries = 0.49
    assert effect_sparsity(torch.tensor([[3.0, -4.0], [0.0, 0.0]])) == pytest.approx(0.49)
    one_hot, uniform = torch.zeros(4, 100), torch.ones(4, 100)
    one_hot[2, 17] = 5.0
    assert effect_sparsity(one_hot) == pytest.approx(1 / 400)
    assert effect_sparsity(uniform) == pytest.approx(1.0)
    assert effect_sparsity(one_hot) < effect_sparsity(uniform)


def test_ablation_sparsity_on_held_out_contexts(tiny):
    _, _, lm, reader, _, prompt = tiny
    tokens = torch.tensor([prompt[:16], prompt[4:20]])
    counted = torch.ones_like(tokens, dtype=torch.bool)
    counted[:, 0] = False
    metrics = ablation_sparsity(lm, reader, tokens, counted, n_samples=6, horizon=4)
    assert metrics["ablation_samples"] == 6
    assert 0 < metrics["ablation_sparsity"] <= 1 and 0 < metrics["ablation_sparsity_random"] <= 1
    assert ablation_sparsity(lm, reader, tokens, counted, n_samples=6, horizon=4) == metrics  # seeded


def test_eval_reports_ablation_sparsity_against_random_directions(tiny_run):
    from trainer.runfolder import load_metrics

    metrics = load_metrics(tiny_run)  # the fixture ran `saescope eval` at its defaults
    assert metrics["ablation_samples"] == 24 and metrics["ablation_horizon"] == 16
    assert 0 < metrics["ablation_sparsity"] <= 1 and 0 < metrics["ablation_sparsity_random"] <= 1


def test_steer_command_prints_both_continuations(tiny_run, capsys):
    from saescope.cli import main

    assert main(["steer", str(tiny_run), "--prompt", PROMPT, "--latent", "3=20", "--latent", "5=-4", "--tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "default: " in out and "steered: " in out
    assert main(["steer", str(tiny_run), "--prompt", PROMPT, "--latent", "3=200"]) == 2
    assert "between -100 and 100" in capsys.readouterr().err


@pytest.mark.slow  # ~20 s: the bundled SmolLM2 (its GGUF converted once into the cache)
def test_steering_raises_the_token_the_decoder_direction_promotes_on_the_bundled_model():
    from trainer.directions import logit_effects
    from trainer.model import BUNDLED_MODEL, load_language_model
    from trainer.sae import InputNorm, TopKSAE

    lm = load_language_model(BUNDLED_MODEL, 6)
    torch.manual_seed(0)
    sae = TopKSAE(lm.d_model, 64, 8)  # a direction of its own: the mechanism, not a trained latent
    reader = LatentReader(sae, InputNorm("scale", 1.0))
    latent = 11
    top_token = int(logit_effects(sae.W_dec.detach()[latent : latent + 1], lm.final_norm, lm.unembed, 1)["logit_top_ids"][0, 0])
    ids = torch.tensor([lm.tokenizer("The weather today is", add_special_tokens=False)["input_ids"]])
    typical = float(lm.residual(ids)[0, 1:].norm(dim=-1).median())  # "max activation": the stream's own size

    def next_probability(steering=None):
        edit = steering_edit(reader, steering) if steering else (lambda resid: resid)
        with torch.no_grad(), lm.loaded.editing(lm.layer, edit), lm.loaded.autocast():
            return float(lm.loaded.causal_lm(input_ids=ids, use_cache=False).logits[0, -1].float().softmax(-1)[top_token])

    steered = next_probability(Steering("add", (latent,), (2.0,), (typical,)))
    assert steered >= 10 * next_probability()
