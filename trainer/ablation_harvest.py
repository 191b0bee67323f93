"""Every latent's feature-page ablation section, in the harvest (`saescope harvest
--ablation-examples N`): what removing the latent changes over its first N top contexts, as the
page computes it on first view (trainer.interventions.ablation_effects), written into
RUN/harvest/ablations.safetensors (runfolder.ABLATION_TENSORS) for the loader to store.

The work is ordered by context, not by latent: each context that is some latent's top example
runs through the whole model once (the clean pass: the residual stream at the hookpoint and the
SAE's top k kept), then once from the hookpoint on per latent removed from it, in batches of
`batch` contexts (trainer.interventions.Ablator). A latent's raised and lowered tokens are summed
at the end from each of its contexts' most changed next tokens (kept per slot), so contexts can
come in any order.

A checkpoint (RUN/.harvest.ablations/, written whole every CHECKPOINT_SECONDS) holds the finished
contexts' results; a harvest killed meanwhile and run again with the same SAE, model, contexts
and options continues from it, and saving the harvest removes it (runfolder.save_harvest sweeps
the folders beside RUN/harvest).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainer.files import write_tensors
from trainer.interventions import PAIR_TOKENS, Ablator, CleanPass, LatentReader, summed_top_tokens
from trainer.model import LanguageModel
from trainer.progress import progress

log = logging.getLogger(__name__)

CHECKPOINT_DIR = ".harvest.ablations"  # beside RUN/harvest (the `.harvest.*` that save_harvest sweeps)
CHECKPOINT_FILE = "checkpoint.safetensors"
CHECKPOINT_SECONDS = 60.0
TOP_TOKENS = 10  # raised and lowered tokens kept per latent (the page's)


@dataclass
class Plan:
    """The (latent, slot, context) pairs to ablate, ordered by context, and the contexts in chunks."""

    latent: np.ndarray  # (P,)
    slot: np.ndarray  # (P,) which of the latent's top examples
    context: np.ndarray  # (P,) row into the harvest's token_ids
    contexts: np.ndarray  # (U,) the contexts used, ascending
    batch: int  # contexts per clean pass, and rows per ablated pass (at most the harvest's batch)

    @classmethod
    def of(cls, top_context: np.ndarray, n_examples: int, batch: int) -> "Plan":
        slots = top_context[:, :n_examples]
        latent, slot = np.nonzero(slots >= 0)
        context = slots[latent, slot]
        order = np.argsort(context, kind="stable")
        contexts = np.unique(context)
        n_chunks = max(1, -(-len(contexts) // batch))
        even = max(1, -(-len(contexts) // n_chunks))  # chunks of like size: the last one needs few filler rows
        return cls(latent[order], slot[order], context[order], contexts, even)

    @property
    def n_chunks(self) -> int:
        return -(-len(self.contexts) // self.batch)

    def chunk(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The chunk's contexts, the same filled up to `batch` by repeating its last (every clean
        pass has one shape, which the ablated passes reuse), and the pair ids over them."""
        contexts = self.contexts[index * self.batch : (index + 1) * self.batch]
        first = np.searchsorted(self.context, contexts[0], side="left")
        last = np.searchsorted(self.context, contexts[-1], side="right")
        filled = np.concatenate([contexts, np.repeat(contexts[-1:], self.batch - len(contexts))])
        return contexts, filled, np.arange(first, last)


@dataclass
class State:
    """The results so far, per pair slot: the section's rows, and the next tokens whose
    probability changed most (PairEffect), that the latent's top tokens are summed from."""

    activations: torch.Tensor  # (n, N, T)
    delta: torch.Tensor  # (n, N, T)
    tokens: torch.Tensor  # (n, N, 2 * PAIR_TOKENS) int64, -1: none
    change: torch.Tensor  # (n, N, 2 * PAIR_TOKENS)
    done: int = 0  # chunks finished

    @classmethod
    def empty(cls, n: int, n_examples: int, T: int) -> "State":
        return cls(torch.zeros(n, n_examples, T), torch.zeros(n, n_examples, T),
                   torch.full((n, n_examples, 2 * PAIR_TOKENS), -1), torch.zeros(n, n_examples, 2 * PAIR_TOKENS))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"activations": self.activations, "delta": self.delta, "tokens": self.tokens, "change": self.change}


def plan_key(lm: LanguageModel, reader: LatentReader, plan: Plan, token_ids: np.ndarray, skip_first: int) -> str:
    """What the results depend on: a checkpoint with another key is started again."""
    digest = hashlib.sha256()
    for part in (lm.name, lm.layer, str(lm.forward_dtype), str(reader.dtype), tuple(reader.norm), skip_first, plan.batch,
                 token_ids.shape, TOP_TOKENS, "probability", PAIR_TOKENS):
        digest.update(repr(part).encode())
    for array in (plan.latent, plan.slot, plan.context, np.ascontiguousarray(token_ids[plan.contexts])):
        digest.update(np.ascontiguousarray(array).tobytes())
    for tensor in reader.sae.state_dict().values():
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def load_checkpoint(folder: Path | None, key: str, state: State) -> State:
    path = None if folder is None else folder / CHECKPOINT_FILE
    if path is None or not path.is_file():
        return state
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key:
                log.info("%s is of another SAE, model or contexts: starting again", path)
                return state
            found = {name: f.get_tensor(name) for name in state.tensors()}
    except Exception as e:  # noqa: BLE001: a damaged checkpoint is only lost time
        log.warning("cannot read %s (%s): starting again", path, e)
        return state
    if any(found[name].shape != t.shape for name, t in state.tensors().items()):
        return state
    resumed = State(**found, done=int(meta["done"]))
    log.info("resuming the ablation sections from %s (%d of the contexts' chunks done)", path, resumed.done)
    return resumed


def save_checkpoint(folder: Path | None, key: str, state: State) -> None:
    if folder is not None:
        write_tensors(folder / CHECKPOINT_FILE, state.tensors(), metadata={"key": key, "done": str(state.done)})


@torch.no_grad()
def ablation_sections(lm: LanguageModel, reader: LatentReader, token_ids: np.ndarray, top_context: np.ndarray,
                      n_examples: int, skip_first: int, batch: int, checkpoint: Path | None = None) -> dict[str, torch.Tensor]:
    """runfolder.ABLATION_TENSORS for every latent over its first `n_examples` top contexts
    (`top_context` (n, K) rows into `token_ids` (C, T)), checkpointed in the folder `checkpoint`."""
    n, T = top_context.shape[0], token_ids.shape[1]
    plan = Plan.of(top_context, n_examples, batch)
    key = plan_key(lm, reader, plan, token_ids, skip_first)
    state = load_checkpoint(checkpoint, key, State.empty(n, n_examples, T))
    ablator = Ablator(lm, reader, skip_first)
    done_pairs = int(np.searchsorted(plan.context, plan.contexts[state.done * plan.batch], side="left")) \
        if state.done < plan.n_chunks else len(plan.latent)
    saved = time.monotonic()
    queue: list[tuple[CleanPass, int, int]] = []  # (clean pass, its row, pair id) waiting for an ablated pass

    def run(items):
        effects = ablator.ablate([(clean, row, int(plan.latent[pair])) for clean, row, pair in items], items[0][0].captured)
        for (_, _, pair), effect in zip(items, effects):
            latent, slot = int(plan.latent[pair]), int(plan.slot[pair])
            state.activations[latent, slot], state.delta[latent, slot] = effect.activations.cpu(), effect.delta
            state.tokens[latent, slot], state.change[latent, slot] = effect.tokens, effect.change
        bar.update(len(items))

    with progress(total=len(plan.latent), initial=done_pairs, desc="ablation", unit="example") as bar:
        for index in range(state.done, plan.n_chunks):
            contexts, filled, pairs = plan.chunk(index)
            row_of = {int(c): row for row, c in enumerate(contexts)}
            wanted = [[] for _ in filled]  # the latents removed from each row later (the filler rows: none)
            for pair in pairs:
                wanted[row_of[int(plan.context[pair])]].append(int(plan.latent[pair]))
            clean = ablator.clean(torch.from_numpy(token_ids[filled]), wanted)
            queue += [(clean, row_of[int(plan.context[pair])], int(pair)) for pair in pairs]
            while len(queue) >= plan.batch:
                run(queue[: plan.batch])
                queue = queue[plan.batch :]
            if index == plan.n_chunks - 1 or time.monotonic() - saved >= CHECKPOINT_SECONDS:
                while queue:  # a checkpoint holds whole chunks: the queue is emptied first
                    run(queue[: plan.batch])
                    queue = queue[plan.batch :]
                state.done = index + 1
                save_checkpoint(checkpoint, key, state)
                saved = time.monotonic()
    return finish(ablator, state)


def finish(ablator: Ablator, state: State) -> dict[str, torch.Tensor]:
    n, vocab_size = len(state.tokens), ablator.lm.unembed.weight.shape[0]
    ids = {name: torch.full((n, TOP_TOKENS), -1, dtype=torch.long) for name in ("raised", "lowered")}
    values = {name: torch.zeros(n, TOP_TOKENS) for name in ("raised", "lowered")}
    for latent in (state.tokens >= 0).flatten(1).any(1).nonzero()[:, 0].tolist():
        found = dict(zip(("raised", "lowered"), summed_top_tokens(state.tokens[latent], state.change[latent], vocab_size,
                                                                   TOP_TOKENS)))
        for name, tokens in found.items():
            for j, (token, value) in enumerate(tokens):
                ids[name][latent, j], values[name][latent, j] = token, value
    return {"ablation_activations": state.activations, "ablation_delta_logprob": state.delta,
            "ablation_raised_ids": ids["raised"], "ablation_raised_change": values["raised"],
            "ablation_lowered_ids": ids["lowered"], "ablation_lowered_change": values["lowered"]}
