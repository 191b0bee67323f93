"""Shared fixtures: a tiny real model, and the whole pipeline run on it once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_model import make_tiny_model

pytest_plugins = ["tests.tiers"]  # the markers of `make test-fast`, how they are applied, their guards

PAYLOAD = "<script>alert(1)</script>"
TINY_TRAIN_ARGS = [
    "--layer", "1", "--latents", "64", "--k", "4", "--tokens", "8192",
    "--heldout-tokens", "2048", "--context-length", "32", "--batch-size", "256",
]  # fmt: skip


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def hostile_corpus(tmp_path_factory) -> Path:
    """A little stdlib text with an HTML payload every few lines: whichever contexts the
    harvest picks, some of them carry markup that must render as text."""
    from trainer.corpus import stdlib_files

    folder = tmp_path_factory.mktemp("corpus")
    for path in stdlib_files()[:30]:
        lines = path.read_text(encoding="utf-8").splitlines()
        hostile = [line + (f" {PAYLOAD}" if i % 3 == 0 else "") for i, line in enumerate(lines)]
        (folder / f"{path.stem}.txt").write_text("\n".join(hostile))
    return folder


@pytest.fixture(scope="session")
def tiny_run(tiny_model_dir, hostile_corpus, tmp_path_factory) -> Path:
    """train -> eval -> harvest through the CLI, on the tiny model and the hostile corpus."""
    from saescope.cli import main

    run = tmp_path_factory.mktemp("runs") / "tiny"
    args = ["--model", str(tiny_model_dir), "--corpus", str(hostile_corpus), *TINY_TRAIN_ARGS]
    assert main(["train", "--out", str(run), *args]) == 0
    assert main(["eval", str(run)]) == 0
    assert main(["harvest", str(run)]) == 0
    return run


@pytest.fixture(scope="session")
def tiny_db(tiny_run, tmp_path_factory) -> str:
    """A real SQLite file with the tiny run loaded."""
    from saescope.cli import main

    url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'saescope.db'}"
    assert main(["load", str(tiny_run), "--db", url]) == 0
    return url


@pytest.fixture(scope="session")
def tiny_sae_id(tiny_run) -> str:
    """The tiny run's SAE id in the database (tests/app's synthetic run has `synthetic_sae_id`)."""
    from trainer.runconfig import RunConfig

    return RunConfig.load(tiny_run).slug


@pytest.fixture(scope="module")
def tiny_client(tiny_db):
    """The app in-process over the tiny run's SQLite file."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    with TestClient(create_app(Settings(database_url=tiny_db))) as client:
        yield client
