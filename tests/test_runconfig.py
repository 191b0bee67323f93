"""The run contract: cfg.json files written by earlier saescope versions load into RunConfig, a
RunConfig written and read again is the same, and a value out of range is refused where it is built."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from trainer.config import TrainConfig
from trainer.errors import RunFolderError
from trainer.runconfig import ImportSource, RunConfig, StoreRecord
from trainer.store import Positions

FIXTURES = Path(__file__).parent / "fixtures"
TRAINED = FIXTURES / "cfg-trained-3be9420.json"  # `saescope train` on the reference settings, before RunConfig
IMPORTED = FIXTURES / "cfg-imported-sparsify-3be9420.json"  # `saescope import` of a sparsify SAE, likewise


def run_folder(tmp_path: Path, fixture: Path) -> Path:
    shutil.copy(fixture, tmp_path / "cfg.json")
    return tmp_path


def test_a_trained_runs_cfg_json_from_before_loads_with_its_training_options(tmp_path):
    cfg = RunConfig.load(run_folder(tmp_path, TRAINED))
    assert (cfg.model, cfg.layer, cfg.d_in, cfg.n_latents, cfg.k) == ("smollm2-135m-instruct", 6, 576, 4096, 32)
    assert cfg.slug == "smollm2-135m-instruct-l6-4096-k32" and cfg.hookpoint == "model.layers.6"
    assert cfg.input_scale == pytest.approx(0.16828186810016632)
    # The defaults then (saved as 0/1 numbers), every position included: the options added since say so.
    assert cfg.train == TrainConfig(exclude_first=0, exclude_special_tokens=False, normalization="scale", batch_size=1024,
                                    auxk_alpha=1 / 32, lr=1.2e-3, dead_tokens=30_003)
    # The rules then gave these (lr and dead tokens saved as 0, "the rule"); today's give others.
    assert cfg.train.effective_lr != TrainConfig().effective_lr
    assert cfg.train.fast_matmul is True and cfg.train.multi_topk is False and not cfg.imported
    assert cfg.store == StoreRecord("/data/demo/activations", "../../activations")
    assert cfg.store_dir(tmp_path) == Path("/data/demo/activations")  # not here: the recorded place
    assert cfg.extra == {}


def test_an_imported_runs_cfg_json_from_before_loads_with_its_source(tmp_path):
    cfg = RunConfig.load(run_folder(tmp_path, IMPORTED))
    assert (cfg.model, cfg.layer, cfg.n_latents, cfg.k, cfg.hookpoint) == ("smollm2-135m-instruct", 6, 64, 8, "layers.6")
    assert cfg.imported and cfg.train is None and cfg.fast_matmul  # probed as the bundled model's default
    assert cfg.source.format == "sparsify" and cfg.source.cfg["num_latents"] == 64 and cfg.source.dtype == "float32"
    assert cfg.store is None and cfg.store_dir(tmp_path) is None


# Keys added since the fixtures were written, with the values that say how those runs were made.
ADDED = {"trained": {"exclude_first": 0, "exclude_special_tokens": False, "normalization": "scale", "text_column": "text",
                     "lr": 1.2e-3, "dead_tokens": 30_003},  # the rules' values then, no longer "0: the rule"
         "imported": {"normalization": "scale"}}


@pytest.mark.parametrize("fixture,kind", [(TRAINED, "trained"), (IMPORTED, "imported")])
def test_written_again_a_cfg_json_keeps_its_keys_and_values(tmp_path, fixture, kind):
    """What other tools (and older saescope) read stays where it was; booleans are now true/false;
    options added since are written with the values the run was made with."""
    before = json.loads(fixture.read_text())
    RunConfig.load(run_folder(tmp_path, fixture)).save(tmp_path / "again")
    after = json.loads((tmp_path / "again" / "cfg.json").read_text())
    assert after.keys() == before.keys() | ADDED[kind].keys()
    assert after == {**{key: bool(value) if isinstance(after[key], bool) else value for key, value in before.items()},
                     **ADDED[kind]}
    assert RunConfig.load(tmp_path / "again") == RunConfig.load(tmp_path)


def test_a_run_trained_before_the_exclusion_says_it_trained_on_every_position(tmp_path):
    cfg = RunConfig.load(run_folder(tmp_path, TRAINED))
    assert cfg.positions.everywhere and cfg.positions.describe() == "every position"
    imported = tmp_path / "imported"
    imported.mkdir()
    assert RunConfig.load(run_folder(imported, IMPORTED)).positions == Positions()  # the harvest's defaults


def test_keys_it_does_not_know_are_kept(tmp_path):
    saved = {**json.loads(IMPORTED.read_text()), "comment": "from a notebook"}
    (tmp_path / "cfg.json").write_text(json.dumps(saved))
    cfg = RunConfig.load(tmp_path)
    assert cfg.extra == {"comment": "from a notebook"}
    cfg.save(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "cfg.json").read_text())["comment"] == "from a notebook"


def test_the_store_record_follows_a_moved_run(tmp_path):
    run, store = tmp_path / "demo" / "runs" / "r", tmp_path / "demo" / "activations"
    store.mkdir(parents=True)
    run.mkdir(parents=True)
    cfg = RunConfig(model="m", layer=0, d_in=4, n_latents=8, k=2).with_store(store, run)
    assert cfg.store.relative == "../../activations" and cfg.store_dir(run) == store.resolve()
    (tmp_path / "demo").rename(tmp_path / "moved")
    assert cfg.store_dir(tmp_path / "moved" / "runs" / "r") == tmp_path / "moved" / "runs" / "r" / "../../activations"


@pytest.mark.parametrize("changes,problem", [
    ({"k": 4096}, "k must be between 1 and n_latents - 1 (4095), got 4096"),
    ({"layer": -1}, "needs layer >= 0 and d_in >= 1"),
    ({"d_in": 1.5}, "must be whole numbers"),
    ({"input_scale": float("inf")}, "input_scale must be a finite number > 0"),
    ({"model": ""}, "model must name a language model"),
])
def test_a_value_out_of_range_is_refused_where_it_is_built(changes, problem):
    cfg = RunConfig.from_json(json.loads(TRAINED.read_text()))
    with pytest.raises(RunFolderError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        replace(cfg, **changes)


def test_training_options_that_cannot_work_name_the_file(tmp_path):
    saved = {**json.loads(TRAINED.read_text()), "epochs": 0}
    (tmp_path / "cfg.json").write_text(json.dumps(saved))
    with pytest.raises(RunFolderError, match=r"cfg.json: the training options are not valid \(--epochs must be at least 1"):
        RunConfig.load(tmp_path)


def test_an_import_of_a_saescope_folder_records_its_source():
    cfg = replace(RunConfig.from_json(json.loads(TRAINED.read_text())), source=ImportSource("saescope"))
    assert not cfg.imported and RunConfig.from_json(cfg.to_json()) == cfg


def test_the_sae_page_says_what_the_training_counted():
    """app.queries.trained_positions, from the cfg the database keeps."""
    from app.queries import trained_positions

    assert trained_positions(json.loads(TRAINED.read_text())) == "every position"  # trained before the exclusion
    assert trained_positions(json.loads(IMPORTED.read_text())) is None  # not trained here
    assert trained_positions(RunConfig.from_training(TrainConfig(), 576, 1.0, None, StoreRecord("/s")).to_json()) == \
        "all but the first position and special tokens"
    assert trained_positions({"model": "m"}) is None  # not a readable cfg: nothing said
