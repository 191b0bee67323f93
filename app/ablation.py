"""The feature page's ablation section: what removing a latent changes over its first top
examples. Computed on the section's first view (trainer.interventions.ablation_effects, on the
steering service's worker; app.routes.features.read_feature_ablation) and kept in
`latent_ablations`, keyed by the SAE's weights, so later views, and the feature page's JSON twin,
read it back; or computed for every latent by `saescope harvest --ablation-examples N`
(RUN/harvest/ablations.safetensors) and written there by the loader (`harvest_records`)."""

from __future__ import annotations

import json
from typing import Literal, NamedTuple

import numpy as np
from pydantic import Field, ValidationError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.models import Context, Example, LatentAblation, Sae
from app.queries import Record

ABLATION_CONTEXTS = 5  # the first top examples the section covers when computed on first view
TOP_TOKENS = 10


class AblationContextOut(Record):
    context_id: int
    tokens: list[str]
    activations: list[float] = Field(description="the latent's activation on each token where it was removed (0 elsewhere)")
    delta_logprob: list[float] = Field(description="per token, the change in its log-probability given the tokens "
                                                   "before it when the latent is removed (0 for the first token)")


class AblationTokenOut(Record):
    token_id: int
    token: str
    change: float = Field(description="the change of its probability as the next token, summed over the positions "
                                      "where the latent was removed (-1.5: it lost 1.5 positions' worth of probability)")


class AblationOut(Record):
    """What removing the latent (its activation set to 0 where it fires, the SAE's error kept) changes."""

    sae_id: str
    index: int
    contexts: list[AblationContextOut] = Field(description=f"its first top examples: {ABLATION_CONTEXTS} when computed on "
                                                           "first view, N with `saescope harvest --ablation-examples N`")
    raised: list[AblationTokenOut] = Field(description="next tokens whose probability the ablation raises most where "
                                                       "it removes the latent")
    lowered: list[AblationTokenOut] = Field(description="... and lowers most")
    scale: float = Field(description="the largest |Δ log-prob| over the contexts: the full shade")
    ranked_by: Literal["probability"] = Field(description="how raised and lowered are ranked: the change of "
                                                          "probability (a section kept from before is computed again)")


def stored_ablation(session: Session, sae_id: str, index: int) -> AblationOut | None:
    """The kept section, if it was computed with the SAE's present weights."""
    row = session.execute(select(LatentAblation.effects).join(Sae, Sae.id == LatentAblation.sae_id)
                          .where(LatentAblation.sae_id == sae_id, LatentAblation.latent == index,
                                 LatentAblation.content_hash == Sae.content_hash)).scalar_one_or_none()
    if row is None:
        return None
    try:
        return AblationOut.model_validate_json(row)
    except ValidationError:  # kept by an older version (its tokens ranked otherwise): computed again
        return None


def top_contexts(session: Session, sae_id: str, index: int) -> list[tuple[int, list[int], list[str]]]:
    """(context id, token ids, tokens) of the latent's first top examples, strongest first."""
    rows = session.execute(
        select(Example.rank, Context.context_id, Context.token_ids, Context.tokens)
        .join(Context, (Context.sae_id == Example.sae_id) & (Context.context_id == Example.context_id))
        .where(Example.sae_id == sae_id, Example.latent_index == index, Example.bin == 0, Example.rank < ABLATION_CONTEXTS)
    ).all()
    return [(context_id, np.frombuffer(ids, dtype="<i4").tolist(), json.loads(tokens))
            for _, context_id, ids, tokens in sorted(rows)]


def ablation_record(sae_id: str, index: int, contexts, effects, strings: dict[int, str]) -> AblationOut:
    """The section's record from trainer.interventions.AblationEffects over `contexts`; `strings`:
    the raised and lowered tokens' text (app.features.token_strings)."""
    delta = effects.delta_logprob
    return AblationOut(
        sae_id=sae_id, index=index,
        contexts=[AblationContextOut(context_id=context_id, tokens=tokens[: delta.shape[1]],
                                     activations=np.round(effects.activations[row], 4).tolist(),
                                     delta_logprob=np.round(delta[row], 5).tolist())
                  for row, (context_id, _, tokens) in enumerate(contexts)],
        raised=[AblationTokenOut(token_id=i, token=strings.get(i, ""), change=round(v, 5)) for i, v in effects.raised[:TOP_TOKENS]],
        lowered=[AblationTokenOut(token_id=i, token=strings.get(i, ""), change=round(v, 5)) for i, v in effects.lowered[:TOP_TOKENS]],
        scale=float(np.abs(delta).max()) if delta.size else 0.0, ranked_by="probability")


def keep_ablation(session: Session, record: AblationOut, content_hash: str) -> None:
    """Store the section (replacing one made with other weights); a concurrent first view's row wins."""
    session.rollback()
    existing = session.get(LatentAblation, (record.sae_id, record.index))
    if existing is not None:
        session.delete(existing)
        session.flush()
    session.add(LatentAblation(sae_id=record.sae_id, latent=record.index, content_hash=content_hash,
                               effects=record.model_dump_json()))
    try:
        session.commit()
    except IntegrityError:
        session.rollback()


def harvest_records(sae_id: str, ablations: dict[str, np.ndarray], top_context: np.ndarray,
                    context_tokens: dict[int, list[str]], vocab: list[str]) -> list[tuple[int, AblationOut]]:
    """(latent, section) for every latent the harvest ablated (runfolder.ABLATION_TENSORS): as
    `ablation_record` makes them on first view, over the latent's top contexts (slots of
    `top_context` (n, K)) whose tokens `context_tokens` gives by context id."""
    activations, delta = ablations["ablation_activations"], ablations["ablation_delta_logprob"]
    N = activations.shape[1]
    records = []
    for latent in range(len(activations)):
        slots = [slot for slot in range(N) if top_context[latent, slot] >= 0]
        if not slots:  # a latent with no top examples: nothing to show (as on first view)
            continue
        contexts = [(int(top_context[latent, slot]), None, context_tokens[int(top_context[latent, slot])]) for slot in slots]
        effects = HarvestEffects(activations[latent, slots], delta[latent, slots],
                                 _tokens(ablations["ablation_raised_ids"][latent], ablations["ablation_raised_change"][latent]),
                                 _tokens(ablations["ablation_lowered_ids"][latent], ablations["ablation_lowered_change"][latent]))
        strings = {i: vocab[i] for i, _ in effects.raised + effects.lowered}
        records.append((latent, ablation_record(sae_id, latent, contexts, effects, strings)))
    return records


class HarvestEffects(NamedTuple):
    """trainer.interventions.AblationEffects's fields that ablation_record reads, from the harvest."""

    activations: np.ndarray
    delta_logprob: np.ndarray
    raised: list[tuple[int, float]]
    lowered: list[tuple[int, float]]


def _tokens(ids: np.ndarray, values: np.ndarray) -> list[tuple[int, float]]:
    return [(int(i), float(v)) for i, v in zip(ids, values) if i >= 0]
