"""The cost report as one self-contained HTML page: plots drawn as inline SVG, no script, no external resource."""

from __future__ import annotations

import html
import math
import re
from typing import Any, Sequence

import numpy as np

from pipeline.report.text import fmt_money, fmt_num, saved_phrase, fmt_sig, fmt_when

# --------------------------------------------------------------------------------------------------------------
# HTML: one self-contained page, plots drawn as inline SVG (no script, no external resource)

# Exit depths from shallow (cheap, green) to deep (costly, dark violet): viridis stops, readable on white.
DEPTH_COLOURS = ["#7ad151", "#35b779", "#1f9e89", "#26828e", "#31688e", "#3e4989", "#482878", "#440154"]
ICAR_COLOUR, BASELINE_COLOUR, SAVED_COLOUR, WORSE_COLOUR = "#1f9e89", "#8a8f98", "#c8ece6", "#d1495b"
SCORER_COLOUR = "#f0a830"
MAX_SHARD_BARS = 80  # above this many shards the per-shard chart becomes a histogram of shard savings
A_COLOUR, B_COLOUR = "#1f9e89", "#e07b39"


def depth_colours(depths: Sequence[int]) -> dict[int, str]:
    """Return a colour per exit depth, shallow to deep spread over the palette."""
    depths = sorted(set(int(d) for d in depths))
    n = len(depths)
    if n == 1:
        return {depths[0]: DEPTH_COLOURS[-3]}
    return {d: DEPTH_COLOURS[round(i * (len(DEPTH_COLOURS) - 1) / (n - 1))] for i, d in enumerate(depths)}


def escape(x: Any) -> str:
    return html.escape(str(x), quote=True)


def ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Return round tick values covering [lo, hi]."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        lo, hi = 0.0, 1.0
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw * (1 - 1e-9))
    start, stop = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
    return [start + i * step for i in range(int(round((stop - start) / step)) + 1)]


def tick_label(v: float) -> str:
    a = abs(v)
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if a >= scale:
            return f"{round(v / scale, 6):g}{suffix}"
    return f"{round(v, 6):g}"


class _Plot:
    """One SVG chart: a value axis (y) with grid lines, and helpers to map data to pixels."""

    def __init__(self, plot: str, scope: str, title: str, ylo: float, yhi: float, width: int = 540,
                 height: int = 300, xlo: float | None = None, xhi: float | None = None):
        self.plot, self.scope, self.title = plot, scope, title
        self.w, self.h = width, height
        self.left, self.right, self.top, self.bottom = 62, 14, 30, 46
        self.yt = ticks(ylo, yhi)
        self.xt = ticks(xlo, xhi) if xlo is not None else None
        self.parts: list[str] = []

    @property
    def pw(self) -> float:
        return self.w - self.left - self.right

    @property
    def ph(self) -> float:
        return self.h - self.top - self.bottom

    def y(self, v: float) -> float:
        return self.top + (1 - (v - self.yt[0]) / (self.yt[-1] - self.yt[0])) * self.ph

    def x(self, v: float) -> float:
        return self.left + (v - self.xt[0]) / (self.xt[-1] - self.xt[0]) * self.pw

    def axes(self, ylabel: str, xlabel: str, xcats: list[str] | None = None) -> None:
        p = self.parts
        for v in self.yt:
            y = self.y(v)
            p.append(f'<line class="grid" x1="{self.left}" x2="{self.w - self.right}" y1="{y:.1f}" y2="{y:.1f}"/>')
            p.append(f'<text class="tick" x="{self.left - 6}" y="{y + 3.5:.1f}" text-anchor="end">'
                     f'{tick_label(v)}</text>')
        if self.xt:
            for v in self.xt:
                x = self.x(v)
                bottom = self.top + self.ph
                p.append(f'<line class="axis" x1="{x:.1f}" x2="{x:.1f}" y1="{bottom}" y2="{bottom + 4}"/>')
                p.append(f'<text class="tick" x="{x:.1f}" y="{bottom + 16}" text-anchor="middle">'
                         f'{tick_label(v)}</text>')
        if xcats:
            band = self.pw / len(xcats)
            every = max(1, math.ceil(len(xcats) / 16))  # no more than ~16 labels, or they overlap
            for i, c in enumerate(xcats):
                if i % every == 0:
                    p.append(f'<text class="tick" x="{self.left + (i + 0.5) * band:.1f}" y="{self.top + self.ph + 16}" '
                             f'text-anchor="middle">{escape(c)}</text>')
        y0 = self.y(0) if self.yt[0] <= 0 <= self.yt[-1] else self.top + self.ph
        p.append(f'<line class="axis" x1="{self.left}" x2="{self.w - self.right}" y1="{y0:.1f}" y2="{y0:.1f}"/>')
        p.append(f'<text class="label" x="{self.left + self.pw / 2:.1f}" y="{self.h - 8}" text-anchor="middle">'
                 f'{escape(xlabel)}</text>')
        p.append(f'<text class="label" transform="translate(14,{self.top + self.ph / 2:.1f}) rotate(-90)" '
                 f'text-anchor="middle">{escape(ylabel)}</text>')

    def legend(self, items: list[tuple[str, str]]) -> None:
        x = self.left
        for label, colour in items:
            self.parts.append(f'<rect class="key" x="{x}" y="9" width="11" height="11" rx="2" fill="{colour}"/>'
                              f'<text class="legend" x="{x + 15}" y="18.5">{escape(label)}</text>')
            x += 26 + 6.4 * len(label)

    def bar(self, x: float, width: float, v0: float, v1: float, colour: str, tip: str, **data: Any) -> None:
        ya, yb = sorted((self.y(v0), self.y(v1)))
        attrs = "".join(f' data-{k.replace("_", "-")}="{escape(v)}"' for k, v in data.items())
        self.parts.append(f'<rect class="bar" x="{x:.1f}" y="{ya:.1f}" width="{max(width, 1):.1f}" '
                          f'height="{max(yb - ya, 0.5):.1f}" fill="{colour}"{attrs}><title>{escape(tip)}</title></rect>')

    def text(self, x: float, y: float, s: str, cls: str = "value", anchor: str = "middle") -> None:
        self.parts.append(f'<text class="{cls}" x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}">{escape(s)}</text>')

    def svg(self) -> str:
        return (f'<svg class="plot" data-plot="{escape(self.plot)}" data-scope="{escape(self.scope)}" '
                f'viewBox="0 0 {self.w} {self.h}" width="{self.w}" height="{self.h}" role="img" '
                f'aria-label="{escape(self.title)}"><title>{escape(self.title)}</title>{"".join(self.parts)}</svg>')


def _bars(plot: str, scope: str, title: str, cats: list[str], values: list[float], colours: list[str],
          labels: list[str], tips: list[str], ylabel: str, xlabel: str, ref: tuple[float, str] | None = None,
          width: int = 540) -> str:
    """Return a vertical bar chart (one bar per category; negative values hang below zero)."""
    lo, hi = min([0.0] + values), max([0.0] + values + ([ref[0]] if ref else []))
    p = _Plot(plot, scope, title, lo, hi * 1.08 if hi > 0 else hi, width=width)
    p.axes(ylabel, xlabel, cats)
    band = p.pw / max(len(cats), 1)
    bw = min(band * 0.72, 64)
    for i, (v, col, lab, tip) in enumerate(zip(values, colours, labels, tips)):
        x = p.left + i * band + (band - bw) / 2
        p.bar(x, bw, 0, v, col, tip, category=cats[i], value=round(v, 6))
        if lab and len(cats) <= 24:
            p.text(x + bw / 2, p.y(v) - 4 if v >= 0 else p.y(v) + 12, lab)
    if ref:
        y = p.y(ref[0])
        p.parts.append(f'<line class="ref" x1="{p.left}" x2="{p.w - p.right}" y1="{y:.1f}" y2="{y:.1f}"/>')
        p.text(p.w - p.right - 2, y - 4, ref[1], cls="reflabel", anchor="end")
    return p.svg()


def plot_exit_histogram(s: dict, scope: str, colours: dict[int, str]) -> str:
    """Return the exit-depth histogram: images per exit depth, one bar per depth."""
    mix = s["exit_mix"]
    return _bars("exit-depth", scope, "Images per exit depth",
                 [f"{e['depth']} blocks" for e in mix], [float(e["images"]) for e in mix],
                 [colours[e["depth"]] for e in mix],
                 [f"{e['images']:,} ({100 * e['share']:.0f}%)" for e in mix],
                 [f"exit at {e['depth']} blocks: {e['images']:,} images, {100 * e['share']:.1f}%, "
                  f"{fmt_num(e['gflops'])} GFLOPs" for e in mix], "images", "exit depth")


def plot_complexity_histogram(s: dict, scope: str, colours: dict[int, str]) -> str:
    """Return the complexity histogram, each bin's bar stacked by exit depth."""
    h = s["complexity_histogram"]
    edges, counts = h["edges"], {int(k): v for k, v in h["counts_by_exit"].items()}
    totals = [sum(c[i] for c in counts.values()) for i in range(len(edges) - 1)]
    p = _Plot("complexity", scope, "Complexity score histogram, coloured by exit depth", 0, max(totals + [1]) * 1.05,
              xlo=0.0, xhi=1.0)
    p.axes("images", "complexity score (scorer output)")
    p.legend([(f"exit {d}", colours[d]) for d in sorted(counts)])
    for i in range(len(edges) - 1):
        x0, x1 = p.x(edges[i]), p.x(edges[i + 1])
        base = 0
        for d in sorted(counts):
            n = counts[d][i]
            if n:
                p.bar(x0 + 0.5, x1 - x0 - 1, base, base + n, colours[d],
                      f"complexity {edges[i]:.2f}-{edges[i + 1]:.2f}, exit {d}: {n:,} images", bin=i, depth=d)
                base += n
    if not h["scored_images"]:
        p.text(p.left + p.pw / 2, p.top + p.ph / 2, "no complexity scores (run without a scorer)", cls="empty")
    return p.svg()


def plot_gflops_breakdown(s: dict, scope: str, colours: dict[int, str]) -> str:
    """Return ICAR's GFLOPs (scorer + encoder per exit depth, stacked) beside the full-depth baseline."""
    g = s["gflops"]
    segments = [(f"encoder, exit {e['depth']}", colours[e["depth"]], e["images"] * (e["encoder_gflops_per_image"] or 0))
                for e in s["exit_mix"]]
    if g["scorer"]:
        segments.append(("scorer", SCORER_COLOUR, g["scorer"]))
    p = _Plot("gflops-breakdown", scope, "GFLOPs spent by ICAR vs the full-depth baseline", 0,
              max(g["full_depth"], g["spent"], 1e-9) * 1.1)
    cats = ["ICAR as run", "full depth"]
    p.axes("GFLOPs", "", cats)
    p.legend([(name.replace("encoder, ", ""), colour) for name, colour, _ in segments]
             + [("full depth", BASELINE_COLOUR)])
    band = p.pw / 2
    bw = min(band * 0.5, 110)
    x = p.left + (band - bw) / 2
    base = 0.0
    for name, colour, v in segments:
        if v > 0:
            p.bar(x, bw, base, base + v, colour, f"{name}: {fmt_num(v)} GFLOPs", series=name)
            base += v
    p.text(x + bw / 2, p.y(base) - 5, f"{fmt_num(g['spent'])}")
    x2 = p.left + band + (band - bw) / 2
    p.bar(x2, bw, 0, g["full_depth"], BASELINE_COLOUR, f"full depth: {fmt_num(g['full_depth'])} GFLOPs",
          series="full depth")
    p.text(x2 + bw / 2, p.y(g["full_depth"]) - 5, f"{fmt_num(g['full_depth'])}")
    if g["saved_pct"] is not None:
        p.text(p.left + band, p.y(max(g["full_depth"], g["spent"]) / 2),
               saved_phrase(g["saved_pct"], g.get("scored_not_routed", False)), cls="callout")
    return p.svg()


def plot_cumulative(s: dict, scope: str) -> str:
    """Return cumulative GFLOPs vs images embedded, ICAR against full depth, the gap shaded as the saving."""
    c = s["cumulative"]
    xs, ys, fs = c["images"], c["gflops_spent"], c["gflops_full_depth"]
    p = _Plot("cumulative", scope, "Cumulative GFLOPs: ICAR vs full depth", 0, max(fs + ys + [1.0]),
              xlo=0, xhi=max(xs[-1] if xs else 1, 1))
    p.axes("GFLOPs (cumulative)", "images embedded (in shard order)")
    p.legend([("ICAR as run", ICAR_COLOUR), ("full depth", BASELINE_COLOUR), ("saved", SAVED_COLOUR)])
    pts = lambda vs: " ".join(f"{p.x(x):.1f},{p.y(v):.1f}" for x, v in zip(xs, vs))
    if len(xs) > 1:
        area = pts(fs) + " " + " ".join(f"{p.x(x):.1f},{p.y(v):.1f}" for x, v in zip(reversed(xs), reversed(ys)))
        p.parts.append(f'<polygon class="saved" points="{area}" fill="{SAVED_COLOUR}"/>')
        p.parts.append(f'<polyline class="line" data-series="full-depth" points="{pts(fs)}" stroke="{BASELINE_COLOUR}" '
                       f'stroke-dasharray="6 4"/>')
        p.parts.append(f'<polyline class="line" data-series="icar" points="{pts(ys)}" stroke="{ICAR_COLOUR}"/>')
        pct = s["gflops"]["saved_pct"]
        if pct is not None:
            # Bottom right: always empty under two curves that rise from the origin.
            p.text(p.w - p.right - 6, p.top + p.ph - 12, saved_phrase(pct), cls="callout", anchor="end")
    return p.svg()


def plot_shard_savings(s: dict, scope: str) -> str:
    """Return GFLOPs saved per input shard (a histogram of shards by saving when there are too many for bars)."""
    shards = [x for x in s["by_shard"] if x["saved_pct"] is not None]
    overall = s["gflops"]["saved_pct"]
    ref = (overall, f"overall {overall:.1f}%") if overall is not None else None
    if len(shards) <= MAX_SHARD_BARS:
        many = len(s["runs"]) > 1  # part numbers repeat across runs: label shards run/part
        cats = [f"{x['run_number']}/{x['part']}" if many else str(x["part"]) for x in shards]
        vals = [x["saved_pct"] for x in shards]
        return _bars("shard-savings", scope, "GFLOPs saved per input shard", cats, vals,
                     [ICAR_COLOUR if v >= 0 else WORSE_COLOUR for v in vals], ["" for _ in vals],
                     [f"part {x['part']} ({x['source']}): {x['images']:,} images, {x['saved_pct']:.1f}% saved"
                      for x in shards], "GFLOPs saved (%)",
                     "input shard (run number / part)" if many else "input shard (part number)", ref=ref)
    vals = np.array([x["saved_pct"] for x in shards])
    counts, edges = np.histogram(vals, bins=20)
    cats = [f"{edges[i]:.0f}" for i in range(len(counts))]
    return _bars("shard-savings", scope, f"Input shards by GFLOPs saved ({len(shards)} shards)", cats,
                 [float(c) for c in counts], [ICAR_COLOUR] * len(counts), [str(c) if c else "" for c in counts],
                 [f"{c} shards saved {edges[i]:.1f}-{edges[i + 1]:.1f}%" for i, c in enumerate(counts)],
                 "input shards", "GFLOPs saved (%), bin start")


def plot_decile_savings(s: dict, scope: str) -> str:
    """Return GFLOPs saved per complexity decile (simplest tenth of the images first)."""
    ds = [d for d in s["by_complexity_decile"] if d["saved_pct"] is not None]
    cats = [f"D{d['decile']}" if d["decile"] is not None else "no score" for d in ds]
    vals = [d["saved_pct"] for d in ds]
    return _bars("decile-savings", scope, "GFLOPs saved by complexity decile", cats, vals,
                 [ICAR_COLOUR if v >= 0 else WORSE_COLOUR for v in vals], [f"{v:.0f}%" for v in vals],
                 [f"{c}: complexity {d['complexity_min']}-{d['complexity_max']}, {d['images']:,} images, mean exit "
                  f"{d['mean_exit_layer']:.1f} blocks, {d['saved_pct']:.1f}% saved" for c, d in zip(cats, ds)],
                 "GFLOPs saved (%)", "complexity decile (D1 = simplest tenth)")


def _grouped(plot: str, scope: str, title: str, cats: list[str], series: list[tuple[str, str, list[float]]],
             ylabel: str, xlabel: str, fmt=lambda v: fmt_sig(v, 3), width: int = 540) -> str:
    """Return a grouped bar chart: per category one bar per series."""
    hi = max([v for _, _, vs in series for v in vs] + [0.0])
    p = _Plot(plot, scope, title, 0, hi * 1.12 if hi > 0 else 1, width=width)
    p.axes(ylabel, xlabel, cats)
    p.legend([(name, colour) for name, colour, _ in series])
    band = p.pw / max(len(cats), 1)
    bw = min(band * 0.8 / len(series), 56)
    for i, c in enumerate(cats):
        x0 = p.left + i * band + (band - bw * len(series)) / 2
        for k, (name, colour, vs) in enumerate(series):
            p.bar(x0 + k * bw, bw - 2, 0, vs[i], colour, f"{name}, {c}: {fmt(vs[i])}", category=c, series=name)
            p.text(x0 + k * bw + (bw - 2) / 2, p.y(vs[i]) - 4, fmt(vs[i]))
    return p.svg()


def plot_compare(comp: dict) -> list[str]:
    """Return the side-by-side plots of --compare: exit mix and per-image figures of A and B."""
    mix = comp["exit_mix"]
    out = [_grouped("compare-exit-mix", "compare", "Exit mix side by side (share of images)",
                    [f"{d} blocks" for d in mix["depths"]],
                    [("A: " + comp["a"]["label"], A_COLOUR, [100 * v for v in mix["a"]]),
                     ("B: " + comp["b"]["label"], B_COLOUR, [100 * v for v in mix["b"]])],
                    "images (%)", "exit depth", fmt=lambda v: f"{v:.0f}%")]
    titles = {"gflops_per_image": "GFLOPs per image", "accelerator_ms_per_image": "accelerator-ms per image",
              "images_per_second_wall": "images per second (wall)",
              "cost_per_million_images": "cost per million images"}
    for m in comp["metrics"]:
        if m["metric"] not in titles or m["a"] is None or m["b"] is None:
            continue
        out.append(_grouped(f"compare-{m['metric'].replace('_', '-')}", "compare", titles[m["metric"]],
                            [titles[m["metric"]]],
                            [("A", A_COLOUR, [float(m["a"])]), ("B", B_COLOUR, [float(m["b"])])],
                            m["unit"], "", width=260))
    return out


CSS = """
:root { --ink: #1d2430; --muted: #5f6b7a; --line: #e3e7ec; --card: #f6f8fa; --accent: #1f9e89; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: var(--ink); background: #fff; }
main { max-width: 1140px; margin: 0 auto; padding: 28px 28px 60px; }
h1 { font-size: 26px; margin: 0 0 4px; } h2 { font-size: 20px; margin: 36px 0 6px; border-bottom: 2px solid var(--line);
padding-bottom: 6px; } h3 { font-size: 15px; margin: 22px 0 8px; color: var(--muted); text-transform: uppercase;
letter-spacing: .04em; }
.sub { color: var(--muted); margin: 0 0 18px; }
.mono { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 12px; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(165px, 1fr)); gap: 12px; margin: 18px 0 14px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 12px 14px; }
.card .k { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .v { font-size: 20px; font-weight: 650; margin-top: 2px; white-space: nowrap; }
.card .n { color: var(--muted); font-size: 12px; }
.good { color: #137a6a; } .bad { color: #b3263b; }
.badge { display: inline-block; font-size: 11px; font-weight: 650; padding: 1px 7px; border-radius: 9px;
         vertical-align: middle; letter-spacing: .03em; }
.badge.measured, .badge.passed { background: #d8f1ec; color: #0f6657; }
.badge.estimate, .badge.mixed { background: #fff1d6; color: #8a5a00; }
.badge.FAILED, .badge.unavailable { background: #fbdde1; color: #9b1c2f; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(470px, 1fr)); gap: 18px 28px; }
.charts.small { grid-template-columns: repeat(auto-fit, minmax(240px, 1fr)); }
figure { margin: 0; } figcaption { font-weight: 600; margin: 6px 0 2px; }
svg.plot { width: 100%; max-width: 600px; height: auto; background: #fff; }
svg.plot text { font-family: system-ui, "DejaVu Sans", sans-serif; fill: #3c4654; }
svg.plot .tick { font-size: 10.5px; fill: #6b7684; } svg.plot .label { font-size: 11.5px; fill: #4a5564; }
svg.plot .value { font-size: 10.5px; font-weight: 600; } svg.plot .legend { font-size: 11px; }
svg.plot .grid { stroke: #edf0f3; } svg.plot .axis { stroke: #9aa4b0; }
svg.plot .ref { stroke: #b3263b; stroke-dasharray: 4 3; } svg.plot .reflabel { font-size: 10.5px; fill: #b3263b; }
svg.plot .line { fill: none; stroke-width: 2.4; }
svg.plot .callout { font-size: 13px; font-weight: 700; fill: #137a6a; }
svg.plot .empty { font-size: 13px; fill: #8a94a1; } svg.plot rect.bar:hover { opacity: .8; }
table { border-collapse: collapse; width: 100%; margin: 6px 0 10px; font-size: 13px; }
th, td { text-align: right; padding: 5px 9px; border-bottom: 1px solid var(--line); }
th { background: var(--card); font-weight: 600; color: var(--muted); }
th.l, td.l { text-align: left; }
.note { color: var(--muted); font-size: 12.5px; margin: 4px 0; }
.estimate-note { background: #fff8e8; border-left: 3px solid #e0a100; padding: 7px 10px; font-size: 12.5px;
                 margin: 8px 0; }
details { margin: 10px 0; } summary { cursor: pointer; font-weight: 600; }
footer { margin-top: 40px; color: var(--muted); font-size: 12px; border-top: 1px solid var(--line); padding-top: 10px; }
"""


FIGURE = re.compile(r"^[-+]?[\d.,]+(e[-+]?\d+)?( ?[%a-zA-Z/]{0,8})?$")  # "12", "3.5 s", "18.2%", "0.0031 USD"


def _is_figure(cell: Any) -> bool:
    """Return True for a cell that reads as a number (right-aligned), False for text (left-aligned)."""
    text = str(cell).strip()
    return isinstance(cell, (int, float)) or text == "-" or bool(FIGURE.match(text))


def _table(head: list[str], rows: list[list[Any]]) -> str:
    align = [all(_is_figure(r[i]) for r in rows) if rows else True for i in range(len(head))]
    align[0] = False
    th = "".join(f"<th{'' if a else ' class=l'}>{escape(h)}</th>" for h, a in zip(head, align))
    body = "".join("<tr>" + "".join(f"<td{'' if a else ' class=l'}>{escape(c)}</td>" for c, a in zip(r, align))
                   + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _badge(kind: str) -> str:
    return f'<span class="badge {escape(kind)}">{escape(kind.upper())}</span>'


def _cards(s: dict, audit_status: str) -> str:
    """Return the headline cards of a section (values and notes are HTML, escaped here)."""
    g, c, f = s["gflops"], s["cost"], s["failed"]
    cur, fd = c["currency"], c["full_depth"]
    tone = (lambda x: "good" if (x or 0) >= 0 else "bad")
    cards = [
        ("Images embedded", escape(f"{s['images']:,}"),
         escape(f"{f['samples']:,} failed samples, {f['input_shards']} failed input shards")),
        ("GFLOPs saved", f'<span class="{tone(g["saved_pct"])}">'
                         f'{escape(saved_phrase(g["saved_pct"], g.get("scored_not_routed", False)))}</span>',
         escape(f"{fmt_num(g['spent'])} spent vs {fmt_num(g['full_depth'])} at full depth")),
        ("Cost as run", escape(fmt_money(c["cost"], cur)),
         escape(f"{fmt_sig(c['accelerator_hours'])} accelerator-h at {c['price_per_hour']:g} {cur}/h")),
        ("Cost at full depth", escape(fmt_money(fd["cost"], cur)),
         _badge(fd["basis"]) + " " + escape(f"{fmt_sig(fd['accelerator_hours'])} accelerator-h")),
        ("Saved", f'<span class="{tone(c["saved_cost"])}">{escape(fmt_money(c["saved_cost"], cur))}</span>',
         escape(f"{saved_phrase(c['saved_pct'])} of accelerator time")),
        ("Audit", _badge(audit_status), escape("GFLOPs: rows = manifest = per-depth counts x run.json")),
    ]
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="k">{escape(k)}</div><div class="v">{v}</div><div class="n">{n}</div></div>'
        for k, v, n in cards) + "</div>"


def _section_html(s: dict, scope: str, colours: dict[int, str]) -> str:
    g, t, c, f, a = s["gflops"], s["time"], s["cost"], s["failed"], s["audit"]
    cur, fd = c["currency"], c["full_depth"]
    out = [_cards(s, a["status"])]
    charts = []
    if s["exit_mix"]:
        charts.append(("Exit depth", plot_exit_histogram(s, scope, colours)))
        charts.append(("Complexity, by exit", plot_complexity_histogram(s, scope, colours)))
    charts.append(("GFLOPs: ICAR vs full depth", plot_gflops_breakdown(s, scope, colours)))
    charts.append(("Cumulative GFLOPs", plot_cumulative(s, scope)))
    charts.append(("Savings by input shard", plot_shard_savings(s, scope)))
    if s["by_complexity_decile"]:
        charts.append(("Savings by complexity decile", plot_decile_savings(s, scope)))
    out.append('<div class="charts">' + "".join(f"<figure><figcaption>{escape(k)}</figcaption>{v}</figure>"
                                                for k, v in charts) + "</div>")
    out.append("<h3>GFLOPs</h3>" + _table(
        ["", "spent (ICAR)", "scorer", "encoder", "full depth", "saved", "saved %", "per image",
         "full depth per image"],
        [["GFLOPs", fmt_num(g["spent"]), fmt_num(g["scorer"]), fmt_num(g["encoder"]), fmt_num(g["full_depth"]), fmt_num(g["saved"]),
          f"{g['saved_pct']:.1f}%" if g["saved_pct"] is not None else "-", fmt_sig(g["spent_per_image"], 4),
          fmt_sig(g["full_depth_per_image"], 4)]]))
    if s["exit_mix"]:
        out.append("<h3>Exit mix</h3>" + _table(
            ["exit depth (blocks)", "images", "share", "encoder GFLOPs / image", "GFLOPs spent"],
            [[e["depth"], f"{e['images']:,}", f"{100 * e['share']:.1f}%", fmt_sig(e["encoder_gflops_per_image"], 4),
              fmt_num(e["gflops"])] for e in s["exit_mix"]]))
    if s["by_complexity_decile"]:
        out.append("<h3>By complexity decile</h3>" + _table(
            ["decile", "complexity", "images", "mean exit", "GFLOPs spent", "full depth", "saved %"],
            [[f"D{d['decile']}" if d["decile"] is not None else "no score",
              f"{d['complexity_min']:.3f} – {d['complexity_max']:.3f}" if d["decile"] is not None else "-",
              f"{d['images']:,}", f"{d['mean_exit_layer']:.1f}", fmt_num(d["gflops_spent"]), fmt_num(d["gflops_full_depth"]),
              f"{d['saved_pct']:.1f}%" if d["saved_pct"] is not None else "-"] for d in s["by_complexity_decile"]]))
    many = len(s["runs"]) > 1
    shard_table = _table(
        (["run"] if many else []) + ["part", "input shard", "images", "failed", "GFLOPs spent", "full depth", "saved %",
                                     "mean exit", "accel. s", "committed"],
        [([f"{x['run_number']}: {x['run']}"] if many else []) +
         [x["part"], x["source"], f"{x['images']:,}", x["failed"], fmt_num(x["gflops_spent"]),
          fmt_num(x["gflops_full_depth"]),
          f"{x['saved_pct']:.1f}%" if x["saved_pct"] is not None else "-",
          f"{x['mean_exit_layer']:.1f}" if x["mean_exit_layer"] is not None else "-", fmt_sig(x["accelerator_seconds"]),
          fmt_when(x["committed_at"])] for x in s["by_shard"]])
    out.append(f"<details{' open' if len(s['by_shard']) <= 12 else ''}><summary>Input shards ({len(s['by_shard'])})"
               f"</summary>{shard_table}</details>")
    if f["failed_input_shards"]:
        out.append("<h3>Failed input shards</h3>" + _table(
            ["input shard", "error"], [[x["source"], x["message"]] for x in f["failed_input_shards"]]))
    out.append("<h3>Time and cost</h3>" + _table(
        ["", "accelerator-hours", f"cost ({cur})", "basis"],
        [["as run", fmt_sig(c["accelerator_hours"], 4), fmt_money(c["cost"], cur), "measured (model_seconds)"],
         ["full depth", fmt_sig(fd["accelerator_hours"], 4), fmt_money(fd["cost"], cur), fd["basis"].upper()],
         ["saved", fmt_sig(c["saved_hours"], 4), fmt_money(c["saved_cost"], cur),
          saved_phrase(c["saved_pct"])]]))
    if fd["note"]:
        out.append(f'<div class="estimate-note">{_badge(fd["basis"])} {escape(fd["note"])}</div>')
    time_rows = [["wall time", f"{fmt_sig(t['wall_seconds'], 4)} s" if t["wall_seconds"] is not None else "not recorded",
                  f"{t['invocations']} invocation(s) of icar embed"],
                 ["images / s (wall)", fmt_sig(t["images_per_second_wall"], 4), "images timed / wall seconds"],
                 ["accelerator time", f"{fmt_sig(t['accelerator_seconds'], 4)} s",
                  f"inside model actors, on {t['device']}"],
                 ["images / accelerator-s", fmt_sig(t["images_per_accelerator_second"], 4), ""],
                 ["reserved GPU-hours", fmt_sig(t["reserved_gpu_hours"], 4), "wall x GPUs reserved for model actors"],
                 ["model busy share",
                  f"{100 * t['model_busy_share']:.0f}%" if t["model_busy_share"] is not None else "-",
                  "accelerator time / actor wall time; low = accelerators waited for input"]]
    if c["realised_efficiency"] is not None:
        time_rows.append(["realised efficiency", f"{c['realised_efficiency']:.2f}",
                          "measured speedup / GFLOP-ratio speedup (1.0 = every GFLOP saved became time saved)"])
    out.append(_table(["throughput", "value", ""], time_rows))
    out += [f'<p class="note">{escape(n)}</p>' for n in t["notes"]]
    audit_rows = [["rows' gflops column", fmt_num(a["gflops_rows"], 4)],
                  ["manifest.parquet sums", fmt_num(a["gflops_manifest"], 4)],
                  ["per-depth counts x run.json (+ scorer)", fmt_num(a["gflops_recomputed"], 4)],
                  ["rows disagreeing with run.json", f"{a['row_violations']:,}"]]
    out.append(f"<h3>Audit {_badge(a['status'])}</h3>" + _table(["GFLOP total from", "GFLOPs"], audit_rows))
    for v in a.get("violation_examples", []):
        out.append(f'<p class="note bad">{escape(v["shard"])} row {v["row"]}: exit {v["exit_layer"]} recorded '
                   f'{v["gflops"]:.6g} GFLOPs, run.json says {v["expected"]}</p>')
    return "\n".join(out)


def render_html(report: dict) -> str:
    """Return report.html: one self-contained page (inline CSS and SVG; no script, no external resource)."""
    cfg = report["config"]
    runs, models, total = report["runs"], report["models"], report["totals"]
    depths = {e["depth"] for s in runs for e in s["exit_mix"]}
    if report["compare"]:
        depths |= {e["depth"] for e in report["compare"]["b_section"]["exit_mix"]}
    depths = sorted(depths)
    colours = depth_colours(depths or [0])
    period = total["period"]
    body = ["<h1>ICAR cost report</h1>",
            f'<p class="sub">{len(runs)} run{"s" if len(runs) != 1 else ""} · {len(models)} model'
            f'{"s" if len(models) != 1 else ""} · shards committed {escape(fmt_when(period["first_committed"]))} to '
            f'{escape(fmt_when(period["last_committed"]))} · priced at {cfg["gpu_hour_price"]:g} {escape(cfg["currency"])} per '
            f'accelerator-hour · generated {escape(fmt_when(report["generated_at"]))} by icar '
            f'{escape(report["icar_version"])}</p>']
    if len(runs) == 1:
        s = runs[0]
        body.append(f'<p class="mono">{escape(s["name"])} — {escape(s["models"][0]["label"])}</p>')
        body.append(_section_html(s, f"run:{s['name']}", colours))
    else:
        body.append("<h2>All runs</h2>" + _cards(total, report["audit"]["status"]))
        if total.get("note"):
            body.append(f'<p class="note">{escape(total["note"])}</p>')
        body.append(_table(
            ["run", "model", "images", "failed", "GFLOPs spent", "full depth", "saved %", f"cost ({cfg['currency']})",
             "full-depth cost", "basis", "audit"],
            [[s["name"], s["models"][0]["label"], f"{s['images']:,}", s["failed"]["samples"],
              fmt_num(s["gflops"]["spent"]), fmt_num(s["gflops"]["full_depth"]),
              f"{s['gflops']['saved_pct']:.1f}%" if s["gflops"]["saved_pct"] is not None else "-",
              fmt_money(s["cost"]["cost"], ""), fmt_money(s["cost"]["full_depth"]["cost"], ""),
              s["cost"]["full_depth"]["basis"], s["audit"]["status"]] for s in runs]))
        for m in models:
            n = len(m["runs"])
            body.append(f"<h2>Model {escape(m['name'])} <span class='note'>({n} run{'s' if n != 1 else ''})</span></h2>")
            body.append(_section_html(m, f"model:{m['models'][0]['key']}", colours))
        body.append("<h2>Runs</h2>")
        for s in runs:
            body.append(f"<details><summary class='mono'>{escape(s['name'])} — {s['images']:,} images, "
                        f"{escape(saved_phrase(s['gflops']['saved_pct'], s['gflops'].get('scored_not_routed', False)))}</summary>"
                        f"{_section_html(s, 'run:' + s['name'], colours)}</details>")
    comp = report["compare"]
    if comp:
        body.append(f"<h2>Side by side: A vs B</h2><p class='sub'>A = {escape(', '.join(comp['a']['runs']))}; "
                    f"B = {escape(comp['b']['runs'][0])}{' (a full-depth run)' if comp['b']['full_depth_run'] else ''}. "
                    f"Images in both: {comp['common_images']:,}; only in A: {comp['images_only_in_a']:,}; only in B: "
                    f"{comp['images_only_in_b']:,}."
                    f"{'' if comp['same_model'] else ' The runs use DIFFERENT models.'}</p>")
        plots = plot_compare(comp)
        body.append(f'<div class="charts"><figure><figcaption>Exit mix</figcaption>{plots[0]}</figure>'
                    '<div class="charts small">' + "".join(f"<figure>{p}</figure>" for p in plots[1:])
                    + "</div></div>")
        body.append(_table(["metric", "unit", "A", "B", "B / A"],
                           [[m["metric"].replace("_", " "), m["unit"], fmt_sig(m["a"], 4), fmt_sig(m["b"], 4),
                             f"{m['b_over_a']:.2f}" if m["b_over_a"] is not None else "-"] for m in comp["metrics"]]))
    defs = "".join(f"<li><b>{escape(k.replace('_', ' '))}</b>: {escape(v)}</li>" for k, v in report["definitions"].items())
    body.append(f"<footer><ul>{defs}</ul></footer>")
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width, initial-scale=1"><title>ICAR cost report</title><style>{CSS}</style>'
            f'</head><body><main>{"".join(body)}</main></body></html>\n')
