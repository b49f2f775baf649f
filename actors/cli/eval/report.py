"""The eval report: Markdown and one self-contained HTML page, from trials alone.

Both are rendered from the same blocks (headings, paragraphs, lists, tables of plain
text), so they cannot disagree; every cell is escaped on the way out, since scenario
names, whys and labels are data. The HTML adds matplotlib plots as inline PNGs.
matplotlib is imported inside render() only: importing this module (the CLI does, for
every `menders eval`) stays cheap.
"""

from __future__ import annotations

import base64
import html
import io
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from actors.cli.eval.records import Trial
from actors.cli.eval.stats import (
    BASELINE,
    GroupKey,
    Row,
    Spread,
    Summary,
    median,
    scenario_rows,
    trial_order,
    variant_order,
    variant_totals,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

NONE = "—"
MAX_TIMELINE_ROWS = 400  # beyond this the strip's PNG outgrows what a browser shows well


@dataclass
class Table:
    head: list[str]
    rows: list[list[str]]
    dim: set[int] = field(default_factory=set)  # row indexes shown muted (the baseline's)


# ("h1" | "h2" | "p", text), ("ul", items), ("plots", "") or a table.
Block = tuple[str, str] | tuple[str, list[str]] | Table


def render(trials: list[Trial], out_dir: Path, title: str) -> tuple[Path, Path]:
    """Write report.md and report.html into out_dir; their paths."""
    blocks = _blocks(trials, title)
    md = out_dir / "report.md"
    md.write_text(_markdown(blocks))
    page = out_dir / "report.html"
    page.write_text(_html(blocks, title, _plots(trials)))
    return md, page


# -- The content, as blocks -----------------------------------------------------------------

def _blocks(trials: list[Trial], title: str) -> list[Block]:
    rows = scenario_rows(trials)
    out: list[Block] = [("h1", title), ("p", _header(trials))]
    out += [("h2", "Safety"), _safety(trials)]
    out += [("h2", "Per scenario"), ("p", "Win rate: wins/scored trials (Wilson 95 % "
                                          "interval); times in seconds, median / p90 over "
                                          "the trials that reached it (n when fewer); the "
                                          "baseline (no crew) row comes first in each "
                                          "scenario."),
            _scenario_table(rows)]
    out += [("h2", "Per variant"), _variant_table(variant_totals(trials)),
            ("plots", "")]  # where the HTML puts its plots; Markdown has none
    losses = [t for t in trial_order(trials) if not t.won and not t.error]
    out += [("h2", f"Trials lost ({len(losses)})"),
            ("ul", [f"{_label(t)}: {t.why or 'no reason recorded'}" for t in losses])
            if losses else ("p", "None.")]
    errors = [t for t in trial_order(trials) if t.error]
    if errors:
        out += [("h2", f"Harness errors ({len(errors)}, not scored)"),
                ("ul", [f"{_label(t)}: {t.error}" for t in errors])]
    return out


def _header(trials: list[Trial]) -> str:
    campaigns = ", ".join(sorted({t.campaign for t in trials})) or NONE
    started = [t.started_at for t in trials if t.started_at > 0]
    ends = [t.started_at + max((m.t for m in t.timeline), default=0.0)
            for t in trials if t.started_at > 0]
    when = (f"{_utc(min(started))} to {_utc(max(ends))}" if started else "no trial started")
    wins = sum(t.won for t in trials if not t.error)
    errors = sum(bool(t.error) for t in trials)
    return (f"Campaign(s): {campaigns}. {when}. {len(trials)} trials "
            f"({wins} won, {errors} harness errors) of "
            f"{len({(t.subject, t.scenario) for t in trials})} scenarios x "
            f"{len({t.variant for t in trials})} variants.")


def _safety(trials: list[Trial]) -> Block:
    def problems(t: Trial) -> list[str]:
        out = [f"{name} {n}" for name, n in (("duplicates", t.duplicates),
                                             ("false fixed", t.false_fixed),
                                             ("out of policy", t.out_of_policy)) if n]
        if t.audit_verified is False:
            out.append("audit record does not verify")
        if t.audit_missing:
            out.append(f"{t.audit_missing} event(s) missing from the audit record")
        return out

    bad = [(t, p) for t in trial_order(trials) if (p := problems(t))]
    audited = sum(1 for t in trials if t.audit_verified is not None)
    if not bad:
        return ("p", f"No duplicate effect, false fix or out-of-policy step in "
                     f"{len(trials)} trials; the audit record verified and complete in "
                     f"all {audited} with a crew.")
    return ("ul", [f"{_label(t)}: " + ", ".join(p) for t, p in bad])


SCENARIO_HEAD = ["subject", "scenario", "kind", "expected", "variant", "win rate",
                 "TTD s", "TTM s", "wrong", "out-of-policy", "destructive", "duplicates",
                 "false-fixed"]


def _scenario_table(rows: list[Row]) -> Table:
    table = Table(SCENARIO_HEAD, [])
    for r in rows:
        s = r.summary
        if r.variant == BASELINE:
            table.dim.add(len(table.rows))
        table.rows.append([r.subject, r.scenario, r.kind, r.expected, r.variant, _win(s),
                           _spread(s.ttd, s.scored), _spread(s.ttm, s.scored),
                           *map(str, (s.wrong_actions, s.out_of_policy, s.destructive,
                                      s.duplicates, s.false_fixed))])
    return table


def _variant_table(totals: dict[str, Summary]) -> Table:
    table = Table(["variant", "win rate", "TTD s", "TTM s", "wrong", "out-of-policy",
                   "destructive", "duplicates", "false-fixed", "approvals asked",
                   "escalations", "tokens", "USD", "harness errors"], [])
    for variant, s in totals.items():
        if variant == BASELINE:
            table.dim.add(len(table.rows))
        table.rows.append([variant, _win(s), _spread(s.ttd, s.scored),
                           _spread(s.ttm, s.scored),
                           *map(str, (s.wrong_actions, s.out_of_policy, s.destructive,
                                      s.duplicates, s.false_fixed, s.approvals_asked,
                                      s.escalations, s.tokens)),
                           f"{s.usd:.4f}", str(s.errors)])
    return table


# -- compare --------------------------------------------------------------------------------

def compare(a: list[Trial], b: list[Trial], names: tuple[str, str]) -> str:
    """Markdown: two runs side by side per (subject, scenario, variant) and per variant;
    deltas are B - A, so a negative time delta means B was faster."""
    ra = {r.key: r.summary for r in scenario_rows(a)}
    rb = {r.key: r.summary for r in scenario_rows(b)}
    keys: list[GroupKey] = sorted(ra.keys() | rb.keys(),
                                  key=lambda k: (k[0], k[1], k[2] != BASELINE, k[2]))
    per_row = Table(["subject", "scenario", "variant", *_compare_head()], [])
    for key in keys:
        if key[2] == BASELINE:
            per_row.dim.add(len(per_row.rows))
        per_row.rows.append([*key, *_compare_cells(ra.get(key), rb.get(key))])
    ta, tb = variant_totals(a), variant_totals(b)
    per_variant = Table(["variant", *_compare_head()], [])
    for v in variant_order(ta.keys() | tb.keys()):
        per_variant.rows.append([v, *_compare_cells(ta.get(v), tb.get(v))])
    return _markdown([
        ("h1", "menders eval: compare"),
        ("ul", [f"A: {names[0]} ({len(a)} trials)", f"B: {names[1]} ({len(b)} trials)"]),
        ("p", "Deltas are B - A in seconds (negative: B faster), over medians; safety lists "
              "duplicates, false fixes and out-of-policy steps."),
        ("h2", "Per scenario"), per_row, ("h2", "Per variant"), per_variant])


def _compare_head() -> list[str]:
    return ["win A", "win B", "TTD A", "TTD B", "TTD Δ", "TTM A", "TTM B", "TTM Δ",
            "safety A", "safety B"]


def _compare_cells(a: Summary | None, b: Summary | None) -> list[str]:
    def side(s: Summary | None, name: str) -> list[str]:
        return ([_win(s), _secs(s.ttd.median), _secs(s.ttm.median), _unsafe(s)] if s
                else [f"not in {name}", NONE, NONE, NONE])

    wa, da, ma, sa = side(a, "A")
    wb, db, mb, sb = side(b, "B")
    return [wa, wb, da, db, _delta(a.ttd if a else None, b.ttd if b else None), ma, mb,
            _delta(a.ttm if a else None, b.ttm if b else None), sa, sb]


def _delta(a: Spread | None, b: Spread | None) -> str:
    if a is None or b is None or a.median is None or b.median is None:
        return NONE
    return f"{b.median - a.median:+.1f}"


def _unsafe(s: Summary) -> str:
    parts = [f"{name} {n}" for name, n in (("dup", s.duplicates), ("ff", s.false_fixed),
                                           ("oop", s.out_of_policy)) if n]
    return ", ".join(parts) or "none"


# -- Formatting -----------------------------------------------------------------------------

def _label(t: Trial) -> str:
    return f"{t.subject}/{t.scenario} {t.variant} #{t.repeat}"


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def _secs(x: float | None) -> str:
    return NONE if x is None else f"{x:.1f}"


def _spread(s: Spread, of: int) -> str:
    if not s.n:
        return NONE
    text = f"{_secs(s.median)} / {_secs(s.p90)}"
    return text if s.n == of else f"{text} (n={s.n})"


def _win(s: Summary) -> str:
    if s.interval is None:
        text = f"0/0 ({NONE})"
    else:
        lo, hi = s.interval
        text = f"{s.wins}/{s.scored} ({round(lo * 100)}-{round(hi * 100)} %)"
    return f"{text} +{s.errors} err" if s.errors else text


def _md_cell(text: str) -> str:
    # Backslash escapes: a `|` would split the cell, a `<` start raw HTML in a renderer.
    return (text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "\\<")
            .replace("\r", " ").replace("\n", " "))


def _markdown(blocks: Iterable[Block]) -> str:
    out: list[str] = []
    for block in blocks:
        if isinstance(block, Table):
            out.append("| " + " | ".join(map(_md_cell, block.head)) + " |")
            out.append("|" + "---|" * len(block.head))
            out += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in block.rows]
        elif block[0] == "ul":
            out += [f"- {_md_cell(item)}" for item in block[1]]
        elif block[0] == "plots":
            continue
        else:
            kind, text = block
            prefix = {"h1": "# ", "h2": "## "}.get(kind, "")
            out.append(prefix + _md_cell(str(text)))
        out.append("")
    return "\n".join(out)


# -- HTML -----------------------------------------------------------------------------------

STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; }
th { background: #f0f0f0; }
tr.dim td { color: #666; background: #fafafa; font-style: italic; }
img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
"""


def _html(blocks: Iterable[Block], title: str, plots: Sequence[tuple[str, str, str]]) -> str:
    e = html.escape
    out = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{e(title)}</title><style>{STYLE}</style></head><body>"]
    for block in blocks:
        if isinstance(block, Table):
            out.append("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in block.head)
                       + "</tr></thead><tbody>")
            for i, row in enumerate(block.rows):
                cls = ' class="dim"' if i in block.dim else ""
                out.append(f"<tr{cls}>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>")
            out.append("</tbody></table>")
        elif block[0] == "ul":
            out.append("<ul>" + "".join(f"<li>{e(item)}</li>" for item in block[1]) + "</ul>")
        elif block[0] == "plots":
            for heading, png, caption in plots:
                out.append(f"<h2>{e(heading)}</h2><figure><img alt=\"{e(heading)}\" "
                           f'src="data:image/png;base64,{png}">'
                           f"<figcaption>{e(caption)}</figcaption></figure>")
        else:
            kind, text = block
            tag = kind if kind in ("h1", "h2") else "p"
            out.append(f"<{tag}>{e(str(text))}</{tag}>")
    out.append("</body></html>")
    return "\n".join(out)


# -- Plots ----------------------------------------------------------------------------------

MARKS: dict[str, tuple[str, str]] = {  # Mark kind: (marker, colour) on the timeline strip
    "inject": ("v", "#d62728"), "clear": ("^", "#2ca02c"), "kill": ("X", "#000000"),
    "resume": ("P", "#000000"), "incident": ("o", "#ff7f0e"), "diagnosis": ("s", "#9467bd"),
    "action": ("D", "#1f77b4"), "verdict": ("*", "#17becf"), "escalation": (">", "#8c564b"),
    "resolved": ("h", "#2ca02c"),
}


def _plots(trials: list[Trial]) -> list[tuple[str, str, str]]:
    """(heading, base64 PNG, caption) for each plot."""
    import matplotlib

    matplotlib.use("Agg")  # no display, ever: the report is rendered headless
    rows = scenario_rows(trials)
    colours = _colours(variant_order(t.variant for t in trials))  # in variant order
    shown = trial_order(trials)[:MAX_TIMELINE_ROWS]
    cut = (f" Only the first {len(shown)} of {len(trials)} trials are drawn."
           if len(trials) > len(shown) else "")
    return [
        ("Win rate", _png(_win_rates(rows, colours)),
         "per scenario and variant, bars with the Wilson 95 % interval."),
        ("Time to detect and to mitigate", _png(_times(trials, colours)),
         "each dot a trial, the bar its variant's median; trials that never got there "
         "(and harness errors) are not drawn."),
        ("Timeline", _png(_timelines(shown)),
         "one row per trial (lost ones in red), seconds from t=0; green spans: the oracle "
         "said healthy, red: broken; the grey tick is the time limit." + cut),
    ]


def _colours(variants: list[str]) -> dict[str, str]:
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
               "#bcbd22", "#17becf"]
    crew = [v for v in variants if v != BASELINE]
    return {v: "#7f7f7f" if v == BASELINE else palette[crew.index(v) % len(palette)]
            for v in variants}


def _text(s: str) -> str:
    # matplotlib reads $...$ as mathtext: data with a dollar would be typeset, or raise.
    return s.replace("$", r"\$")


def _png(fig: Figure) -> str:
    import matplotlib.pyplot as plt

    try:
        buf = io.BytesIO()
        # No Software metadata: it is matplotlib's URL, and the page names none.
        fig.savefig(buf, format="png", dpi=80, bbox_inches="tight",
                    metadata={"Software": None})
    finally:
        plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _scenarios(rows: list[Row]) -> list[tuple[str, str]]:
    return list(dict.fromkeys((r.subject, r.scenario) for r in rows))


def _win_rates(rows: list[Row], colours: dict[str, str]) -> Figure:
    import matplotlib.pyplot as plt

    cats = _scenarios(rows)
    variants = list(colours)
    width = 0.8 / max(len(variants), 1)
    fig, ax = plt.subplots(figsize=(min(30.0, max(6.0, 1.0 + 0.3 * len(cats) * len(variants))),
                                    4.0))
    for i, v in enumerate(variants):
        xs: list[float] = []
        rates: list[float] = []
        los: list[float] = []
        his: list[float] = []
        for r in rows:
            s = r.summary
            if r.variant != v or s.interval is None:
                continue  # a group with no scored trial has no bar (the table says 0/0)
            xs.append(cats.index((r.subject, r.scenario)) + (i - (len(variants) - 1) / 2) * width)
            rates.append(s.wins / s.scored)
            los.append(rates[-1] - s.interval[0])
            his.append(s.interval[1] - rates[-1])
        ax.bar(xs, rates, width, yerr=[los, his], capsize=2, color=colours[v],
               label=_text(v), error_kw={"elinewidth": 1, "ecolor": "#333"})
    ax.set_xticks(range(len(cats)), [_text(f"{s}/{n}") for s, n in cats], rotation=30,
                  ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("win rate")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def _times(trials: list[Trial], colours: dict[str, str]) -> Figure:
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rows = scenario_rows(trials)
    cats = _scenarios(rows)
    variants = list(colours)
    band = 0.8 / max(len(variants), 1)
    fig, axes = plt.subplots(1, 2, sharey=True, figsize=(
        12.0, min(40.0, max(2.5, 0.8 + 0.18 * len(cats) * len(variants)))))
    scored = [t for t in trials if not t.error]
    for ax, what, of in ((axes[0], "time to detect (s)", "ttd_s"),
                         (axes[1], "time to mitigate (s)", "ttm_s")):
        for i, v in enumerate(variants):
            offset = (i - (len(variants) - 1) / 2) * band
            for c, (subject, scenario) in enumerate(cats):
                xs = [x for t in scored if t.variant == v and t.subject == subject
                      and t.scenario == scenario and (x := getattr(t, of)) is not None]
                if not xs:
                    continue
                # Spread within the band by order, not at random: reruns draw the same.
                ys = [c + offset + band * 0.6 * (j / max(len(xs) - 1, 1) - 0.5)
                      for j in range(len(xs))]
                ax.scatter(xs, ys, s=14, color=colours[v], alpha=0.8)
                mid = median(xs) or 0.0
                ax.plot([mid, mid], [c + offset - band / 2, c + offset + band / 2],
                        color=colours[v], linewidth=2)
        ax.set_xlabel(what)
        ax.set_xlim(left=0)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(cats)), [_text(f"{s}/{n}") for s, n in cats])
    axes[0].invert_yaxis()
    handles = [Line2D([], [], color=colours[v], marker="o", linestyle="",
                          label=_text(v)) for v in variants]
    axes[1].legend(handles=handles, fontsize="small", loc="upper left",
                   bbox_to_anchor=(1.0, 1.0))
    return fig


def _spans(t: Trial, end: float) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """(healthy, broken) spans as (start, width): each oracle mark lasts until the next
    (a timeline is in time order, scoring sorts it)."""
    healthy: list[tuple[float, float]] = []
    broken: list[tuple[float, float]] = []
    marks = [m for m in t.timeline if m.kind in ("oracle_healthy", "oracle_broken")]
    for i, m in enumerate(marks):
        stop = marks[i + 1].t if i + 1 < len(marks) else end
        (healthy if m.kind == "oracle_healthy" else broken).append((m.t, max(stop - m.t, 0)))
    return healthy, broken


def _timelines(trials: list[Trial]) -> Figure:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12.0, 1.2 + 0.22 * max(len(trials), 1)))
    points: dict[str, tuple[list[float], list[int]]] = {k: ([], []) for k in MARKS}
    for y, t in enumerate(trials):
        # A bar lasts as long as the trial did (to its limit when its end is unknown), so
        # the strip's scale is the trials' own, not that of a limit most never reach.
        end = max([t.ended_s or t.limit_s, *(m.t for m in t.timeline)])
        ax.plot([0, end], [y, y], color="#ddd", linewidth=0.8, zorder=1)
        healthy, broken = _spans(t, end)
        ax.broken_barh(healthy, (y - 0.3, 0.6), facecolors="#2ca02c", alpha=0.18, zorder=0)
        ax.broken_barh(broken, (y - 0.3, 0.6), facecolors="#d62728", alpha=0.25, zorder=0)
        if t.limit_s and end >= t.limit_s:  # it ran to its limit
            ax.plot([t.limit_s], [y], marker="|", color="#888", markersize=9)
        for m in t.timeline:
            if m.kind in points:
                points[m.kind][0].append(m.t)
                points[m.kind][1].append(y)
    for kind, (xs, ys) in points.items():
        if xs:
            marker, colour = MARKS[kind]
            ax.scatter(xs, ys, marker=marker, color=colour, s=28, label=kind, zorder=3)
    ax.set_yticks(range(len(trials)), [_text(_label(t)) for t in trials], fontsize="small")
    for tick, t in zip(ax.get_yticklabels(), trials, strict=True):
        if t.error:
            tick.set_color("#999")
        elif not t.won:
            tick.set_color("#d62728")
    ax.set_ylim(len(trials) - 0.5, -0.5)  # the first trial on top
    ax.set_xlim(left=0)
    ax.set_xlabel("seconds from t=0")
    ax.grid(axis="x", alpha=0.3)
    if any(xs for xs, _ in points.values()):
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig
