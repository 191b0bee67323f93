"""The run folder round trip, and one-line errors naming the file at fault."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from tests.synthetic import random_harvest
from trainer import runfolder
from trainer.errors import RunFolderError
from trainer.runconfig import RunConfig


def write_run(folder, n=12, d=6, k=3, K=4, T=5):
    cfg = RunConfig(model="tiny", layer=1, d_in=d, n_latents=n, k=k, input_scale=0.5)
    weights = {"W_enc": torch.randn(d, n), "b_enc": torch.randn(n), "W_dec": torch.randn(n, d), "b_dec": torch.randn(d)}
    cfg.save(folder)
    runfolder.save_sae_weights(folder, weights)
    runfolder.save_metrics(folder, {"fvu": 0.1})
    runfolder.save_metrics(folder, {"l0": 3.0})
    harvest = random_harvest(n, [f"t{i}" for i in range(9)], K=K, T=T, C=7)
    runfolder.save_harvest(folder, harvest)
    return cfg, weights, harvest


def test_round_trip(tmp_path):
    cfg, weights, harvest = write_run(tmp_path)
    assert RunConfig.load(tmp_path) == cfg
    loaded = runfolder.load_sae_weights(tmp_path)
    for name in runfolder.SAE_TENSORS:
        assert_close(loaded[name], weights[name])
    assert runfolder.load_metrics(tmp_path) == {"fvu": 0.1, "l0": 3.0}
    back = runfolder.load_harvest(tmp_path)
    for name, tensor in harvest.tensors.items():
        assert_close(back.tensors[name], tensor.half().float() if tensor.dtype == torch.float16 else tensor,
                     check_dtype=False, msg=name)
    assert back.vocab == harvest.vocab and back.explanations == harvest.explanations
    assert back.info == {**harvest.info, "version": runfolder.HARVEST_VERSION}


def test_an_older_harvest_asks_for_a_new_one(tmp_path):
    write_run(tmp_path)
    info = json.loads((tmp_path / "harvest" / "harvest.json").read_text())
    (tmp_path / "harvest" / "harvest.json").write_text(json.dumps({**info, "version": 1}))
    with pytest.raises(RunFolderError, match=r"harvest.json: made by an older saescope .* run `saescope harvest"):
        runfolder.load_harvest(tmp_path)


def test_a_harvest_tensor_of_the_wrong_shape_is_named(tmp_path):
    _, _, harvest = write_run(tmp_path, n=12, K=4)
    harvest.tensors["quantile_share"] = harvest.tensors["quantile_share"][:, :3]
    runfolder.save_harvest(tmp_path, harvest)
    with pytest.raises(RunFolderError, match=r"latents.safetensors: quantile_share has shape \(12, 3\), expected \(n, Q\) = \(12, 10\)"):
        runfolder.load_harvest(tmp_path)


def test_saelens_tensor_layout(tmp_path):
    from safetensors.torch import load_file

    write_run(tmp_path, n=12, d=6)
    shapes = {name: tuple(t.shape) for name, t in load_file(tmp_path / "sae.safetensors").items()}
    assert shapes == {"W_enc": (6, 12), "b_enc": (12,), "W_dec": (12, 6), "b_dec": (6,)}


@pytest.mark.parametrize(
    "damage,named",
    [
        (lambda p: (p / "sae.safetensors").unlink(), "sae.safetensors"),
        (lambda p: (p / "cfg.json").write_text("{not json"), "cfg.json"),
        (lambda p: (p / "harvest" / "vocab.json").unlink(), "vocab.json"),
        (lambda p: (p / "cfg.json").unlink(), r"not a run folder \(it has no cfg.json\): train one with `saescope train"),
        (lambda p: shutil.rmtree(p / "harvest"), r"not harvested yet \(no harvest/harvest.json\): run `saescope harvest .*` first"),
        (lambda p: (p / "harvest" / "latents.safetensors").write_bytes(b"junk"), "latents.safetensors"),
        # Valid JSON of the wrong kind, and values out of range.
        (lambda p: (p / "cfg.json").write_text("5"), "cfg.json: expected a JSON object, found int"),
        (lambda p: (p / "metrics.json").write_text("[]"), "metrics.json: expected a JSON object, found list"),
        (lambda p: (p / "harvest" / "harvest.json").write_text("null"), "harvest.json: expected a JSON object"),
        (lambda p: edit_cfg(p, k=0), r"cfg.json: k must be between 1 and n_latents - 1 \(11\), got 0"),
        (lambda p: edit_cfg(p, k=12), r"k must be between 1 and n_latents - 1 \(11\), got 12"),
        (lambda p: edit_cfg(p, layer=-1), r"cfg.json: needs layer >= 0 and d_in >= 1"),
        (lambda p: edit_cfg(p, layer="1"), "must be whole numbers"),
        (lambda p: edit_cfg(p, input_scale="x"), "input_scale must be a finite number > 0"),
        (lambda p: runfolder.save_sae_weights(p, {**runfolder.load_sae_weights(p), "b_dec": torch.full((6,), float("nan"))}),
         "sae.safetensors: b_dec hold NaN or infinite values"),
    ],
)
def test_damaged_folder_names_the_file(tmp_path, damage, named):
    write_run(tmp_path)
    damage(tmp_path)
    with pytest.raises(RunFolderError, match=named) as error:
        RunConfig.load(tmp_path)
        runfolder.load_sae_weights(tmp_path)
        runfolder.load_metrics(tmp_path)
        runfolder.load_harvest(tmp_path)
    assert "\n" not in str(error.value)


def edit_cfg(folder, **changes) -> None:
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, **changes}))


def test_shape_mismatch_with_cfg(tmp_path):
    write_run(tmp_path, n=12)
    edit_cfg(tmp_path, n_latents=16)
    with pytest.raises(RunFolderError, match=r"sae.safetensors: W_enc has shape \(6, 12\)"):
        runfolder.load_sae_weights(tmp_path)


def test_slug_is_readable():
    cfg = RunConfig(model="/some/path/SmolLM2-135M-Instruct", layer=6, d_in=576, n_latents=4096, k=32)
    assert cfg.slug == "smollm2-135m-instruct-l6-4096-k32"


# A process that saves a new harvest into a run folder and stops for good at one point of it,
# so that the test can SIGKILL it there (or look at the folder while it waits).
SAVE_AND_STALL = """
import os, sys, time
from pathlib import Path
from trainer import runfolder
from tests.synthetic import random_harvest
from trainer.runconfig import RunConfig

run, point = Path(sys.argv[1]), sys.argv[2]
write_json, replace = runfolder.write_json, os.replace

def stall():
    print("stalled", flush=True)
    time.sleep(600)

def stall_before_swap(path, obj):  # every file of the new harvest is written but harvest.json
    stall() if path.name == "harvest.json" else write_json(path, obj)

def stall_between_renames(src, dst):  # the old harvest moved aside, the new one not yet in place
    replace(src, dst)
    if Path(src).name == "harvest":
        stall()

if point == "before the swap":
    runfolder.write_json = stall_before_swap
else:  # a system without renameat2's exchange: two renames
    runfolder._exchange = lambda a, b: False
    os.replace = stall_between_renames
runfolder.save_harvest(run, random_harvest(12, [f"t{i}" for i in range(9)], K=4, T=5, C=7))
"""


def files_of(folder):
    return {path.name: path.read_bytes() for path in folder.iterdir()}


@pytest.mark.multiprocess
@pytest.mark.parametrize("point", ["before the swap", "between the renames"])
def test_a_harvest_killed_while_it_is_saved_leaves_the_previous_one_whole(tmp_path, point):
    import os
    import signal
    import subprocess
    import sys

    write_run(tmp_path)
    before = files_of(tmp_path / "harvest")
    process = subprocess.Popen([sys.executable, "-c", SAVE_AND_STALL, str(tmp_path), point],
                               stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    assert process.stdout.readline() == "stalled\n"
    moved = tmp_path / f".harvest.old-{process.pid}"
    if point == "between the renames":
        # A reader meanwhile sees no harvest, and leaves the writer's folders alone.
        assert not runfolder.harvest_is_current(tmp_path) and files_of(moved) == before
        runfolder.recover_harvest(tmp_path)  # a writer waits for the live one
        assert not (tmp_path / "harvest").exists()
    process.send_signal(signal.SIGKILL)
    process.wait()

    if point == "between the renames":
        assert files_of(moved) == before
        runfolder.recover_harvest(tmp_path)  # what the next save does first
    assert runfolder.harvest_is_current(tmp_path) and files_of(tmp_path / "harvest") == before
    runfolder.save_harvest(tmp_path, random_harvest(12, ["x"] * 9, K=4, T=5, C=7))  # and it tidies up
    assert runfolder.load_harvest(tmp_path).vocab == ["x"] * 9
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cfg.json", "harvest", "metrics.json", "sae.safetensors"]


def test_a_reader_between_a_saves_renames_does_not_break_it(tmp_path, monkeypatch):
    """Without renameat2 the harvest is missing for a moment; a reader then must not put anything
    back (the writer's second rename would fail, and the new harvest be lost)."""
    write_run(tmp_path)
    monkeypatch.setattr(runfolder, "_exchange", lambda a, b: False)
    replace = os.replace

    def read_between(src, dst):
        replace(src, dst)
        if Path(src).name == "harvest":
            assert not runfolder.harvest_is_current(tmp_path)

    monkeypatch.setattr(os, "replace", read_between)
    runfolder.save_harvest(tmp_path, random_harvest(12, ["y"] * 9, K=4, T=5, C=7))
    assert runfolder.load_harvest(tmp_path).vocab == ["y"] * 9


def test_a_harvest_saved_while_it_is_read_is_read_whole(tmp_path, monkeypatch):
    """A loader reading a run while `saescope harvest` swaps a new harvest in gets one harvest or
    the other, never files of both; one that keeps changing is a clear error."""
    write_run(tmp_path)
    newer = random_harvest(12, ["n"] * 9, K=4, T=5, C=7)
    read_tensors, saves = runfolder.read_tensors, []

    def save_after_the_first_file(path, required):
        found = read_tensors(path, required)
        if path.name == "latents.safetensors" and len(saves) < saves_wanted:  # the first file read
            saves.append(path.name)
            runfolder.save_harvest(tmp_path, newer)  # as another process would, mid-read
        return found

    monkeypatch.setattr(runfolder, "read_tensors", save_after_the_first_file)
    saves_wanted = 1
    back = runfolder.load_harvest(tmp_path)
    assert saves == ["latents.safetensors"] and back.vocab == ["n"] * 9
    for name, tensor in newer.tensors.items():  # every file from the new one
        assert_close(back.tensors[name], tensor.half().float() if tensor.dtype == torch.float16 else tensor,
                     check_dtype=False, msg=name)

    saves.clear()
    saves_wanted = runfolder.HARVEST_READ_TRIES  # a new harvest during every try
    with pytest.raises(RunFolderError, match=r"harvest: rewritten 3 times while it was read; try again"):
        runfolder.load_harvest(tmp_path)


def test_new_weights_drop_every_harvest_beside_them(tmp_path):
    """finish_run's drop_harvest: the harvest and one a killed save left aside, so that none of
    them is put back beside weights they do not describe."""
    write_run(tmp_path)
    shutil.copytree(tmp_path / "harvest", tmp_path / ".harvest.old-999999999")  # no such process
    runfolder.drop_harvest(tmp_path)
    runfolder.recover_harvest(tmp_path)
    assert not runfolder.harvest_is_current(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cfg.json", "metrics.json", "sae.safetensors"]


def test_run_folder_files_take_the_umask_not_private_modes(tmp_path):
    """A lab's server may run as another user than the trainer: the files must be as readable
    as any the user makes (mkstemp and mkdtemp would make them 0600 and 0700)."""
    import os

    mask = os.umask(0o022)
    try:
        write_run(tmp_path)
    finally:
        os.umask(mask)
    for path in [tmp_path / "harvest", *tmp_path.rglob("*.json"), *tmp_path.rglob("*.safetensors")]:
        assert path.stat().st_mode & 0o777 == (0o755 if path.is_dir() else 0o644), path
