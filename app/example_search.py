"""Find latents by example: the latents most specific to a pasted snippet.

    found = await find_by_example(service, sae_id, "try:\\n    x()\\nexcept KeyError:\\n", urls)   # ExampleSearchOut

The snippet is probed as the probe page probes text (app.probe_service: the same checks, limits
and errors: 422 empty or bad text, 413 too long, 404 unknown SAE, 503 no weights or model here,
or busy). Each latent that fires on its counted tokens (the attention-sink position left out, as
the probe and the harvest do) is scored by its summed activation weighted by how rare it is:

    specificity = sum over tokens of activation x log(1 / density)

the probe's "sum" ranking with each latent's self-information in the harvest as its weight, so a
latent that fires on one token in a thousand outranks one that fires on every other token at the
same strength. A latent never seen firing in the harvest counts as rare as the rarest seen.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from app.probe_service import ProbeService
from app.queries import LatentHitOut, Record
from app.urls import URLs

TOKENS_SHOWN = 4  # the snippet's tokens each latent fires on most, shown beside it


def _short(value) -> float:
    """A float32 as a JSON number without float64 noise (6 significant digits), as the probe's."""
    return float(f"{float(value):.6g}")


class ExampleHitOut(LatentHitOut):
    """A latent that fires on the snippet."""

    specificity: float = Field(description="sum over the snippet's counted tokens of activation x log(1 / density)")
    sum: float = Field(description="its activations summed over the counted tokens")
    max: float = Field(description="its largest activation on the snippet")
    n_tokens: int = Field(description="counted tokens it fires on")
    fires_on: list[str] = Field(description="the snippet's tokens it fires on most, strongest first")


class ExampleSearchOut(Record):
    """The latents most specific to a snippet, most specific first."""

    sae: str
    text: str
    n_tokens: int = Field(description="tokens of the snippet, the left-out first position included")
    excluded_positions: list[int] = Field(description="positions left out of the scores (attention sink)")
    latents: list[ExampleHitOut]
    url: str = Field(description="the page showing this result")
    probe_url: str = Field(description="the probe page of the same text: every token's latents")


def specificity(indices: np.ndarray, values: np.ndarray, density: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per latent (n,): specificity, sum, max and count of firings over (T, k) TopK codes."""
    n = len(density)
    fired = values > 0
    total = np.bincount(indices[fired], weights=values[fired], minlength=n)  # (n,)
    count = np.bincount(indices[fired], minlength=n)
    peak = np.zeros(n)
    np.maximum.at(peak, indices[fired], values[fired])
    seen = density[density > 0]
    floor = seen.min() if len(seen) else 1.0
    information = np.log(1 / np.clip(np.maximum(density, floor), None, 1.0))  # (n,) 0 for a latent on every token
    return total * information, total, peak, count


async def find_by_example(service: ProbeService, sae_id: str, text: str, urls: URLs = URLs(),
                          limit: int = 20) -> ExampleSearchOut:
    result, stats = await service.encode(sae_id, text)
    first = min(result.excluded_positions, len(result))
    indices, values = result.indices[first:], result.values[first:]  # (T', k)
    score, total, peak, count = specificity(indices, values, stats.density)
    candidates = np.flatnonzero(count)
    order = candidates[np.lexsort((candidates, -score[candidates]))][:limit]  # ties: the lower index
    latents = []
    for i in order.tolist():
        activations = result.activations_of(i)[first:]  # (T',)
        strongest = [first + p for p in np.argsort(-activations, kind="stable")[:TOKENS_SHOWN].tolist() if activations[p] > 0]
        latents.append(ExampleHitOut(
            index=i, density=float(stats.density[i]), max_activation=float(stats.max_activation[i]),
            explanation=stats.explanation[i], explanation_f1=stats.explanation_f1[i], url=urls.feature(sae_id, i),
            specificity=_short(score[i]), sum=_short(total[i]), max=_short(peak[i]), n_tokens=int(count[i]),
            fires_on=list(dict.fromkeys(result.tokens[p] for p in strongest))))
    return ExampleSearchOut(sae=sae_id, text=text, n_tokens=len(result), excluded_positions=list(range(first)),
                            latents=latents, url=urls.search_example(sae=sae_id, text=text),
                            probe_url=urls.probe(sae_id, text))
