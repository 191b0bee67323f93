"""The JSON API's shapes, for the OpenAPI schema (/openapi.json). The query layer's `as_json`
methods produce them; tests check the fields."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


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


class DensityHistogramOut(BaseModel):
    log10_edges: list[float] = Field(description="bin edges in log10(density), increasing")
    counts: list[int] = Field(description="latents per bin (dead latents are not in any bin)")
    dead: int = Field(description="latents that never fired in the harvest")
    dense: int = Field(description="latents firing on more than dense_threshold of the tokens")
    dense_threshold: float


class SaeDetailOut(SaeFields):
    d_in: int
    context_length: int | None
    cfg: dict
    metrics: dict
    created_at: str
    harvest: dict = Field(description="harvest.json: tokens seen, bins, seed, excluded_positions, excluded_token_ids, ...")
    density_histogram: DensityHistogramOut | None
    n_explained: int = Field(description="latents with a scored explanation")
    ladder_id: str | None = Field(description="the scaling ladder it is a rung of (/ladders/{ladder_id}), or null")


class LatentOut(BaseModel):
    index: int
    density: float
    max_activation: float
    mean_activation: float
    explanation: str | None
    explanation_f1: float | None
    url: str


class LatentFilterOut(BaseModel):
    min_density: float | None
    max_density: float | None
    hide_dead: bool
    hide_dense: bool


class SaePageOut(BaseModel):
    sae: SaeDetailOut
    latents: list[LatentOut]
    sort: str
    order: str
    filters: LatentFilterOut
    page: int
    per_page: int
    total: int = Field(description="latents that pass the filters (sorted by explanation_f1: those with a score)")
    pages: int
    prev: str | None
    next: str | None


class ExampleOut(BaseModel):
    rank: int
    context_id: int
    position: int = Field(description="the token shown as firing: the context's peak, or the sampled token of a quantile bin")
    activation: float = Field(description="the latent's activation at position")
    max_activation: float = Field(description="the latent's largest activation in this context")
    snippet: list[int] = Field(description="[start, end) of the tokens the page shows around position")
    tokens: list[str]
    token_ids: list[int]
    activations: list[float] = Field(description="one per token, the latent's activation")


class QuantileOut(BaseModel):
    bin: int = Field(description="1..Q, Q the highest")
    low: float
    high: float
    share: float = Field(description="share of the latent's firings between low and high")
    examples: list[ExampleOut]


class HistogramOut(BaseModel):
    edges: list[float]
    counts: list[int]


class TokenEffectOut(BaseModel):
    token_id: int
    token: str
    value: float


class LogitsOut(BaseModel):
    top: list[TokenEffectOut] = Field(description="tokens whose logit the latent raises most")
    bottom: list[TokenEffectOut] = Field(description="tokens whose logit it lowers most")
    histogram: HistogramOut = Field(description="every vocabulary token's logit effect")


class NeighbourOut(BaseModel):
    index: int
    cosine: float = Field(description="cosine similarity of the two decoder directions")
    explanation: str | None
    density: float
    url: str


class ExplanationOut(BaseModel):
    text: str = Field(description="a token pattern: ⟦ ⟧ marks the token it fires on, ' | ' joins alternatives")
    patterns: list[list[int]] = Field(description="the same as token ids, the last one the firing token")
    precision: float | None = Field(description="on held-out contexts: share of the pattern's matches where it fires")
    recall: float | None = Field(description="on held-out contexts: share of its firings the pattern matches")
    f1: float | None
    matches: int | None
    firings: int | None


class ExcludedOut(BaseModel):
    positions: list[int] = Field(description="context positions left out of every statistic (attention sinks)")
    token_ids: list[int]
    tokens: list[str]


class RelativeOut(BaseModel):
    index: int
    cosine: float = Field(description="cosine similarity of the two decoder directions")
    explanation: str | None
    density: float | None
    url: str


class SizeOut(BaseModel):
    sae_id: str
    n_latents: int
    sae_url: str
    latents: list[RelativeOut] = Field(description="most similar first")


class AcrossSizesOut(BaseModel):
    ladder: str
    ladder_url: str
    smaller: list[SizeOut] = Field(description="each smaller SAE of the ladder with its one nearest latent (what this one was)")
    larger: list[SizeOut] = Field(description="each larger SAE with its nearest latents, up to 5 (what this one splits into)")


class FeatureOut(BaseModel):
    sae_id: str
    index: int
    density: float = Field(description="share of harvest tokens it fires on")
    firings: int | None = Field(description="harvest tokens it fires on")
    n_tokens: int | None = Field(description="harvest tokens the statistics are over")
    max_activation: float
    mean_activation: float = Field(description="over the tokens it fires on")
    histogram: HistogramOut = Field(description="its non-zero activations in equal bins over (0, max_activation]")
    top_examples: list[ExampleOut]
    quantiles: list[QuantileOut] = Field(description="examples sampled per activation quantile, highest bin first")
    logits: LogitsOut
    neighbours: list[NeighbourOut] = Field(description="nearest latents by decoder cosine, most similar first")
    explanation: ExplanationOut | None
    excluded: ExcludedOut
    prev: str | None
    next: str | None
    random: str
    url: str
    sae_url: str
    across_sizes: AcrossSizesOut | None = Field(
        description="when the SAE is in a ladder's n series: its nearest latents in each other size")


class LatentHitOut(BaseModel):
    index: int
    density: float
    max_activation: float
    explanation: str | None
    explanation_f1: float | None
    url: str


class TokenHitOut(LatentHitOut):
    mean_activation: float = Field(description="over every occurrence of the token, zeros included")
    fire_rate: float = Field(description="share of the token's occurrences it fires on")


class TokenMatchOut(BaseModel):
    token_id: int
    token: str
    occurrences: int | None = Field(description="in the harvest tokens")
    latents: list[TokenHitOut] = Field(description="the latents that fire most on it, strongest first")


class SearchOut(BaseModel):
    sae: str | None
    q: str
    terms: list[str] = Field(description="the query's words, as explanations are indexed")
    limit: int
    latent: LatentHitOut | None = Field(description="the latent a number in q names")
    tokens: list[TokenMatchOut] = Field(description="tokens q may mean: as typed, stripped, with one leading space")
    explanations: list[LatentHitOut] = Field(description="latents whose explanation has every word, best score first")
    url: str


class LadderOut(BaseModel):
    id: str
    model: str
    layer: int
    k: int = Field(description="k of the n series")
    n_rungs: int = Field(description="SAEs in scaling.json (the n series and the k series)")
    n_min: int = Field(description="the n series' smallest number of latents")
    n_max: int
    fvu_alpha: float | None = Field(description="the fitted exponent alpha of FVU(n) = c + a n^-alpha, or null")
    url: str
    json_url: str


class LadderIndexOut(BaseModel):
    ladders: list[LadderOut]


class RungOut(BaseModel):
    run: str = Field(description="the rung's run folder, relative to the sweep folder")
    sae_id: str | None = Field(description="the loaded SAE, or null when this rung is not in the database")
    n_latents: int
    k: int
    fvu: float | None
    delta_ce: float | None
    dead_fraction: float | None
    l0: float | None
    url: str | None = Field(description="the SAE's page")


class FitParamOut(BaseModel):
    value: float | None
    low: float | None = Field(description="the interval's ends (null: no interval, or open on that side)")
    high: float | None
    low_open: bool
    high_open: bool
    fixed: bool = Field(description="held at its value: the grid cannot identify it")


class FitPointOut(BaseModel):
    n: int
    k: int
    observed: float
    fitted: float


class FitCurveOut(BaseModel):
    n: float
    k: int
    value: float


class FitOut(BaseModel):
    """A fit of scaling.json (trainer/scaling.py), or {"skipped": why}."""

    skipped: str | None = Field(None, description="why the fit did not run (then no other key)")
    metric: str | None = None
    form: str | None = None
    variables: list[str] | None = None
    k: int | None = Field(None, description="n fits: the k of their rungs")
    params: dict[str, FitParamOut] | None = None
    n_exponent: dict[str, float | None] | None = Field(None, description="joint fits: the exponent of n at each k")
    r2: float | None = None
    r2_log: float | None = None
    rmse_log: float | None = None
    n_points: int | None = None
    dof: int | None = None
    points: list[FitPointOut] | None = None
    curve: list[FitCurveOut] | None = Field(None, description="the fitted law on 41 log-spaced n, for every k")


class LadderPageOut(BaseModel):
    ladder: LadderOut
    rungs: list[RungOut] = Field(description="every SAE of the sweep, smallest n first, then k")
    fits: dict[str, FitOut] = Field(description="fvu_n, delta_ce_n, fvu_joint, delta_ce_joint")
    interval: dict | None = Field(description='{"method": "profile", "level": 0.95}')
    paper: dict | None = Field(description="the paper's reference values, for comparison")
    sweep: dict = Field(description="the sweep's options (sweep.json)")
    train: dict = Field(description="the training options every rung shares")
    url: str


class ErrorOut(BaseModel):
    detail: str


class FieldErrorOut(BaseModel):
    """One part of a request that FastAPI's validation rejected (its other keys, such as `input`
    and `ctx`, may follow)."""

    model_config = ConfigDict(extra="allow")

    loc: list[str | int] = Field(description='where: "body", "query" or "path", then the field')
    msg: str
    type: str


class InvalidRequestOut(BaseModel):
    """A 422: either of the two shapes that share the status."""

    detail: str | list[FieldErrorOut] = Field(
        description="a sentence when the text fails the probe's own checks (empty, a control character, a lone "
                    "surrogate), or FastAPI's list of the fields that failed validation (a missing field, top_k=0)")
