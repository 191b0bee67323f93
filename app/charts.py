"""Charts as server-rendered SVG: the geometry (`bar_chart`, `line_chart`), then the markup (`svg`).

No chart library and no script: a chart is numbers placed in a viewBox, with labelled axes and a
<title> on every bar, so it works offline, prints, and reads the same in every browser.

    {{ chart_svg(activation_chart(feature.histogram), "activations") }}   (in a template)

The markup is written here rather than by a Jinja macro for the same reason as token chips
(app.render.token_chips): a feature page draws two charts of dozens of bars, and the macro was a
fifth of the page's rendering time. Every text in it (titles, labels) is escaped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from markupsafe import Markup, escape

# The drawing area inside the viewBox: room on the left for count labels, below for the axis,
# on the right for the last tick's label.
WIDTH, HEIGHT = 520, 200
LEFT, RIGHT, TOP, BOTTOM = 52, 20, 10, 42


# Positions are kept as short strings ("12.5"), formatted once.


@dataclass
class Bar:
    x: str
    width: str
    y: str
    height: str
    title: str  # shown on hover: the bin's range and count


@dataclass
class Tick:
    at: str  # position along the axis, in viewBox units
    label: str


@dataclass
class Marker:
    """A dashed vertical line at a value, e.g. the dense threshold or zero."""

    at: str
    label: str


@dataclass(kw_only=True)
class Frame:
    """What every chart has: a title, axes with ticks and labels, and the drawing area."""

    title: str  # the chart's accessible name
    x_ticks: list[Tick]
    y_ticks: list[Tick]
    x_label: str
    y_label: str
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    top: int = TOP
    bottom: int = HEIGHT - BOTTOM

    @property
    def right(self) -> int:
        return self.width - RIGHT


@dataclass(kw_only=True)
class BarChart(Frame):
    bars: list[Bar]
    markers: list[Marker]

    @property
    def empty(self) -> bool:
        return not any(bar.height > 0 for bar in self.bars)


@dataclass
class Point:
    x: str
    y: str
    title: str  # shown on hover: what the point is and its values


@dataclass
class Line:
    """One series: a polyline through its points, and a marker at each when `markers`."""

    label: str  # in the legend
    points: list[Point]
    css: str  # the series' class: its colour, and "fit" for a dashed fitted curve
    markers: bool = True


@dataclass(kw_only=True)
class LineChart(Frame):
    lines: list[Line]
    legend: bool = True

    @property
    def empty(self) -> bool:
        return not any(line.points for line in self.lines)


def bar_chart(edges: list[float], counts: list[int], *, title: str, x_label: str, y_label: str,
              describe: Callable[[float, float, int], str], x_format: Callable[[float], str] = None,
              x_ticks: list[float] | None = None, markers: dict[float, str] | None = None, width: int = WIDTH) -> BarChart:
    """Bars over bins [edges[i], edges[i+1]) with heights counts[i] on a linear count axis.

    `describe(low, high, count)` writes each bar's hover title; x ticks are `x_ticks` or a few
    round values between the first and last edge, labelled with `x_format`."""
    x_format = x_format or short
    low, high = (edges[0], edges[-1]) if len(edges) > 1 and edges[-1] > edges[0] else (0.0, 1.0)
    top_count = max(counts, default=0)
    y_max = nice_ceiling(top_count)

    def x(value: float) -> float:
        return LEFT + (value - low) / (high - low) * (width - RIGHT - LEFT)

    def y(count: float) -> float:
        return HEIGHT - BOTTOM - count / y_max * (HEIGHT - BOTTOM - TOP)

    bars = [Bar(at(x(a)), at(max(x(b) - x(a), 0.5)), at(y(c)), at(y(0) - y(c)), describe(a, b, c))
            for a, b, c in zip(edges, edges[1:], counts)]
    ticks = x_ticks if x_ticks is not None else nice_ticks(low, high)
    return BarChart(
        title=title, bars=bars, x_label=x_label, y_label=y_label,
        x_ticks=[Tick(at(x(t)), x_format(t)) for t in ticks if low <= t <= high],
        y_ticks=[Tick(at(y(t)), f"{t:,.0f}") for t in nice_ticks(0, y_max, 4)],
        markers=[Marker(at(x(value)), label) for value, label in (markers or {}).items() if low <= value <= high],
        width=width,
    )


@dataclass
class Series:
    """A line chart's input: (x, y, hover title) values, drawn in order."""

    label: str
    css: str
    values: list[tuple[float, float, str]]
    markers: bool = True


def line_chart(series: list[Series], *, title: str, x_label: str, y_label: str, x_ticks: list[float],
               x_format: Callable[[float], str] = None, y_log: bool = True, legend: bool = True,
               width: int = WIDTH, y_counts: bool = False, y_below_1: bool = False) -> LineChart:
    """Lines on a log x axis (ticks at `x_ticks`) and a log y axis (a linear one with `y_log`
    False, or when a value is not positive); a log axis leaves out values <= 0. `y_counts`: the
    values are whole numbers, so are the linear y axis's ticks. A linear axis reaches at least 1
    (a share of 0.05 % stays small) unless `y_below_1`: then it ends at a round number above the
    values, with room for the legend."""
    x_format = x_format or short
    y_log = y_log and all(y > 0 for line in series for _, y, _ in line.values)
    series = [Series(line.label, line.css, [v for v in line.values if v[0] > 0 and math.isfinite(v[1])], line.markers)
              for line in series]
    xs = [x for line in series for x, _, _ in line.values] or [1.0]
    ys = [y for line in series for _, y, _ in line.values] or [1.0]
    x_scale = Scale(min(xs) / 1.15, max(xs) * 1.15, LEFT, width - RIGHT, log=True)
    if y_log:
        y_scale = Scale(min(ys) / 1.15, max(ys) * 1.15, HEIGHT - BOTTOM, TOP, log=True)
        y_values = log_ticks(y_scale.low, y_scale.high)
    else:
        low, high = min(0.0, min(ys)), max(ys)
        room = high * 1.4  # the legend sits in the top right corner
        if y_below_1 and 0 < room < 1:
            step = nice_step(room / 4)
            top = step * math.ceil(room / step)
        else:
            top = nice_ceiling(high)
        y_values = nice_ticks(low, top if high > low else low + 1, 4)
        y_values = [t for t in y_values if t == int(t)] if y_counts else y_values
        y_scale = Scale(y_values[0], y_values[-1] if y_values[-1] > y_values[0] else y_values[0] + 1, HEIGHT - BOTTOM, TOP)
    lines = [Line(line.label, [Point(at(x_scale(x)), at(y_scale(y)), text) for x, y, text in line.values], line.css,
                  line.markers) for line in series]
    shown = [t for t in x_ticks if x_scale.low <= t <= x_scale.high]
    shown = shown[::2] if len(shown) > 8 else shown  # labels need room
    return LineChart(title=title, lines=lines, x_label=x_label, y_label=y_label, width=width, legend=legend,
                     x_ticks=[Tick(at(x_scale(t)), x_format(t)) for t in shown],
                     y_ticks=[Tick(at(y_scale(t)), short(t)) for t in y_values])


@dataclass
class Scale:
    """Values from [low, high] to positions from `start` to `end`, linearly or in log space."""

    low: float
    high: float
    start: float
    end: float
    log: bool = False

    def __call__(self, value: float) -> float:
        f = math.log if self.log else (lambda v: v)
        span = (f(self.high) - f(self.low)) or 1.0
        return self.start + (f(value) - f(self.low)) / span * (self.end - self.start)


def log_ticks(low: float, high: float) -> list[float]:
    """Round values for a log axis over [low, high]: powers of ten first, then 2 and 5 times them,
    then the other digits, each kept only where it is not crowding a rounder one already there
    (0.1 wins over 0.09); a range too narrow for three of them gets linear round values."""
    decades = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
    gap = (math.log10(high) - math.log10(low)) / 7
    ticks: list[float] = []
    for mantissas in ((1,), (2, 5), (3, 4, 6, 7, 8, 9)):
        for tick in (round(m * 10.0**e, 12) for e in decades for m in mantissas):
            if low <= tick <= high and all(abs(math.log10(tick / t)) >= gap for t in ticks):
                ticks.append(tick)
        if len(ticks) >= 3:
            return sorted(ticks)
    return [t for t in nice_ticks(low, high, 4) if t > 0]


def at(position: float) -> str:
    return f"{position:.1f}"


def svg(chart: Frame, class_name: str = "") -> Markup:
    """The chart as an <svg> element: grid and y labels, the bars (a group per bar: a
    full-height hit area and the bar, under the bar's <title>) and markers, or the lines (a
    polyline each, a group per point under its <title>, a legend), then axes, ticks and labels."""
    left, right, top, bottom = chart.left, chart.right, chart.top, chart.bottom
    parts = [f'<svg class="chart {escape(class_name)}" viewBox="0 0 {chart.width} {chart.height}" role="img" '
             f'aria-label="{escape(chart.title)}"><title>{escape(chart.title)}</title>']
    for tick in chart.y_ticks:
        parts.append(f'<line class="grid" x1="{left}" x2="{right}" y1="{tick.at}" y2="{tick.at}"/>'
                     f'<text class="tick y" x="{left - 6}" y="{tick.at}">{escape(tick.label)}</text>')
    parts += _lines(chart) if isinstance(chart, LineChart) else _bars(chart)
    parts.append(f'<line class="axis" x1="{left}" x2="{right}" y1="{bottom}" y2="{bottom}"/>'
                 f'<line class="axis" x1="{left}" x2="{left}" y1="{top}" y2="{bottom}"/>')
    for tick in chart.x_ticks:
        parts.append(f'<line class="axis" x1="{tick.at}" x2="{tick.at}" y1="{bottom}" y2="{bottom + 4}"/>'
                     f'<text class="tick x" x="{tick.at}" y="{bottom + 15}">{escape(tick.label)}</text>')
    parts.append(f'<text class="axis-label x" x="{(left + right) / 2}" y="{chart.height - 4}">{escape(chart.x_label)}</text>'
                 f'<text class="axis-label y" transform="translate(12 {(top + bottom) / 2}) rotate(-90)">'
                 f'{escape(chart.y_label)}</text></svg>')
    return Markup("".join(parts))


def _bars(chart: BarChart) -> list[str]:
    top, bottom = chart.top, chart.bottom
    parts = [f'<g class="bin"><title>{escape(bar.title)}</title>'
             f'<rect class="hist-hit" x="{bar.x}" y="{top}" width="{bar.width}" height="{bottom - top}"/>'
             f'<rect class="hist-bar" x="{bar.x}" y="{bar.y}" width="{bar.width}" height="{bar.height}"/></g>'
             for bar in chart.bars]
    for marker in chart.markers:
        parts.append(f'<line class="marker" x1="{marker.at}" x2="{marker.at}" y1="{top}" y2="{bottom}"/>'
                     f'<text class="marker-label" x="{marker.at}" dx="3" y="{top + 9}">{escape(marker.label)}</text>')
    return parts


def _lines(chart: LineChart) -> list[str]:
    parts = []
    for line in chart.lines:
        css = escape(line.css)
        parts.append(f'<polyline class="series {css}" points="{" ".join(f"{p.x},{p.y}" for p in line.points)}"/>')
        if line.markers:
            parts += [f'<g class="point {css}"><title>{escape(p.title)}</title>'
                      f'<circle class="hit" cx="{p.x}" cy="{p.y}" r="8"/><circle cx="{p.x}" cy="{p.y}" r="3.5"/></g>'
                      for p in line.points]
    for i, line in enumerate(chart.lines if chart.legend else []):  # the legend, top right, a row per series
        y = chart.top + 8 + 13 * i
        parts.append(f'<g class="legend {escape(line.css)}"><line class="series" x1="{chart.right - 150}" x2="{chart.right - 132}" '
                     f'y1="{y}" y2="{y}"/><text x="{chart.right - 127}" y="{y}" dy="3">{escape(line.label)}</text></g>')
    return parts


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round values (1, 2 or 5 times a power of ten apart) covering [low, high]."""
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        return [low]
    step = nice_step((high - low) / count)
    first = math.ceil(low / step - 1e-9)
    return [round(i * step, 10) for i in range(first, math.floor(high / step + 1e-9) + 1)]


def nice_step(raw: float) -> float:
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw * 0.999)


def nice_ceiling(value: float) -> float:
    """The smallest round number (1, 2 or 5 times a power of ten, or a multiple) >= value, at least 1."""
    if value <= 1:
        return 1
    step = nice_step(value / 4)
    return math.ceil(value / step) * step


def short(value: float) -> str:
    """A tick label: few digits, no trailing zeros."""
    if value == 0:
        return "0"
    if abs(value) >= 1000 or abs(value) < 0.01:
        return f"{value:.0e}".replace("e-0", "e-").replace("e+0", "e")
    return f"{value:.3g}"


def percent_of_tokens(log10_density: float) -> str:
    """A log10 density as the percentage of tokens it means (-2 -> 1%)."""
    return f"{10 ** log10_density * 100:.6g}%"


# ---------------------------------------------------------------- the app's charts


def activation_chart(histogram) -> BarChart:
    """A latent's non-zero activations (app.features.HistogramOut)."""
    total = sum(histogram.counts) or 1
    return bar_chart(
        histogram.edges, histogram.counts, title="Histogram of the latent's activations where it fires",
        x_label="activation", y_label="firings",
        describe=lambda a, b, c: f"activation {a:.3g} to {b:.3g}: {c:,} firings ({c / total:.1%})")


def logit_chart(histogram) -> BarChart:
    """How much the latent raises or lowers each vocabulary token's logit."""
    return bar_chart(
        histogram.edges, histogram.counts, title="Histogram of the latent's logit effects over the vocabulary",
        x_label="logit effect", y_label="tokens", markers={0.0: "0"},
        describe=lambda a, b, c: f"logit effect {a:.3g} to {b:.3g}: {c:,} tokens")


def density_chart(histogram) -> BarChart:
    """An SAE's latents by log10 density (app.queries.DensityHistogramOut), dead ones aside."""
    edges = histogram.log10_edges
    decades = [float(d) for d in range(math.ceil(edges[0]), math.floor(edges[-1]) + 1)]
    threshold = math.log10(histogram.dense_threshold)
    return bar_chart(
        edges, histogram.counts, title="Histogram of latent densities (log scale)",
        x_label="density: share of tokens it fires on (log scale)", y_label="latents",
        x_ticks=decades, x_format=percent_of_tokens, markers={threshold: "dense"}, width=2 * WIDTH,
        describe=lambda a, b, c: f"density {percent_of_tokens(a)} to {percent_of_tokens(b)}: {c:,} latents")


def size_label(n: float) -> str:
    """A latent count as a tick label: 512, 4k, 32k, 1M."""
    for unit, suffix in ((2**20, "M"), (2**10, "k")):
        if n >= unit and n % unit == 0:
            return f"{int(n // unit)}{suffix}"
    return f"{n:,.0f}"


def scaling_chart(ladder, metric: str, name: str) -> LineChart:
    """One metric of a ladder's n series against n, log-log, with its fitted L(n) (`ladder`: an
    app.ladders.LadderPageOut)."""
    k = ladder.ladder.k
    fit = ladder.fits.get(f"{metric}_n", {})
    fitted = {point["n"]: point["fitted"] for point in fit.get("points", [])}
    rungs = [(rung.n_latents, getattr(rung, metric)) for rung in ladder.n_series if getattr(rung, metric) is not None]
    lines = [Series(f"SAEs at k = {k}", "observed", [
        (n, value, f"n = {n:,}, k = {k}: {name} {value:.4g}" + (f" (fit {fitted[n]:.4g})" if n in fitted else ""))
        for n, value in rungs])]
    if "curve" in fit:
        lines.append(Series("fit c + a·n^−α", "fit", [(p["n"], p["value"], "") for p in fit["curve"]], markers=False))
    return line_chart(lines, title=f"{name} against the number of latents n (log–log)", x_label="latents n (log scale)",
                      y_label=f"{name} (log scale)", x_ticks=[n for n, _ in rungs], x_format=size_label)


def k_series_chart(ladder) -> LineChart:
    """FVU against k at each n the sweep trained at several k."""
    lines = [Series(f"n = {n:,}", f"s{i}", [(r.k, r.fvu, f"n = {n:,}, k = {r.k}: FVU {r.fvu:.4g}")
                                             for r in rungs if r.fvu is not None])
             for i, (n, rungs) in enumerate(sorted(ladder.k_series.items()))]
    ks = sorted({r.k for rungs in ladder.k_series.values() for r in rungs})
    return line_chart(lines, title="FVU against k at fixed n (log–log)", x_label="k: latents active per token (log scale)",
                      y_label="FVU (log scale)", x_ticks=ks, x_format=lambda k: f"{k:g}")


def dead_chart(ladder) -> LineChart:
    """The share of dead latents in each SAE of the n series."""
    k = ladder.ladder.k
    rungs = [(r.n_latents, r.dead_fraction) for r in ladder.n_series if r.dead_fraction is not None]
    line = Series("dead latents", "dead", [(n, 100 * dead, f"n = {n:,}, k = {k}: {dead:.2%} dead") for n, dead in rungs])
    return line_chart([line], title="Dead latents against n", x_label="latents n (log scale)",
                      y_label="dead latents (%)", x_ticks=[n for n, _ in rungs], x_format=size_label, y_log=False,
                      legend=False)


SERIES_COLOURS = 6  # s0 .. s5 in static/style.css


def ladder_training_chart(ladder) -> LineChart:
    """The training FVU of each SAE of the n series against the tokens trained on (log–log): whether
    the larger SAEs were still improving when their tokens ran out."""
    k, lines = ladder.ladder.k, []
    for i, rung in enumerate(r for r in ladder.n_series if r.sae_id in ladder.curves):
        curve = ladder.curves[rung.sae_id]
        points = [(t, f, f"n = {rung.n_latents:,}, k = {k}, {t:,} tokens: FVU {f:.4g}")
                  for t, f in zip(curve["tokens"], curve["fvu"]) if f is not None]
        lines.append(Series(f"n = {rung.n_latents:,}", f"s{i % SERIES_COLOURS}", points, markers=False))
    tokens = [t for line in lines for t, _, _ in line.values] or [1]
    return line_chart(lines, title="FVU of the training batches against tokens trained on, per SAE (log–log)",
                      x_label="tokens trained on (log scale)", y_label="training FVU (log scale)",
                      x_ticks=log_ticks(min(tokens), max(tokens)), x_format=tokens_label)


def tokens_label(n: float) -> str:
    """A token count as a tick label: 500, 2k, 300k, 1.5M."""
    for unit, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= unit:
            return f"{n / unit:g}{suffix}"
    return f"{n:g}"


def training_charts(curve: dict) -> tuple[LineChart, LineChart]:
    """metrics.json's train_curve: the batches' FVU (log–log) and AuxK's dead latents, each
    against the tokens trained on."""
    points = [(t, fvu, dead) for t, fvu, dead in zip(curve["tokens"], curve["fvu"], curve["dead"]) if fvu is not None]
    ticks = log_ticks(points[0][0], points[-1][0]) if points else []
    titles = [f"{t:,} tokens: FVU {f:.4g}, {d:,} dead" for t, f, d in points]  # each point's hover text, on both
    fvu = Series("FVU", "observed", [(t, f, title) for (t, f, _), title in zip(points, titles)])
    dead = Series("dead", "s1", [(t, d, title) for (t, _, d), title in zip(points, titles)])
    common = {"x_label": "tokens trained on (log scale)", "x_ticks": ticks, "x_format": tokens_label, "legend": False}
    return (line_chart([fvu], title="FVU of the training batches against tokens trained on (log–log)",
                       y_label="FVU (log scale)", **common),
            line_chart([dead], title="Dead latents during training against tokens trained on",
                       y_label="dead latents", y_log=False, y_counts=True, **common))


def progressive_chart(quality, k: int) -> LineChart:
    """FVU when the SAE encodes with k' latents instead of its k (log–log; an app.quality.QualityOut):
    a TopK SAE trained at k alone degrades above k, a Multi-TopK one keeps improving (Gao et al.
    2024, Section 5.3)."""
    points = [(p.k, p.fvu, f"k' = {p.k}{' (the SAE’s k)' if p.k == k else ''}: FVU {p.fvu:.4g}") for p in quality.progressive_fvu]
    return line_chart([Series("FVU at k'", "observed", points)], title="FVU against the latents kept per token k' (log–log)",
                      x_label="k': latents kept per token (log scale)", y_label="FVU (log scale)",
                      x_ticks=[p.k for p in quality.progressive_fvu], x_format=lambda value: f"{value:g}", legend=False)


def probe_chart(ladder) -> LineChart:
    """Probe loss of each SAE of the n series against n, with the residual stream's best dimension,
    the dense probe and the base rate (the same data for every SAE: flat lines) as references."""
    k, rungs = ladder.ladder.k, [r for r in ladder.n_series if r.probe_loss is not None]
    lines = [Series(name, css, [(r.n_latents, getattr(r, key), f"n = {r.n_latents:,}, k = {k}: {name} {getattr(r, key):.4g} nats")
                                for r in rungs if getattr(r, key) is not None])
             for name, css, key in (("best latent", "observed", "probe_loss"), ("best residual dimension", "s1", "probe_residual_loss"),
                                    ("dense probe", "s2", "probe_dense_loss"), ("base rate", "s3", "probe_base_entropy"))]
    return line_chart(lines, title="Probe loss against n", x_label="latents n (log scale)",
                      y_label="test cross-entropy (nats)", x_ticks=[r.n_latents for r in rungs], x_format=size_label,
                      y_log=False)


def ablation_chart(ladder) -> LineChart:
    """Sparsity of ablation effects of each SAE of the n series against n, with random directions
    of the same norm removed at the same positions as the reference."""
    k, rungs = ladder.ladder.k, [r for r in ladder.n_series if r.ablation_sparsity is not None]
    lines = [Series(name, css, [(r.n_latents, getattr(r, key), f"n = {r.n_latents:,}, k = {k}: {name} {getattr(r, key):.4f}")
                                for r in rungs if getattr(r, key) is not None])
             for name, css, key in (("latents", "observed", "ablation_sparsity"),
                                    ("random directions", "s1", "ablation_sparsity_random"))]
    return line_chart(lines, title="Ablation sparsity against n", x_label="latents n (log scale)",
                      y_label="(L1/L2)² / size", x_ticks=[r.n_latents for r in rungs],
                      x_format=size_label, y_log=False, y_below_1=True)


def explainability_chart(ladder) -> LineChart:
    """Mean F1 of the explanations and the share of latents with F1 >= 0.5, against n."""
    k, rungs = ladder.ladder.k, [r for r in ladder.n_series if r.explainability_f1 is not None]
    lines = [Series("mean F1", "observed", [(r.n_latents, 100 * r.explainability_f1, f"n = {r.n_latents:,}, k = {k}: mean F1 {r.explainability_f1:.3f}") for r in rungs]),
             Series("latents with F1 ≥ 0.5", "s1", [(r.n_latents, 100 * r.explainability_share, f"n = {r.n_latents:,}, k = {k}: {r.explainability_share:.1%} of latents with F1 ≥ 0.5") for r in rungs])]
    return line_chart(lines, title="Explainability against n", x_label="latents n (log scale)",
                      y_label="F1 / share of latents (%)", x_ticks=[r.n_latents for r in rungs], x_format=size_label, y_log=False)
