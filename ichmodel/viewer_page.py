"""The viewer's page: one HTML file with inline SVG strips, a little CSS and a few lines of JavaScript.

:func:`page_html` renders the series that :mod:`ichmodel.viewer` read (its :class:`ichmodel.viewer.SeriesView`
rows (built by :func:`ichmodel.viewer.series_views`), the thresholds and the thumbnails it wrote) into ``viewer/index.html``: one ``<section class="series">``
per series with ``data-*`` attributes that the script sorts (highest probability overall or of one class,
most errors, series id) and filters (positive, misses, false alarms) on; the URL hash sets both on load
(``index.html#sort=max-sah&show=fn``). No server, no network: it opens from ``file://``.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import numpy as np

from ichmodel.constants import CLASSES, NUM_CLASSES


@dataclass
class SeriesView:
    """One series of the prediction table, in slice order: probabilities ``[T, 5]``, labels ``[T, 5]`` or
    None, and where each slice fires (``probs >= thresholds``)."""

    index: int
    series_id: str
    slice_ids: list[str]
    probs: np.ndarray
    labels: np.ndarray | None
    fired: np.ndarray

    @property
    def fn(self) -> np.ndarray:
        """``[T, 5]`` labelled slices below the threshold (all False without labels)."""
        return np.zeros_like(self.fired) if self.labels is None else (self.labels > 0) & ~self.fired

    @property
    def fp(self) -> np.ndarray:
        """``[T, 5]`` fired slices without the label (all False without labels)."""
        return np.zeros_like(self.fired) if self.labels is None else (self.labels == 0) & self.fired


#: Slice status colours (colour-blind safe pairs: orange / purple).
COLOURS = {"fired": "#d62728", "below": "#b4b4b4", "tp": "#303030", "fn": "#f07f00", "fp": "#7b3294"}
#: Every strip has the same width (the series from first to last slice), whatever its length.
STRIP_WIDTH = 280
DRAW_ORDER = ("below", "fired", "tp", "fn", "fp")  # the grey area first, the fired bars over it
STRIP_HEIGHT = 22  # px of the bar area; the status band lies below it
BAND_HEIGHT = 5


def _num(v: float) -> str:
    return f"{v:.4f}"


def strip_svg(view: SeriesView, c: int, threshold: float) -> str:
    """Inline SVG of one class of one series: probability bars, threshold line, status band."""
    probs, fired = view.probs[:, c], view.fired[:, c]
    num = len(probs)
    h = STRIP_HEIGHT
    tops = [f"{round(h * (1.0 - float(v)), 1):g}" for v in probs]  # y of each bar's top, in strip pixels
    # every slice as one grey step area, the fired ones drawn over it in red: a few bytes per slice
    paths: dict[str, list[str]] = {k: [] for k in COLOURS}
    paths["below"] = [f"M0 {h}" + "".join(f"V{y}H{t + 1}" for t, y in enumerate(tops)) + f"V{h}z"]
    paths["fired"] = [f"M{t} {h}V{tops[t]}H{t + 1}V{h}z" for t in np.flatnonzero(fired)]
    if view.labels is not None:
        for key, mask in (
            ("tp", (view.labels[:, c] > 0) & fired),
            ("fn", view.fn[:, c]),
            ("fp", view.fp[:, c]),
        ):
            paths[key] += [f"M{t} {h + 1}h1v{BAND_HEIGHT - 1}h-1z" for t in np.flatnonzero(mask)]
    shapes = "".join(f'<path class="{k}" d="{"".join(paths[k])}"/>' for k in DRAW_ORDER if paths[k])
    y = h * (1.0 - threshold)
    p = " ".join(f"{v:.2f}" for v in probs)
    return (
        f'<svg class="strip" width="{STRIP_WIDTH}" height="{h + BAND_HEIGHT}" viewBox="0 0 {num} {h + BAND_HEIGHT}" '
        f'preserveAspectRatio="none" data-p="{p}" data-t="{threshold:.4f}">'
        f'<rect width="{num}" height="{h}"/>{shapes}<line x2="{num}" y1="{y:.2f}" y2="{y:.2f}"/></svg>'
    )


def series_html(
    view: SeriesView,
    thresholds: np.ndarray,
    chosen: list[int],
    thumbs: dict[tuple[int, int], str],
    windows: list[str],
) -> str:
    fired_any = view.fired.any(axis=0)  # [5] series decision
    fn, fp = view.fn, view.fp
    truth = None if view.labels is None else (view.labels > 0).any(axis=0)
    attrs = {
        "series": view.series_id,
        "slices": len(view.slice_ids),
        "max": _num(float(view.probs.max())),
        **{f"max-{cls}": _num(float(view.probs[:, c].max())) for c, cls in enumerate(CLASSES)},
        "positive": " ".join(cls for c, cls in enumerate(CLASSES) if fired_any[c]),
        "fn": int(fn.sum()),
        "fp": int(fp.sum()),
        "errors": int(fn.sum() + fp.sum()),
    }
    if truth is not None:
        attrs["labelled"] = " ".join(cls for c, cls in enumerate(CLASSES) if truth[c])
    data = " ".join(f'data-{k}="{html.escape(str(v))}"' for k, v in attrs.items())
    chips = []
    for c, cls in enumerate(CLASSES):
        if fired_any[c] and (truth is None or truth[c]):
            chips.append(f'<span class="chip pos">{cls.upper()}</span>')
        elif fired_any[c]:
            chips.append(
                f'<span class="chip fpc" title="false alarm: no slice labelled">{cls.upper()} ✗</span>'
            )
        elif truth is not None and truth[c]:
            chips.append(
                f'<span class="chip fnc" title="missed: labelled, no slice fired">missed {cls.upper()}</span>'
            )
    decision = "".join(chips) or '<span class="chip neg">negative</span>'
    lanes = []
    for c, cls in enumerate(CLASSES):
        marks = []
        if fn[:, c].any():
            marks.append(f'<span class="m fn">{int(fn[:, c].sum())} missed</span>')
        if fp[:, c].any():
            marks.append(f'<span class="m fp">{int(fp[:, c].sum())} false</span>')
        lanes.append(
            f'<tr class="lane" data-class="{cls}" data-fn="{int(fn[:, c].sum())}" data-fp="{int(fp[:, c].sum())}">'
            f'<th>{cls}</th><td class="max{" hit" if fired_any[c] else ""}">{view.probs[:, c].max():.2f}</td>'
            f'<td>{strip_svg(view, c, float(thresholds[c]))}</td><td class="marks">{"".join(marks)}</td></tr>'
        )
    figures = []
    for t in chosen:
        name = thumbs.get((view.index, t))
        if name is None:
            continue
        parts = [f"#{t}"]
        for c in np.flatnonzero(view.fired[t] | fn[t]):
            kind = "fn" if fn[t, c] else ("fp" if fp[t, c] else "hit")
            what = ("missed " if kind == "fn" else "") + f"{CLASSES[c]} {view.probs[t, c]:.2f}"
            parts.append(f'<b class="{kind}">{what.replace(" ", "&nbsp;")}</b>')
        kind = "fn" if fn[t].any() else ("fp" if fp[t].any() else "fired")
        caption = " ".join(parts)
        figures.append(
            f'<figure class="{kind}"><img loading="lazy" decoding="async" src="{name}" '
            f'alt="slice {t} of {html.escape(view.series_id)}" title="{html.escape(view.slice_ids[t])}">'
            f"<figcaption>{caption}</figcaption></figure>"
        )
    shown = sum(1 for t in chosen if view.fired[t].any())
    more = int(view.fired.any(axis=1).sum()) - shown
    extra = f'<p class="more">+{more} more fired slices</p>' if more > 0 and figures else ""
    return (
        f'<section class="series" {data}><header><h2>{html.escape(view.series_id)}</h2>'
        f'<span class="n">{len(view.slice_ids)} slices · max {view.probs.max():.2f}</span>{decision}</header>'
        f'<div class="body"><table class="lanes">{"".join(lanes)}</table>'
        f'<div class="thumbs">{"".join(figures)}{extra}</div></div></section>'
    )


def page_html(
    title: str,
    views: list[SeriesView],
    thresholds: np.ndarray,
    chosen: dict[int, list[int]],
    thumbs: dict[tuple[int, int], str],
    windows: list[str],
) -> str:
    labelled = bool(views) and views[0].labels is not None
    order = sorted(views, key=lambda v: (-float(v.probs.max()), v.series_id))  # as the default sort shows it
    rows = "".join(series_html(v, thresholds, chosen[v.index], thumbs, windows) for v in order)
    head = "".join(f"<th>{c}</th>" for c in CLASSES)
    stats = [
        ("threshold", [f"{t:.2f}" for t in thresholds]),
        ("series positive", [str(sum(bool(v.fired[:, c].any()) for v in views)) for c in range(NUM_CLASSES)]),
        ("slices fired", [str(sum(int(v.fired[:, c].sum()) for v in views)) for c in range(NUM_CLASSES)]),
    ]
    if labelled:
        stats += [
            (
                "slices labelled",
                [str(sum(int((v.labels[:, c] > 0).sum()) for v in views)) for c in range(NUM_CLASSES)],
            ),
            ("missed (FN)", [str(sum(int(v.fn[:, c].sum()) for v in views)) for c in range(NUM_CLASSES)]),
            (
                "false alarms (FP)",
                [str(sum(int(v.fp[:, c].sum()) for v in views)) for c in range(NUM_CLASSES)],
            ),
        ]
    summary = "".join(f"<tr><th>{k}</th>{''.join(f'<td>{x}</td>' for x in vals)}</tr>" for k, vals in stats)
    sort_options = [("max", "highest probability")] + [(f"max-{c}", f"highest {c}") for c in CLASSES]
    sort_options += [("errors", "most errors (FN + FP)")] if labelled else []
    sort_options += [("slices", "most slices"), ("series", "series id")]
    show_options = [("all", "all series"), ("positive", "decided positive")]
    show_options += [("fn", "with misses"), ("fp", "with false alarms")] if labelled else []
    legend = (
        f'<span class="key" style="background:{COLOURS["fired"]}"></span>fired (≥ threshold, dashed) '
        f'<span class="key" style="background:{COLOURS["below"]}"></span>below threshold'
    )
    if labelled:
        legend += (
            f' · band under the bars: <span class="key" style="background:{COLOURS["tp"]}"></span>labelled, caught '
            f'<span class="key" style="background:{COLOURS["fn"]}"></span>missed (FN) '
            f'<span class="key" style="background:{COLOURS["fp"]}"></span>false alarm (FP)'
        )
    window_note = (
        f"Thumbnails: the slices that fired (and missed slices), as the model saw them: {' | '.join(windows)}."
        if windows
        else "No thumbnails (no shard folder given)."
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{_CSS}</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="intro">{len(views)} series, {sum(len(v.slice_ids) for v in views)} slices{", labelled" if labelled else ""}.
A slice fires for a class when its probability reaches the class threshold; a series is positive for a class
when one of its slices fires. {window_note}</p>
<table class="summary"><tr><th></th>{head}</tr>{summary}</table>
<div class="controls">
<label>sort by <select id="sort">{"".join(f'<option value="{k}">{v}</option>' for k, v in sort_options)}</select></label>
<label>show <select id="show">{"".join(f'<option value="{k}">{v}</option>' for k, v in show_options)}</select></label>
<span id="count"></span><span class="legend">{legend}</span></div>
<div id="tip" hidden></div>
<main id="rows">{rows}</main>
<script>{_JS}</script>
</body></html>
"""


_CSS = (
    """
body{font:13px/1.35 system-ui,sans-serif;margin:12px 18px;color:#222;background:#fff}
h1{font-size:20px;margin:4px 0}.intro{max-width:1100px;color:#444}
table.summary{border-collapse:collapse;margin:6px 0}table.summary td,table.summary th{border:1px solid #ddd;
padding:2px 8px;text-align:right}table.summary th{background:#f6f6f6}
.controls{position:sticky;top:0;background:#fff;padding:6px 0;border-bottom:1px solid #ccc;z-index:2}
.controls label{margin-right:14px}#count{margin-right:14px;color:#555}.legend{color:#444}
.key{display:inline-block;width:10px;height:10px;margin:0 3px 0 8px;vertical-align:-1px}
.series{border-bottom:1px solid #e4e4e4;padding:6px 0}
.series header{display:flex;gap:8px;align-items:baseline;flex-wrap:wrap}
.series h2{font-size:14px;margin:0;font-family:ui-monospace,monospace}.n{color:#666}
.chip{border-radius:3px;padding:0 6px;font-weight:600;font-size:12px}.pos{background:#d62728;color:#fff}
.neg{background:#e8e8e8;color:#555}.fnc{background:#f07f00;color:#fff}.fpc{background:#7b3294;color:#fff}
.body{display:flex;gap:16px;align-items:flex-start;margin-top:3px}
table.lanes{border-collapse:collapse;flex:none}table.lanes th{font-weight:600;text-align:left;width:30px;
font-family:ui-monospace,monospace}table.lanes td{padding:0 4px;height:28px}
td.max{color:#777;width:32px;text-align:right;font-variant-numeric:tabular-nums}td.max.hit{color:#d62728;
font-weight:700}td.marks{width:120px}svg.strip{display:block;border-left:1px solid #ccc}
.m{font-size:11px;margin-right:6px;white-space:nowrap}.m.fn,b.fn{color:#c05f00}.m.fp,b.fp{color:#7b3294}
b.hit{color:#b01c1c}b{font-weight:600}.thumbs{display:flex;flex-wrap:wrap;gap:6px;flex:1 1 300px;min-width:0}
figure{margin:0;border:2px solid #d62728;width:min-content;background:#fff}figure.fn{border-color:#f07f00;
border-style:dashed}figure.fp{border-color:#7b3294}figure img{display:block;height:80px;background:#000}
figcaption{font-size:11px;line-height:1.2;padding:1px 2px}
.more{color:#666;align-self:center}
svg.strip rect{fill:#f4f4f4}svg.strip line{stroke:#000;stroke-dasharray:4 3;vector-effect:non-scaling-stroke}
"""
    + "".join(f"svg.strip .{k}{{fill:{v}}}" for k, v in COLOURS.items())
    + """
#tip{position:fixed;background:#222;color:#fff;padding:2px 6px;font-size:12px;border-radius:3px;
pointer-events:none;z-index:3}
"""
)

_JS = """
(function(){
  const rows=document.getElementById('rows'), sortSel=document.getElementById('sort'),
        showSel=document.getElementById('show'), count=document.getElementById('count'),
        tip=document.getElementById('tip');
  const all=Array.from(rows.querySelectorAll('section.series'));
  function apply(){
    const key=sortSel.value, show=showSel.value;
    const num=k=>s=>parseFloat(s.dataset[k.replace(/-(.)/g,(m,c)=>c.toUpperCase())]);
    let cmp;
    if(key==='series') cmp=(a,b)=>a.dataset.series<b.dataset.series?-1:a.dataset.series>b.dataset.series?1:0;
    else {const v=num(key); cmp=(a,b)=>(v(b)-v(a))||(a.dataset.series<b.dataset.series?-1:1);}
    const sorted=all.slice().sort(cmp);
    let shown=0;
    for(const s of sorted){
      const ok=show==='all'||(show==='positive'&&s.dataset.positive)||(show==='fn'&&+s.dataset.fn>0)
               ||(show==='fp'&&+s.dataset.fp>0);
      s.hidden=!ok; shown+=ok?1:0; rows.appendChild(s);
    }
    count.textContent=shown+' of '+all.length+' series';
    history.replaceState(null,'','#sort='+key+'&show='+show);
  }
  const hash=new URLSearchParams(location.hash.slice(1));
  for(const [sel,name] of [[sortSel,'sort'],[showSel,'show']]){
    const v=hash.get(name); if(v&&Array.from(sel.options).some(o=>o.value===v)) sel.value=v;
    sel.addEventListener('change',apply);
  }
  apply();
  rows.addEventListener('mousemove',e=>{
    const svg=e.target.closest('svg.strip'); if(!svg){tip.hidden=true;return;}
    const p=svg.dataset.p.split(' '), r=svg.getBoundingClientRect();
    const i=Math.min(p.length-1,Math.floor((e.clientX-r.left)/r.width*p.length));
    const cls=svg.closest('tr').dataset.class;
    tip.textContent='slice '+i+' · '+cls+' '+p[i]+' (threshold '+parseFloat(svg.dataset.t).toFixed(2)+')';
    tip.style.left=(e.clientX+12)+'px'; tip.style.top=(e.clientY+12)+'px'; tip.hidden=false;
  });
  rows.addEventListener('mouseleave',()=>{tip.hidden=true;});
})();
"""
