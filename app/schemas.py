"""The JSON API's shapes, for the OpenAPI schema (/docs). The query layer's `as_json` methods
produce them; tests check the fields."""

from __future__ import annotations

from pydantic import BaseModel


class SaeFields(BaseModel):
    id: str
    model: str
    layer: int
    n_latents: int
    k: int
    fvu: float | None
    l0: float | None
    dead_fraction: float | None


class SaeOut(SaeFields):
    url: str
    json_url: str


class IndexOut(BaseModel):
    saes: list[SaeOut]


class SaeDetailOut(SaeFields):
    d_in: int
    context_length: int | None
    cfg: dict
    metrics: dict
    created_at: str


class LatentOut(BaseModel):
    index: int
    density: float
    max_activation: float
    mean_activation: float
    url: str


class SaePageOut(BaseModel):
    sae: SaeDetailOut
    latents: list[LatentOut]
    sort: str
    order: str
    page: int
    per_page: int
    total: int
    pages: int
    prev: str | None
    next: str | None


class TopExampleOut(BaseModel):
    rank: int
    context_id: int
    max_activation: float
    tokens: list[str]
    token_ids: list[int]
    activations: list[float]  # one per token, the latent's activation


class FeatureOut(BaseModel):
    sae_id: str
    index: int
    density: float
    max_activation: float
    mean_activation: float
    top_examples: list[TopExampleOut]
    prev: str | None
    next: str | None
    url: str
    sae_url: str


class ErrorOut(BaseModel):
    detail: str
