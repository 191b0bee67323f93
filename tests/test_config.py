"""Options from the command line: boolean options are flags (--multi-topk / --no-multi-topk) that
still take the 1 and 0 scripts passed when they were numbers, and config_to_args gives a config back."""

from __future__ import annotations

import argparse

import pytest

from trainer.config import (
    DistributedConfig,
    HarvestConfig,
    TrainConfig,
    add_config_arguments,
    boolean_flags,
    config_from_args,
    config_to_args,
    with_boolean_words,
)
from trainer.errors import ConfigError

FLAGS = boolean_flags(TrainConfig, HarvestConfig, DistributedConfig)


def parse(*argv: str) -> TrainConfig:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, TrainConfig)
    return config_from_args(parser.parse_args(with_boolean_words(list(argv), FLAGS)), TrainConfig)


@pytest.mark.parametrize("argv,multi_topk,fast_matmul", [
    ((), False, True),
    (("--multi-topk", "--no-fast-matmul"), True, False),
    (("--multi-topk", "1", "--fast-matmul", "0"), True, False),
    (("--multi-topk=true", "--fast-matmul=False"), True, False),
    (("--no-multi-topk", "--fast-matmul"), False, True),
])
def test_boolean_options_are_flags_that_still_take_numbers(argv, multi_topk, fast_matmul):
    cfg = parse(*argv)
    assert (cfg.multi_topk, cfg.fast_matmul) == (multi_topk, fast_matmul)
    assert isinstance(cfg.multi_topk, bool) and isinstance(cfg.fast_matmul, bool)


def test_a_flag_keeps_a_path_after_it_as_a_path():
    """`harvest --exclude-special-tokens RUN`: RUN is the run folder, not the flag's value."""
    assert with_boolean_words(["--exclude-special-tokens", "demo/runs/r"], FLAGS) == ["--exclude-special-tokens", "demo/runs/r"]


@pytest.mark.parametrize("argv", [["--multi-topk", "2"], ["--fast-matmul=maybe"]])
def test_a_boolean_given_another_value_is_an_error(argv):
    with pytest.raises(ConfigError, match=r"is on or off: give --\S+ or --no-\S+ \(or 1 / 0\)"):
        with_boolean_words(argv, FLAGS)


def test_config_to_args_gives_the_config_back():
    cfg = TrainConfig(multi_topk=True, fast_matmul=False, k=8, n_latents=64, lr=1e-3)
    assert "--no-fast-matmul" in config_to_args(cfg) and "--multi-topk" in config_to_args(cfg)
    assert parse(*config_to_args(cfg)) == cfg


def test_a_config_built_in_code_takes_0_and_1_and_refuses_other_values():
    assert TrainConfig(multi_topk=1).multi_topk is True
    with pytest.raises(ConfigError, match="--multi-topk is on or off"):
        TrainConfig(multi_topk=2)
