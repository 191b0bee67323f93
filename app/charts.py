"""Bar charts as server-rendered SVG: the geometry (`bar_chart`), then the markup (`svg`).

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


@dataclass
class BarChart:
    title: str  # the chart's accessible name
    bars: list[Bar]
    x_ticks: list[Tick]
    y_ticks: list[Tick]
    x_label: str
    y_label: str
    markers: list[Marker]
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    top: int = TOP
    bottom: int = HEIGHT - BOTTOM

    @property
    def right(self) -> int:
        return self.width - RIGHT

    @property
    def empty(self) -> bool:
        return not any(bar.height > 0 for bar in self.bars)


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


def at(position: float) -> str:
    return f"{position:.1f}"


def svg(chart: BarChart, class_name: str = "") -> Markup:
    """The chart as an <svg> element: grid and count labels, a group per bar (a full-height hit
    area and the bar, under the bar's <title>), markers, axes, tick labels and axis labels."""
    left, right, top, bottom = chart.left, chart.right, chart.top, chart.bottom
    parts = [f'<svg class="chart {escape(class_name)}" viewBox="0 0 {chart.width} {chart.height}" role="img" '
             f'aria-label="{escape(chart.title)}"><title>{escape(chart.title)}</title>']
    for tick in chart.y_ticks:
        parts.append(f'<line class="grid" x1="{left}" x2="{right}" y1="{tick.at}" y2="{tick.at}"/>'
                     f'<text class="tick y" x="{left - 6}" y="{tick.at}">{escape(tick.label)}</text>')
    for bar in chart.bars:
        parts.append(f'<g class="bin"><title>{escape(bar.title)}</title>'
                     f'<rect class="hist-hit" x="{bar.x}" y="{top}" width="{bar.width}" height="{bottom - top}"/>'
                     f'<rect class="hist-bar" x="{bar.x}" y="{bar.y}" width="{bar.width}" height="{bar.height}"/></g>')
    for marker in chart.markers:
        parts.append(f'<line class="marker" x1="{marker.at}" x2="{marker.at}" y1="{top}" y2="{bottom}"/>'
                     f'<text class="marker-label" x="{marker.at}" dx="3" y="{top + 9}">{escape(marker.label)}</text>')
    parts.append(f'<line class="axis" x1="{left}" x2="{right}" y1="{bottom}" y2="{bottom}"/>'
                 f'<line class="axis" x1="{left}" x2="{left}" y1="{top}" y2="{bottom}"/>')
    for tick in chart.x_ticks:
        parts.append(f'<line class="axis" x1="{tick.at}" x2="{tick.at}" y1="{bottom}" y2="{bottom + 4}"/>'
                     f'<text class="tick x" x="{tick.at}" y="{bottom + 15}">{escape(tick.label)}</text>')
    parts.append(f'<text class="axis-label x" x="{(left + right) / 2}" y="{chart.height - 4}">{escape(chart.x_label)}</text>'
                 f'<text class="axis-label y" transform="translate(12 {(top + bottom) / 2}) rotate(-90)">'
                 f'{escape(chart.y_label)}</text></svg>')
    return Markup("".join(parts))


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
    """A latent's non-zero activations (app.features.Histogram)."""
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
    """An SAE's latents by log10 density (app.queries.DensityHistogram), dead ones aside."""
    edges = histogram.log10_edges
    decades = [float(d) for d in range(math.ceil(edges[0]), math.floor(edges[-1]) + 1)]
    threshold = math.log10(histogram.dense_threshold)
    return bar_chart(
        edges, histogram.counts, title="Histogram of latent densities (log scale)",
        x_label="density: share of tokens it fires on (log scale)", y_label="latents",
        x_ticks=decades, x_format=percent_of_tokens, markers={threshold: "dense"}, width=2 * WIDTH,
        describe=lambda a, b, c: f"density {percent_of_tokens(a)} to {percent_of_tokens(b)}: {c:,} latents")
