"""`saescope`: one command, a sub-command per stage.

    saescope train   --out RUN [--layer 6 --latents 4096 --k 32 ...]
    saescope eval    RUN
    saescope harvest RUN
    saescope explain RUN --llm-url URL --llm-model NAME [--latents SPEC] [--concurrency N]
                                                 (explanations from a language model, scored by detection)
    saescope import  SAE_FOLDER --out RUN        (an SAE saved by SAELens or sparsify, or OpenAI's .pt file)
    saescope export  RUN --to saelens|sparsify --out DIR   (a folder that tool loads as it is)
    saescope load    RUN --db URL [--replace]     (or a sweep folder: every rung and the ladder)
    saescope serve   --db URL --host H --port P [--preload]
    saescope demo    [--workdir DIR] [--db URL] [--no-serve]   (all of the above on the defaults)
    saescope steer   RUN --prompt TEXT --latent INDEX=STRENGTH [...] [--mode add|clamp] [--tokens 32]
    saescope sweep   --out DIR [--latents 1024,...,32768 --ks 16,32,64 ...]   (a ladder of SAEs, scaling fits)
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import socket
import sys
import time
from pathlib import Path

from trainer.config import (
    SWEEP_TRAIN_DEFAULTS,
    DistributedConfig,
    HarvestConfig,
    SweepConfig,
    TrainConfig,
    add_config_arguments,
    boolean_flags,
    check_device,
    config_from_args,
    config_to_args,
    flag_of,
    with_boolean_words,
)
from trainer.errors import ConfigError, RunFolderError
from trainer.llm_explain import LlmExplainConfig


class CommandError(Exception):
    """Bad input: printed as one line, exit status 2."""


# ------------------------------------------------------------ stages


def cmd_train(args) -> None:
    from trainer import distributed
    from trainer.train import resume, train

    parallel = config_from_args(args, DistributedConfig)
    if args.out and not args.resume and "WORLD_SIZE" not in os.environ:
        check_out_is_free(Path(args.out), args.overwrite, Path(args.store) if args.store else None)
    if parallel.nproc > 1 and "WORLD_SIZE" not in os.environ:  # start torchrun, which runs this on every rank
        check_device(args.device)
        distributed.check_gpus(parallel.nproc, args.device)
        distributed.check_split(config_from_args(args, TrainConfig), parallel.nproc, parallel.shard_latents)
        folders = []
        for name in ("out", "store", "resume"):
            folders += [f"--{name}", getattr(args, name)] if getattr(args, name) else []
        folders += ["--overwrite"] if args.overwrite else []
        sys.exit(distributed.launch(parallel, folders + config_to_args(config_from_args(args, TrainConfig))))
    world = distributed.init_world(parallel.shard_latents, args.device)
    if args.resume:
        if "WORLD_SIZE" not in os.environ:
            warn_ignored_with_resume(args)
        run = resume(_run_dir(args.resume), world)
    elif not args.out:
        raise CommandError("--out RUN is required (or --resume RUN to continue a killed run)")
    else:
        # --overwrite replaces the run's own store (OUT/activations), never one named by --store.
        run = train(config_from_args(args, TrainConfig), args.out, args.store, world, replace_store=args.overwrite and not args.store)
    distributed.finish_world(world)
    if world.writes:
        print(f"trained {run} (held-out metrics: saescope eval {run})")


def warn_ignored_with_resume(args) -> None:
    """--resume continues with the settings the run was started with: say which given ones it ignores."""
    given, default = config_from_args(args, TrainConfig), TrainConfig()
    ignored = [f"{flag_of(f)} {getattr(given, f.name)}" for f in dataclasses.fields(TrainConfig)
               if f.name != "device" and getattr(given, f.name) != getattr(default, f.name)]
    ignored += [f"--{name} {getattr(args, name)}" for name in ("out", "store") if getattr(args, name)]
    ignored += ["--overwrite"] if args.overwrite else []
    if ignored:
        print(f"note: --resume continues {args.resume} with the settings it was started with; ignored: "
              f"{', '.join(ignored)}", file=sys.stderr)


def check_out_is_free(out: Path, overwrite: bool, store: Path | None = None) -> None:
    """A trained SAE or a killed run's checkpoint in --out is not replaced by accident (train()
    itself replaces them: the sweep and the demo retrain a folder whose config changed)."""
    from trainer.formats import SAE_FILE
    from trainer.runconfig import CHECKPOINT_FILE

    for folder in (out, out.parent):
        if folder.exists() and not folder.is_dir():
            raise CommandError(f"--out {out}: {folder} is a file, not a folder")
    if store is not None and store.exists() and not store.is_dir():
        raise CommandError(f"--store {store}: a file, not a folder")
    if overwrite:
        return
    if (out / CHECKPOINT_FILE).exists():
        raise CommandError(f"{out} holds a killed run's checkpoint: continue it with `saescope train --resume {out}`, "
                           "or pass --overwrite to start again")
    if (out / SAE_FILE).exists():
        raise CommandError(f"{out} already holds a trained SAE: pass --overwrite to train a new one there "
                           "(its metrics and harvest go too), or choose another --out")


def cmd_eval(args) -> None:
    from trainer.evaluate import evaluate_run

    if args.downstream_contexts < 0:
        raise CommandError(f"--downstream-contexts must be 0 (no downstream loss) or more, got {args.downstream_contexts}")
    if args.ablation_samples < 0:
        raise CommandError(f"--ablation-samples must be 0 (no ablation sparsity) or more, got {args.ablation_samples}")
    if args.probe_tasks and args.no_probe_loss:
        raise CommandError("--probe-tasks and --no-probe-loss contradict each other: give one")
    metrics = evaluate_run(_run_dir(args.run_dir), args.store, args.downstream_contexts, args.ablation_samples,
                           probe=not args.no_probe_loss, probe_tasks=args.probe_tasks)
    print(" ".join(f"{key}={value:.4g}" for key, value in metrics.items() if isinstance(value, (int, float))))
    if metrics.get("probe_note"):
        print(f"probe loss not measured: {metrics['probe_note']}")
    print(f"(over {metrics['eval_positions']} of the held-out contexts; fvu_all_positions counts every one)")


def cmd_harvest(args) -> None:
    from trainer.harvest import harvest_run

    harvest = harvest_run(_run_dir(args.run_dir), config_from_args(args, HarvestConfig), args.store, args.from_model)
    explained = sum(1 for e in harvest.explanations if e["patterns"])
    print(f"harvested {harvest.n_latents} latents over {harvest.info['n_tokens']:,} tokens "
          f"({harvest.info['n_firings']:,} firings; {explained} latents explained)")


def cmd_explain(args) -> None:
    from trainer.chat import ChatServer
    from trainer.llm_explain import ExplainIncomplete, LlmExplainConfig, explain_run

    run = _run_dir(args.run_dir)
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env, "")
        if not api_key:
            raise CommandError(f"--api-key-env {args.api_key_env}: that environment variable is not set or empty")
    server = ChatServer(args.llm_url, args.llm_model, api_key)
    summary = explain_run(run, server, config_from_args(args, LlmExplainConfig))
    scores = [record.score for record in summary.ok]
    done = f"explained {len(summary.ok)} latents with {server.model}"
    if scores:
        done += f" (mean detection score {sum(scores) / len(scores):.3f}, balanced accuracy: 0.5 is chance)"
    notes = [f"{summary.already} done before" if summary.already else "",
             f"{summary.never_fired} never fired (nothing to explain)" if summary.never_fired else ""]
    print(done + "".join(f"; {note}" for note in notes if note) + f"; in {run / 'llm_explanations.jsonl'}")
    if summary.failed or summary.stopped:
        why = f"stopped: {summary.stopped}; " if summary.stopped else ""
        raise ExplainIncomplete(f"{why}{len(summary.failed)} latents failed and {summary.left} are not explained; what "
                                f"was done is kept: run the same command again to go on")


def cmd_steer(args) -> None:
    from trainer.interventions import steer_run

    lm, pair = steer_run(_run_dir(args.run_dir), args.prompt, args.latent, args.mode, args.tokens, args.temperature,
                         args.top_p, args.seed)
    print(f"prompt:  {args.prompt}")
    print(f"default: {lm.tokenizer.decode(pair.default.token_ids)}")
    print(f"steered: {lm.tokenizer.decode(pair.steered.token_ids)}")
    where = pair.divergence
    print("(identical)" if where is None else f"(they part at new token {where})")


def cmd_import(args) -> None:
    from trainer.interop import detect_format, import_sae

    source = Path(args.source)
    if not source.exists():
        raise CommandError(f"{source}: no such folder or file")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise CommandError(f"--out {args.out}: a file, not a folder")
    run = import_sae(source, args.out, model=args.model, layer=args.layer)
    print(f"imported the {detect_format(source)} SAE {source} into {run}")


def cmd_export(args) -> None:
    from trainer.export import export_run

    folder = export_run(_run_dir(args.run_dir), args.to, args.out)
    loads = {"saelens": f"sae_lens.SAE.load_from_disk({str(folder)!r})",
             "sparsify": f"sparsify.SparseCoder.load_from_disk({str(folder)!r})"}[args.to]
    print(f"exported {args.run_dir} for {args.to} into {folder} (load it with {loads})")


def _check_database(url: str) -> None:
    from app.db import database_problem

    problem = database_problem(url)
    if problem:
        raise CommandError(problem)


def cmd_load(args) -> None:
    from app.loader import load_run
    from app.sweep_loader import is_sweep, load_sweep

    folder = _run_dir(args.run_dir)
    _check_database(args.db)
    if is_sweep(folder):  # a sweep folder: every rung, the ladder's fits and its families
        if args.id:
            raise CommandError("--id names one SAE: a sweep folder's rungs take their ids from their sizes")
        print(f"loaded ladder {load_sweep(folder, args.db, replace=args.replace)} into {args.db}")
        return
    sae_id = load_run(folder, args.db, replace=args.replace, sae_id=args.id)
    print(f"loaded {sae_id} into {args.db}")


def _check_port(port: int) -> None:
    if not 0 <= port <= 65535:
        raise CommandError(f"--port must be from 0 (any free port) to 65535, got {port}")


def server_settings(db: str, host: str | None, port: int | None):
    """The server's Settings from the environment and these options, or one line naming the bad
    setting (pydantic would print a traceback of twenty lines)."""
    from pydantic import ValidationError

    from app.settings import Settings

    if port is not None:
        _check_port(port)
    overrides = {"database_url": db, "host": host, "port": port}
    try:
        return Settings(**{name: value for name, value in overrides.items() if value is not None})
    except ValidationError as e:
        error = e.errors()[0]
        name = str(error["loc"][0]) if error["loc"] else "?"
        raise CommandError(f"setting SAESCOPE_{name.upper()}: {error['msg'].removeprefix('Value error, ')}") from None


def listening_port(host: str, port: int) -> int:
    """The port to serve on: port 0 asks for any free one, chosen here just before the server
    binds it, so that the addresses printed are the real ones."""
    if port:
        return port
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind) as free:
            free.bind(address)
            return free.getsockname()[1]
    except OSError as e:
        raise CommandError(f"cannot listen on {host}: {e}") from None


def cmd_serve(args) -> None:
    from sqlalchemy.engine import make_url

    from app.db import sqlite_file
    from app.server import serve

    settings = server_settings(args.db, args.host, args.port)
    _check_database(args.db)
    if (file := sqlite_file(make_url(args.db))) is not None and not file.exists():  # a typo, or a first start
        print(f"note: {file} does not exist yet: serving an empty database "
              f"(put runs in it with `saescope load RUN --db {args.db}`)", file=sys.stderr)
    if args.preload:  # Settings.probe_preload, read by every server process
        os.environ["SAESCOPE_PROBE_PRELOAD"] = "1"
    port = listening_port(settings.host, settings.port)
    print(f"serving {args.db} at http://{settings.host}:{port}/", flush=True)
    serve(args.db, settings.host, port)


def cmd_sweep(args) -> None:
    from trainer.sweep import run_sweep

    sweep = config_from_args(args, SweepConfig)
    base = config_from_args(args, TrainConfig, n_latents=max(sweep.n_series), k=sweep.k)
    fits = run_sweep(sweep, base, Path(args.out))["fits"]
    for name, fit in fits.items():
        if "skipped" in fit:
            print(f"{name}: skipped ({fit['skipped']})")
            continue
        bound = lambda value: "open" if value is None else f"{value:.3g}"  # noqa: E731
        params = [f"{key}={p['value']:.4g}" + ("" if p["fixed"] else f" [{bound(p['low'])}, {bound(p['high'])}]")
                  for key, p in fit["params"].items()]
        print(f"{name}: R2 {fit['r2']:.4f} (log L: {fit['r2_log']:.4f}); " + ", ".join(params))
    print(f"scaling fits in {Path(args.out) / 'scaling.json'}")


def cmd_demo(args) -> None:
    """corpus -> activations -> train -> eval -> harvest -> load -> serve, skipping stages whose
    output is already there (so a second `saescope demo` goes straight to serving)."""
    from trainer import runfolder
    from trainer.evaluate import evaluate_run
    from trainer.harvest import harvest_run
    from trainer.sweep import trained_with
    from trainer.train import train

    workdir = Path(args.workdir)
    cfg = config_from_args(args, TrainConfig)
    run = workdir / "runs" / cfg.slug
    if workdir.exists() and not workdir.is_dir():
        raise CommandError(f"--workdir {workdir}: a file, not a folder")
    db = args.db or f"sqlite:///{(workdir / 'saescope.db').resolve()}"
    settings = None if args.no_serve else server_settings(db, args.host, args.port)  # before anything is made
    if not args.db:  # the default database lives in the workdir, made here on a first run
        workdir.mkdir(parents=True, exist_ok=True)
    _check_database(db)  # before the stages that take minutes, not after them
    began = time.perf_counter()

    if trained_with(run, cfg):
        print(f"[1/4] train: reusing {run}")
    else:
        print(f"[1/4] train: {cfg.model}, layer {cfg.layer}, {cfg.n_latents} latents, k={cfg.k}, {cfg.tokens:,} tokens")
        train(cfg, run, workdir / "activations")
    if "fvu" in runfolder.load_metrics(run):
        print("[2/4] eval: already done")
    else:
        print("[2/4] eval")
        evaluate_run(run)
    metrics = runfolder.load_metrics(run)
    dead = round(metrics["dead_fraction"] * cfg.n_latents)  # a count: 1 of 4,096 is "0.0%" at one decimal
    print(f"      held-out FVU {metrics['fvu']:.4f}, L0 {metrics['l0']:.1f}, "
          f"dead {dead:,} of {cfg.n_latents:,} latents ({metrics['dead_fraction']:.2%})")
    if "delta_ce" in metrics:
        print(f"      CE clean {metrics['ce_clean']:.3f}, spliced {metrics['ce_spliced']:.3f} (ΔCE {metrics['delta_ce']:+.3f}), "
              f"zero-ablated {metrics['ce_ablated']:.3f}, KL {metrics['kl']:.3f}")
    if runfolder.harvest_is_current(run):
        print("[3/4] harvest: already done")
    else:
        print("[3/4] harvest")
        harvest_run(run)
    print(f"[4/4] load into {db}")
    from app.loader import load_run

    sae_id = load_run(run, db, replace=True)
    print(f"ready in {time.perf_counter() - began:.0f} s")
    if args.no_serve:
        return
    from app.server import serve

    port = listening_port(settings.host, settings.port)
    url = f"http://{settings.host}:{port}"
    print(f"\nserving at {url}/\n  feature pages: {url}/saes/{sae_id}\n  probe: {url}/probe?sae={sae_id}\n", flush=True)
    serve(db, settings.host, port)


def _run_dir(path: str) -> Path:
    run = Path(path)
    if not run.is_dir():
        raise CommandError(f"{run}: " + ("a file, not a run folder" if run.exists() else "no such run folder"))
    return run


# ------------------------------------------------------------ parser


def default_db() -> str:
    """The database URL as the server's Settings read it: $DATABASE_URL, or its alias
    $SAESCOPE_DATABASE_URL, or sqlite:///saescope.db."""
    # Importing pydantic-settings costs about a quarter second of every command's start: only
    # when such a variable is set. The default is Settings' own (tests/app/test_web_cli_db.py).
    if not any(name.upper().endswith("DATABASE_URL") for name in os.environ):
        return "sqlite:///saescope.db"
    from pydantic_settings import BaseSettings

    from app.settings import Settings

    class DatabaseSettings(BaseSettings):
        """Settings' database field alone: a bad value of another setting (say a short admin
        token) is for `saescope serve` to report, not for every command to fail on."""

        model_config = Settings.model_config
        database_url: str = Settings.model_fields["database_url"]

    return DatabaseSettings().database_url


def add_listen_arguments(parser: argparse.ArgumentParser) -> None:
    """serve's and demo's --host and --port (None: the settings say, see server_settings)."""
    parser.add_argument("--host", help="address to listen on (default: $SAESCOPE_HOST or 127.0.0.1; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, help="port to listen on (default: $SAESCOPE_PORT or 8000; 0 for any free port)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saescope", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail, and show an error's traceback")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a TopK SAE into a run folder")
    train.add_argument("--out", help="run folder to write")
    train.add_argument("--resume", metavar="RUN", help="continue a killed run from its last checkpoint (other options are ignored)")
    train.add_argument("--overwrite", action="store_true", help="train even where --out holds a trained SAE or a killed run's checkpoint (replaced, with its metrics and harvest)")
    train.add_argument("--store", help="activation store folder (default: OUT/activations; reused when it matches; a complete store of another configuration there is an error, never overwritten)")
    add_config_arguments(train, TrainConfig)
    add_config_arguments(train, DistributedConfig)
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser("eval", help="evaluate a run on held-out tokens into metrics.json")
    evaluate.add_argument("run_dir", help="run folder")
    evaluate.add_argument("--store", help="activation store (default: the one in cfg.json)")
    evaluate.add_argument("--downstream-contexts", type=int, default=64,
                          help="held-out contexts for downstream loss (splicing into the full model; 0 skips it) (default: 64)")
    evaluate.add_argument("--ablation-samples", type=int, default=24,
                          help="latents whose ablation-effect sparsity is measured (Gao et al. 2024, 4.5), each removed "
                               "at one held-out position where it fires, against random directions of equal norm; "
                               "0 skips it (default: 24)")
    evaluate.add_argument("--probe-tasks", metavar="FILE",
                          help="labelled texts for the probe loss (Gao et al. 2024, 4.4), JSONL: one "
                               '{"task": name, "text": ..., "spans": [[start, end], ...]} per line, spans the positive '
                               "characters (default: the held-out contexts of a Python corpus, labelled by Python's tokenize)")
    evaluate.add_argument("--no-probe-loss", action="store_true", help="skip the probe loss")
    evaluate.set_defaults(func=cmd_eval)

    harvest = commands.add_parser("harvest", help="per-latent statistics and top contexts into RUN/harvest")
    harvest.add_argument("run_dir", help="run folder")
    harvest.add_argument("--store", help="activation store (default: the one in cfg.json)")
    harvest.add_argument("--from-model", action="store_true",
                         help="compute the activations with the model over the store's contexts instead of reading them")
    add_config_arguments(harvest, HarvestConfig)
    harvest.set_defaults(func=cmd_harvest)

    explain = commands.add_parser(
        "explain", help="explanations of latents from a language model (any OpenAI-compatible server), scored by detection")
    explain.add_argument("run_dir", help="run folder (harvested)")
    explain.add_argument("--llm-url", required=True,
                         help="the server: an address ending in /chat/completions is used as given, one ending in /v1 "
                              "gets /chat/completions, any other /v1/chat/completions (http://127.0.0.1:8080 for "
                              "llama.cpp's server, http://127.0.0.1:11434 for Ollama, https://api.openai.com/v1)")
    explain.add_argument("--llm-model", required=True, help="the model name the server knows")
    explain.add_argument("--api-key-env", metavar="VAR",
                         help="environment variable holding an API key, sent as 'Authorization: Bearer KEY'")
    add_config_arguments(explain, LlmExplainConfig)
    explain.set_defaults(func=cmd_explain)

    steering = commands.add_parser("steer", help="continue a prompt as the model does and with latents steered, side by side")
    steering.add_argument("run_dir", help="run folder (harvested: strength 1 is a latent's max activation)")
    steering.add_argument("--prompt", required=True, help="text to continue")
    steering.add_argument("--latent", action="append", required=True, metavar="INDEX=STRENGTH",
                          help="a latent to steer and its strength in multiples of its max activation "
                               "(|strength| <= 100); repeat for up to 8 latents")
    steering.add_argument("--mode", choices=("add", "clamp"), default="add",
                          help="add: strength x max activation x W_dec[i] at every position; clamp: set the "
                               "latent's activation to strength x max activation, the SAE's error kept (default: add)")
    steering.add_argument("--tokens", type=int, default=32, help="new tokens, 1 to 128 (default: 32)")
    steering.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); else sampled, seeded")
    steering.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling's probability mass (default: 1)")
    steering.add_argument("--seed", type=int, default=0, help="the sampler's seed: the same command gives the same text")
    steering.set_defaults(func=cmd_steer)

    imported = commands.add_parser("import", help="turn a SAELens or sparsify SAE folder, or OpenAI's .pt file, into a saescope run folder")
    imported.add_argument("source", help="SAE folder written by SAELens, sparsify or saescope, or a .pt file of OpenAI's "
                                         "sparse_autoencoder (read with torch.load(weights_only=True))")
    imported.add_argument("--out", required=True, help="run folder to write")
    imported.add_argument("--model", help="language model (a local folder, a Hugging Face name), when the source does not "
                                          "name one we can load; an SAE imports without its model for weights-only use "
                                          "(export, the notebook API's run.sae)")
    imported.add_argument("--layer", type=int, help="hookpoint layer, when the source does not say")
    imported.set_defaults(func=cmd_import)

    export = commands.add_parser("export", help="write a run's SAE as a folder SAELens or sparsify loads as it is")
    export.add_argument("run_dir", help="run folder (trained here or imported)")
    export.add_argument("--to", required=True, choices=("saelens", "sparsify"),
                        help="saelens: cfg.json + sae_weights.safetensors (SAE.load_from_disk; SAEBench evaluates it "
                             "through SAELens); sparsify: OUT/<hookpoint>/ with cfg.json + sae.safetensors "
                             "(SparseCoder.load_from_disk). Our input scale is folded into the weights; a per-token "
                             "normalised SAE is SAELens's layer_norm and cannot go to sparsify")
    export.add_argument("--out", required=True, help="folder to write (new, or empty)")
    export.set_defaults(func=cmd_export)

    load = commands.add_parser("load", help="put a run folder, or a sweep folder, into the database (one transaction)")
    load.add_argument("run_dir", help="run folder, or sweep folder (saescope sweep --out): every rung, its fits and families")
    load.add_argument("--db", default=default_db(), help="database URL (default: $DATABASE_URL or sqlite:///saescope.db)")
    load.add_argument("--replace", action="store_true",
                      help="replace an SAE (or a ladder) of the same id with different content")
    load.add_argument("--id", help="the SAE's id in the database and its URLs (default: model-lLAYER-N-kK, "
                                   "e.g. smollm2-135m-instruct-l6-4096-k32)")
    load.set_defaults(func=cmd_load)

    serve = commands.add_parser("serve", help="serve the web app")
    serve.add_argument("--db", default=default_db(), help="database URL (default: $DATABASE_URL or sqlite:///saescope.db)")
    add_listen_arguments(serve)
    serve.add_argument("--preload", action="store_true",
                       help="load every SAE's model at start-up instead of on its first probe")
    serve.set_defaults(func=cmd_serve)

    sweep = commands.add_parser("sweep", help="a ladder of SAEs on one activation store, fitted to scaling laws (resumable)")
    sweep.add_argument("--out", required=True, help="sweep folder (rerun with the same options to resume)")
    add_config_arguments(sweep, SweepConfig)
    add_config_arguments(sweep, TrainConfig, exclude=("n_latents", "k"), defaults=SWEEP_TRAIN_DEFAULTS)
    sweep.set_defaults(func=cmd_sweep)

    demo = commands.add_parser("demo", help="the whole pipeline on the bundled model and the stdlib, then serve")
    demo.add_argument("--workdir", default="demo", help="where activations, runs and the database go (default: ./demo)")
    demo.add_argument("--db", help="database URL (default: sqlite:///WORKDIR/saescope.db)")
    add_listen_arguments(demo)
    demo.add_argument("--no-serve", action="store_true", help="stop after loading the database")
    add_config_arguments(demo, TrainConfig)
    demo.set_defaults(func=cmd_demo)
    for command in commands.choices.values():  # -v after the command too (SUPPRESS: not undoing one before it)
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="log more detail, and show an error's traceback")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:  # `--fast-matmul 0` as scripts wrote it when the boolean options were numbers
        argv = with_boolean_words(argv, boolean_flags(TrainConfig, HarvestConfig, DistributedConfig, SweepConfig,
                                                      LlmExplainConfig))
    except ConfigError as e:
        command = next((arg for arg in argv if not arg.startswith("-")), "")
        print(f"saescope {command}: error: {e}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    for ours in ("trainer", "app"):  # our own progress messages, without third-party chatter
        logging.getLogger(ours).setLevel(logging.INFO)
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # bad input is one line on stderr, not a traceback
        if not _is_user_error(e) or args.verbose:
            raise
        print(f"saescope {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


def _is_user_error(e: Exception) -> bool:
    from trainer.corpus import CorpusError
    from trainer.llm_explain import ExplainIncomplete
    from trainer.model import ModelError
    from trainer.store import StoreError
    from trainer.train import TrainingError

    # A path the user gave that is a file, or not writable: the OS's own one-line reason is clear.
    path_errors = (FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)
    user_errors = (CommandError, ConfigError, CorpusError, ExplainIncomplete, ModelError, RunFolderError, StoreError, TrainingError, *path_errors)
    try:
        from app.db import MigrationError
        from app.loader import LoadError

        user_errors += (LoadError, MigrationError)
    except ImportError:
        pass
    return isinstance(e, user_errors)


if __name__ == "__main__":
    sys.exit(main())
