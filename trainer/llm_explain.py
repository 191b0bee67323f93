"""`saescope explain`: explanations of latents from a language model, scored by detection.

For each latent, two requests to any OpenAI-compatible chat-completions server (trainer/chat.py),
as EleutherAI's delphi does (Paulo et al. 2024, "Automatically interpreting millions of features"):

1. explain: the latent's strongest contexts (the harvest's top examples) and contexts from its
   activation quantiles, a window of each around the firing, the tokens where it fires marked
   «like this»; the model answers with a short phrase.
2. detect: the phrase and `score_contexts` contexts the model has not seen, shuffled: half of them
   the latent's other harvest examples (it fires there), half windows of other contexts where it
   fires at no counted position (found by running the SAE over a seeded sample of the harvest's
   contexts).
   The model answers which ones fire; the score is the balanced accuracy of that answer (0.5 =
   chance, 1 = perfect), with its counts.

Latents go through a bounded thread pool (`concurrency` requests in flight); each finished one is
appended to RUN/llm_explanations.jsonl (trainer/llm_explanations.py), so a killed run loses only
the latents in flight and the next run skips those done by the same model and prompt version.
A latent the server fails on (down, too slow, an HTTP error after the retries, an answer that is
not what was asked) is recorded with the reason, printed, and tried again by the next run.
"""

from __future__ import annotations

import logging
import random
import re
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from trainer import runfolder
from trainer.chat import ChatClient, ChatError, ChatServer
from trainer.config import check_booleans, option
from trainer.errors import ConfigError
from trainer.explain import show
from trainer.llm_explanations import (
    LlmExplanation,
    LlmExplanationWriter,
    balanced_accuracy,
    load_llm_explanations,
)
from trainer.progress import progress
from trainer.runconfig import RunConfig
from trainer.tokens import VocabBytes

log = logging.getLogger(__name__)

# Bump when a prompt or its parsing changes: explanations made otherwise are then made again.
PROMPT_VERSION = 1
MARK_OPEN, MARK_CLOSE = "«", "»"
MAX_EXPLANATION_CHARS = 300


@dataclass
class LlmExplainConfig:
    latents: str = option("all", "which latents: 'all' (every latent that fired in the harvest), indices and "
                                 "ranges '0-99,512', 'top:N' (the N that fire most often), 'random:N' (N drawn "
                                 "with --seed among those that fired); items joined by commas")
    concurrency: int = option(4, "latents in flight at once, so as many requests (threads; a latent's two "
                                 "requests go one after the other)")
    timeout: float = option(60.0, "seconds to wait for the server's answer to one request")
    retries: int = option(3, "retries of a request that failed on the way (no connection, a timeout, HTTP 429 or "
                             "5xx), with exponential backoff")
    explain_top: int = option(10, "top examples shown to the model, strongest first")
    explain_quantile: int = option(10, "examples from the activation quantiles shown too, highest bin first, "
                                       "one per bin in turn")
    score_contexts: int = option(10, "held-out contexts the explanation is scored on: half where the latent "
                                     "fires (examples not shown), half where it does not (an even number)")
    window: int = option(32, "tokens of each context shown: the firing token and those before it (3/4) and after")
    negative_pool: int = option(64, "harvest contexts the model and SAE run over to find, per latent, windows "
                                    "where it does not fire (each from another context)")
    max_failures: int = option(10, "stop after this many latents in a row fail (the server is down, say); 0 never stops")
    seed: int = option(0, "seed of the sampling of latents, examples and contexts and of their order")
    device: str = option("", "torch device for the SAE pass over the pool; empty means cuda when available")

    def __post_init__(self):
        for name in ("concurrency", "explain_top", "window", "negative_pool"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.concurrency > 256:
            raise ConfigError(f"--concurrency must be at most 256, got {self.concurrency}")
        for name in ("explain_quantile", "max_failures", "retries"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}")
        if self.score_contexts < 2 or self.score_contexts % 2:
            raise ConfigError(f"--score-contexts must be an even number of at least 2 (half fire, half do not), "
                              f"got {self.score_contexts}")
        if not self.timeout > 0:
            raise ConfigError(f"--timeout must be a positive number of seconds, got {self.timeout}")
        check_booleans(self)


# ---------------------------------------------------------------- which latents


SPEC_ITEM = re.compile(r"(?:(?P<all>all)|(?P<kind>top|random):(?P<count>\d+)|(?P<first>\d+)(?:-(?P<last>\d+))?)")


def parse_latents(spec: str, density: torch.Tensor, seed: int = 0) -> list[int]:
    """The latents `spec` names (LlmExplainConfig.latents), ascending, those that never fired left
    out (nothing to explain). A malformed item or an index past the SAE is a ConfigError."""
    n = len(density)
    live = (density > 0).nonzero().squeeze(1)
    chosen: set[int] = set()
    items = [item.strip() for item in spec.split(",")]
    if not spec.strip() or not all(items):
        raise ConfigError(f"--latents {spec!r}: give 'all', indices and ranges like '0-99,512', 'top:N' or 'random:N'")
    for item in items:
        match = SPEC_ITEM.fullmatch(item)
        if match is None:
            raise ConfigError(f"--latents: {item!r} is not 'all', an index, a range A-B, 'top:N' or 'random:N'")
        if match["all"]:
            chosen.update(live.tolist())
        elif match["kind"] == "top":
            order = torch.argsort(density[live], descending=True, stable=True)
            chosen.update(live[order[: int(match["count"])]].tolist())
        elif match["kind"] == "random":
            generator = torch.Generator().manual_seed(seed)
            chosen.update(live[torch.randperm(len(live), generator=generator)[: int(match["count"])]].tolist())
        else:
            first, last = int(match["first"]), int(match["last"] or match["first"])
            if first > last:
                raise ConfigError(f"--latents: range {item!r} runs backwards")
            if last >= n:
                raise ConfigError(f"--latents: {item!r} is past the SAE's latents (0-{n - 1})")
            chosen.update(range(first, last + 1))
    return sorted(chosen)


# ---------------------------------------------------------------- what the model is shown


@dataclass(frozen=True)
class Snippet:
    """A window of one harvest context: its token ids, and where the latent fires in it (for the
    marks; empty for a context where it does not fire)."""

    token_ids: tuple[int, ...]
    firing: tuple[bool, ...]


def window_of(length: int, position: int, size: int) -> tuple[int, int]:
    """[start, end) of `size` tokens holding `position`, about 3/4 of them before it: what comes
    before a token is what a causal model's latent can read."""
    start = max(0, min(position - (size * 3) // 4, length - size))
    return start, min(length, start + size)


class TextWriter:
    """Token ids as the text the model reads: each token's piece of the context (a character split
    over byte tokens put back together), newlines and tabs shown as ↵ and ⇥ so that each example
    stays on one line, the firing tokens marked «like this» (a run of them in one pair)."""

    def __init__(self, vocab: list[str], token_bytes: list[str] | None):
        self.vocab, self.split = vocab, VocabBytes(token_bytes)

    def text(self, snippet: Snippet, marked: bool = True) -> str:
        ids = list(snippet.token_ids)
        pieces = self.split.pieces(ids)
        words = [self.vocab[t] if pieces is None else pieces[i].text for i, t in enumerate(ids)]
        out, inside = [], False
        for word, fires in zip(words, snippet.firing):
            fires = fires and marked
            if fires and not inside:
                out.append(MARK_OPEN)
            elif inside and not fires:
                out.append(MARK_CLOSE)
            inside = fires
            out.append(show(word))
        if inside:
            out.append(MARK_CLOSE)
        return "".join(out)


@dataclass
class LatentTask:
    """What one latent's two requests need: the examples shown, and the contexts scored with
    whether the latent fires in each (in the order shown)."""

    latent: int
    shown: list[Snippet]
    scored: list[Snippet]
    fires: list[bool]


@dataclass
class Pool:
    """Harvest contexts the SAE was run over: which latents fire at each counted position."""

    rows: np.ndarray  # (P,) rows of the harvest's contexts
    latents: np.ndarray  # (P, T, k) int32: the latents firing at each position, -1 for none or not counted

    def silent_windows(self, latent: int, size: int) -> np.ndarray:
        """(P, T - size + 1) bool: whether the latent fires nowhere in the window starting there."""
        fires = (self.latents == latent).any(-1)  # (P, T)
        ends = np.concatenate([np.zeros((len(fires), 1), dtype=np.int64), np.cumsum(fires, axis=1)], axis=1)
        return (ends[:, size:] - ends[:, :-size]) == 0


class ExampleSource:
    """The harvest's examples of each latent, split into those shown and those held out, and
    windows of the pool's contexts where each latent does not fire."""

    def __init__(self, harvest: runfolder.Harvest, cfg: LlmExplainConfig, pool: Pool):
        self.h, self.cfg, self.pool = harvest, cfg, pool
        self.tokens = harvest.token_ids.numpy()  # (C, T)

    def snippet(self, context: int, activations: torch.Tensor, position: int) -> Snippet:
        T = self.tokens.shape[1]
        start, end = window_of(T, position, self.cfg.window)
        return Snippet(tuple(self.tokens[context, start:end].tolist()), tuple((activations[start:end] > 0).tolist()))

    def examples(self, latent: int) -> tuple[list[Snippet], list[Snippet]]:
        """(shown, held out): the first explain_top top examples and explain_quantile quantile
        examples (one per bin in turn, highest bin first) are shown; the rest are held out."""
        h = self.h
        top = [self.snippet(int(c), h.top_activations[latent, r], int(h.top_activations[latent, r].argmax()))
               for r, c in enumerate(h.top_context[latent].tolist()) if c >= 0]
        bins = []  # per bin, highest first: its samples
        for q in reversed(range(h.quantile_context.shape[1])):
            bins.append([self.snippet(int(c), h.quantile_activations[latent, q, s], int(h.quantile_position[latent, q, s]))
                         for s, c in enumerate(h.quantile_context[latent, q].tolist()) if c >= 0])
        by_turn = [b[s] for s in range(max(map(len, bins), default=0)) for b in bins if s < len(b)]
        k = self.cfg.explain_top
        shown = top[:k] + by_turn[: self.cfg.explain_quantile]
        return shown, top[k:] + by_turn[self.cfg.explain_quantile :]

    def negatives(self, latent: int, count: int, rng: random.Random) -> list[Snippet]:
        """`count` windows, each of another pool context, where the latent fires at no counted
        position (a window, not the whole context: a latent that fires somewhere in most
        contexts still has silent stretches to be told apart from)."""
        size = min(self.cfg.window, self.tokens.shape[1])
        silent = self.pool.silent_windows(latent, size)  # (P, starts)
        contexts = np.flatnonzero(silent.any(1)).tolist()
        out = []
        for p in rng.sample(contexts, min(count, len(contexts))):
            start = rng.choice(np.flatnonzero(silent[p]).tolist())
            ids = self.tokens[self.pool.rows[p], start : start + size]
            out.append(Snippet(tuple(ids.tolist()), (False,) * size))
        return out

    def task(self, latent: int) -> LatentTask:
        rng = random.Random(f"{self.cfg.seed}:{latent}")
        shown, held = self.examples(latent)
        half = self.cfg.score_contexts // 2
        positives = rng.sample(held, min(half, len(held)))
        negatives = self.negatives(latent, half, rng)
        scored = [(s, True) for s in positives] + [(s, False) for s in negatives]
        rng.shuffle(scored)
        return LatentTask(latent, shown, [s for s, _ in scored], [f for _, f in scored])


def pool_firings(run_dir: Path, run_cfg: RunConfig, harvest: runfolder.Harvest, size: int, seed: int,
                 device: str = "") -> Pool:
    """A seeded sample of `size` harvest contexts and the latents firing at each counted position
    of them (the SAE over the model's activations, as the harvest and the probe encode)."""
    from trainer.inference import LatentEncoder
    from trainer.sae import default_device

    tokens = harvest.token_ids.numpy()
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(tokens), generator=generator)[:size].sort().values.numpy()
    encoder = LatentEncoder.from_run(run_dir, device or default_device())
    counted = run_cfg.positions.mask(tokens[rows], encoder.lm.special_token_ids)
    found = np.full((len(rows), tokens.shape[1], run_cfg.k), -1, dtype=np.int32)
    batch = 16
    with progress(total=len(rows), desc="contexts for scoring", unit="ctx") as bar:
        for first in range(0, len(rows), batch):
            ids = [tokens[r].tolist() for r in rows[first : first + batch]]
            for i, latents in enumerate(encoder.encode_topk_batch(ids), start=first):
                fires = torch.from_numpy(counted[i])[:, None] & (latents.values > 0)  # (T, k)
                found[i] = torch.where(fires, latents.indices, -1).numpy()
            bar.update(len(ids))
    return Pool(rows, found)


# ---------------------------------------------------------------- the two requests


EXPLAIN_SYSTEM = (
    "You explain the latents of a sparse autoencoder trained on a language model's activations. Each latent "
    "fires on certain tokens. You see text excerpts in which it fires, one per line; the tokens where it fires "
    f"are marked {MARK_OPEN}like this{MARK_CLOSE}; ↵ is a line break. Say what the latent responds to in one "
    "short phrase (at most 15 words): the pattern common to the marked tokens and what comes before them. "
    "Answer with one line: 'Explanation: <phrase>'."
)
DETECT_SYSTEM = (
    "A latent of a language model is described by an explanation. You see numbered text excerpts; ↵ is a line "
    "break. For each excerpt, say whether the latent fires somewhere in it (1) or not (0), from the explanation "
    "alone. Answer only with a list of 0s and 1s, one per excerpt, in order, like [1, 0, 0, 1]."
)


# One worked exchange before each request (few-shot, as delphi's prompts do): it shows the form of
# the answer, which small models otherwise miss.
EXPLAIN_EXAMPLE = (
    "Excerpts where the latent fires:\n"
    f"1. ↵{MARK_OPEN}def{MARK_CLOSE} main():↵    return 0\n"
    f"2. class Parser:↵    {MARK_OPEN}def{MARK_CLOSE} __init__(self):\n"
    f"3. ↵↵{MARK_OPEN}async def{MARK_CLOSE} fetch(url):\n\nExplanation:",
    "Explanation: the keyword def that starts a function definition",
)
DETECT_EXAMPLE = (
    "Explanation: the keyword def that starts a function definition\n\nExcerpts:\n"
    "1. ↵def main():↵    return 0\n2. x = [1, 2, 3]\n3. # see the docs\n4.     def close(self):\n\n"
    "Answer with a list of 4 numbers, 0 or 1:",
    "[1, 0, 0, 1]",
)


def explain_messages(task: LatentTask, writer: TextWriter) -> list[dict]:
    lines = "\n".join(f"{i}. {writer.text(s)}" for i, s in enumerate(task.shown, start=1))
    return [{"role": "system", "content": EXPLAIN_SYSTEM},
            {"role": "user", "content": EXPLAIN_EXAMPLE[0]}, {"role": "assistant", "content": EXPLAIN_EXAMPLE[1]},
            {"role": "user", "content": f"Excerpts where the latent fires:\n{lines}\n\nExplanation:"}]


def detect_messages(explanation: str, task: LatentTask, writer: TextWriter) -> list[dict]:
    lines = "\n".join(f"{i}. {writer.text(s, marked=False)}" for i, s in enumerate(task.scored, start=1))
    return [{"role": "system", "content": DETECT_SYSTEM},
            {"role": "user", "content": DETECT_EXAMPLE[0]}, {"role": "assistant", "content": DETECT_EXAMPLE[1]},
            {"role": "user", "content": f"Explanation: {explanation}\n\nExcerpts:\n{lines}\n\n"
                                        f"Answer with a list of {len(task.scored)} numbers, 0 or 1:"}]


class AnswerError(ChatError):
    """The server answered, but not what was asked."""


def parse_explanation(answer: str) -> str:
    """The phrase of an answer like 'Explanation: the keyword def' (the label, quotes, markup, a
    final full stop and any sentence after the first taken off); AnswerError when there is none."""
    text = answer.strip()
    label = list(re.finditer(r"explanation\s*:", text, re.IGNORECASE))
    if label:
        text = text[label[-1].end() :]
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    line = re.split(r"(?<=\w)\.\s", line)[0]  # its first sentence: a small model rambles on
    line = line.strip(" \t*_`").removesuffix(".").strip()
    for left, right in ('""', "''", "“”"):  # quotes around the whole phrase
        if len(line) > 1 and line[0] == left and line[-1] == right:
            line = line[1:-1].strip()
    if not re.search(r"\w", line):
        raise AnswerError(f"the answer holds no explanation: {answer.strip()[:120]!r}")
    return line[:MAX_EXPLANATION_CHARS]


def parse_detection(answer: str, n: int) -> list[bool]:
    """The n answers 0/1 of a list like '[1, 0, 1]' (the first bracketed list of digits; without
    one, the 0s and 1s standing alone in the text when there are exactly n)."""
    for found in re.finditer(r"\[([^\[\]]*)\]", answer):
        items = [item.strip().strip("'\"") for item in re.split(r"[,\s]+", found[1].strip()) if item.strip()]
        if items and all(item in ("0", "1") for item in items):
            if len(items) != n:
                raise AnswerError(f"the answer lists {len(items)} numbers for {n} excerpts: {answer.strip()[:120]!r}")
            return [item == "1" for item in items]
    alone = re.findall(r"(?<![\w.])[01](?![\w.])", answer)
    if len(alone) == n:
        return [item == "1" for item in alone]
    raise AnswerError(f"the answer is not a list of {n} numbers 0 or 1: {answer.strip()[:120]!r}")


EXPLAIN_MAX_TOKENS = 60


def explain_latent(client: ChatClient, task: LatentTask, writer: TextWriter) -> LlmExplanation:
    """Both requests for one latent: its record, status "error" with the reason when either fails."""
    began = time.perf_counter()
    base = {"latent": task.latent, "model": client.server.model, "url": client.server.endpoint,
            "prompt_version": PROMPT_VERSION}
    try:
        if not task.shown:
            raise AnswerError("no examples to show (the harvest kept none)")
        if not any(task.fires) or all(task.fires):
            kind = "where it fires (all its examples are shown)" if not any(task.fires) else "where it does not fire (a dense latent)"
            raise AnswerError(f"no held-out contexts {kind} to score on")
        text = parse_explanation(client.complete(explain_messages(task, writer), EXPLAIN_MAX_TOKENS))
        n = len(task.scored)
        said = parse_detection(client.complete(detect_messages(text, task, writer), 4 * n + 16), n)
    except ChatError as e:
        return LlmExplanation(**base, status="error", error=str(e), seconds=round(time.perf_counter() - began, 3))
    counts = {
        "true_positives": sum(f and s for f, s in zip(task.fires, said)),
        "false_negatives": sum(f and not s for f, s in zip(task.fires, said)),
        "true_negatives": sum(not f and not s for f, s in zip(task.fires, said)),
        "false_positives": sum(not f and s for f, s in zip(task.fires, said)),
    }
    return LlmExplanation(**base, status="ok", text=text, score=round(balanced_accuracy(**counts), 6), **counts,
                          seconds=round(time.perf_counter() - began, 3))


# ---------------------------------------------------------------- the stage


@dataclass
class ExplainSummary:
    asked: int  # latents the spec names that fired
    already: int  # of those, explained before by this model and prompt
    ok: list[LlmExplanation] = field(default_factory=list)
    failed: list[LlmExplanation] = field(default_factory=list)
    never_fired: int = 0
    stopped: str | None = None  # why the run stopped before the end

    @property
    def left(self) -> int:
        return self.asked - self.already - len(self.ok)


class ExplainIncomplete(RuntimeError):
    """Some latents were not explained; what was done is kept (the message says how to go on)."""


def explain_run(run_dir: Path, server: ChatServer, cfg: LlmExplainConfig = LlmExplainConfig(),
                report=None) -> ExplainSummary:
    """Explain and score the latents `cfg.latents` names, appending to RUN/llm_explanations.jsonl;
    latents this model has done with this prompt are skipped. `report(line)` is told of each
    failed latent (default: stderr, above the progress bar)."""
    run_dir = Path(run_dir)
    run_cfg = RunConfig.load(run_dir)
    harvest = runfolder.load_harvest(run_dir, run_cfg)
    client = ChatClient(server, cfg.timeout, cfg.retries)
    wanted = parse_latents(cfg.latents, harvest.density, cfg.seed)
    fired = [latent for latent in wanted if harvest.density[latent] > 0]
    with LlmExplanationWriter(run_dir) as out:  # the lock first: another run may be writing
        done = load_llm_explanations(run_dir, run_cfg.n_latents).done(server.model, PROMPT_VERSION)
        todo = [latent for latent in fired if latent not in done]
        summary = ExplainSummary(asked=len(fired), already=len(fired) - len(todo), never_fired=len(wanted) - len(fired))
        if not todo:
            return summary
        source = ExampleSource(harvest, cfg, pool_firings(run_dir, run_cfg, harvest, cfg.negative_pool, cfg.seed, cfg.device))
        writer = TextWriter(harvest.vocab, harvest.token_bytes)
        report = report or (lambda line: tqdm.write(line, file=sys.stderr))
        run_pool(todo, lambda latent: explain_latent(client, source.task(latent), writer), out, summary, cfg, report)
    return summary


def run_pool(todo: list[int], work, out: LlmExplanationWriter, summary: ExplainSummary, cfg: LlmExplainConfig,
             report) -> None:
    """`work(latent)` for each latent on `cfg.concurrency` threads, at most that many submitted
    at once (a stop or a kill leaves no queue of requests behind); each record appended as it
    comes, in the order they finish."""
    pending = iter(todo)
    in_flight: dict[Future, int] = {}
    failures_in_a_row = 0
    with ThreadPoolExecutor(max_workers=cfg.concurrency, thread_name_prefix="explain") as pool, \
            progress(total=len(todo), desc="explain", unit="latent") as bar:
        def submit() -> None:
            for latent in pending:
                in_flight[pool.submit(work, latent)] = latent
                if len(in_flight) >= cfg.concurrency:
                    return

        submit()
        while in_flight:
            finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in finished:
                del in_flight[future]
                record = future.result()
                out.append(record)
                bar.update(1)
                if record.ok:
                    summary.ok.append(record)
                    failures_in_a_row = 0
                    continue
                summary.failed.append(record)
                failures_in_a_row += 1
                report(f"latent {record.latent}: {record.error}")
            if cfg.max_failures and failures_in_a_row >= cfg.max_failures:
                summary.stopped = f"the last {failures_in_a_row} latents failed"
                for future in in_flight:
                    future.cancel()
                for future in [f for f in in_flight if not f.cancelled()]:
                    record = future.result()  # already asked: keep what it found
                    out.append(record)
                    (summary.ok if record.ok else summary.failed).append(record)
                return
            submit()
