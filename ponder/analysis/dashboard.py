"""The plasticity run's dashboard: one self-contained HTML file (inline SVG, no network).

`render(state, rows)` turns `ponder.plasticity.PlasticityPolicy`'s JSON state and the
run's metrics.jsonl rows into a page; `write(workdir, state)` writes it to
<workdir>/dashboard.html atomically, so a browser reloading it mid-run never sees half
a file. The sections (each a <section> with the id below, never empty: a section
without data yet says what it waits for):

  timeline    the phases (warm-up, each cycle's fine-tune) along the steps
  loss        the training loss with the warm-up's end and the prune / regrow marks
  heatmaps    attention entropy and gradient importance (layer x head) per cycle
  masks       the head-mask timeline: per head, active / pruned / revived per cycle
  table       per cycle: metric, parameters, compiled FLOPs, CPU time, against baseline
  generations baseline and pruned continuations of the same prompts and seeds

The scripts only count script errors (data-errors on <html>), mark the page as
rendered (data-ready on <body>) and fill the footer's section count, so a headless
browser test can tell a page that ran cleanly from one that did not.
"""

import html
import json
import os
from typing import Optional, Sequence

from ponder import metric_log as plog

SECTIONS = ("timeline", "loss", "heatmaps", "masks", "table", "generations")
PHASE_COLOURS = {"warmup": "#9ecae1", "finetune": "#fdae6b", "done": "#a1d99b"}

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1200px}
section{border:1px solid #ddd;border-radius:6px;padding:.8em 1em;margin:1em 0}
h1{font-size:1.4em}h2{font-size:1.1em;margin:.2em 0 .6em}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:right}th{background:#f4f4f4}.gen td{text-align:left;vertical-align:top;
max-width:500px;font-family:monospace;font-size:.85em}.note{color:#777}
.heat{display:inline-block;margin:0 1em 1em 0;vertical-align:top}
"""

# In <head>, before anything else runs: counts script errors on the root element.
_ERRORS = """
window.addEventListener("error", function (e) {
  var n = Number(document.documentElement.getAttribute("data-errors") || 0) + 1;
  document.documentElement.setAttribute("data-errors", String(n));
});
"""

_SCRIPT = """
document.addEventListener("DOMContentLoaded", function () {
  var found = document.querySelectorAll("section.panel").length;
  document.getElementById("section-count").textContent = found + " sections";
  document.body.setAttribute("data-ready", "1");
});
"""


def _esc(x) -> str:
  return html.escape(str(x))


def _fmt(x, digits: int = 4) -> str:
  if isinstance(x, float):
    return f"{x:.{digits}g}"
  return _esc(x)


def _waiting(text: str) -> str:
  return f'<p class="note waiting">{_esc(text)}</p>'


def _line_chart(xs: Sequence[float], ys: Sequence[float], marks: Sequence[tuple], *,
                width: int = 900, height: int = 260) -> str:
  """A polyline of (xs, ys) with vertical marks [(x, label, colour)]."""
  pad = 45
  x0, x1 = min(xs), max(max(xs), min(xs) + 1)
  y0, y1 = min(ys), max(max(ys), min(ys) + 1e-9)
  sx = lambda x: pad + (x - x0) / (x1 - x0) * (width - 2 * pad)  # noqa: E731
  sy = lambda y: height - pad + (y0 - y) / (y1 - y0) * (height - 2 * pad)  # noqa: E731
  points = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(xs, ys))
  parts = [f'<svg width="{width}" height="{height}" role="img">',
           f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" '
           'stroke="#999"/>',
           f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#999"/>',
           f'<text x="{pad}" y="{height - 15}" font-size="11">step {x0:g}</text>',
           f'<text x="{width - pad - 60}" y="{height - 15}" font-size="11">step {x1:g}</text>',
           f'<text x="2" y="{pad}" font-size="11">{y1:.3g}</text>',
           f'<text x="2" y="{height - pad}" font-size="11">{y0:.3g}</text>']
  for i, (x, label, colour) in enumerate(marks):
    # Labels of marks near the right edge end at their line, so they are not cut off.
    right = sx(x) > width - 120
    anchor = ' text-anchor="end"' if right else ""
    parts.append(f'<line x1="{sx(x):.1f}" y1="{pad}" x2="{sx(x):.1f}" y2="{height - pad}" '
                 f'stroke="{colour}" stroke-dasharray="4,3"/>'
                 f'<text x="{sx(x) + (-3 if right else 3):.1f}" '
                 f'y="{pad + 12 + 12 * (i % 4)}" font-size="10" fill="{colour}"{anchor}>'
                 f'{_esc(label)}</text>')
  parts.append(f'<polyline points="{points}" fill="none" stroke="#3366cc" '
               'stroke-width="1.5"/></svg>')
  return "".join(parts)


def _heatmap(matrix, title: str, *, cell: int = 18, mask=None) -> str:
  """A layer x head grid, white (lowest) to dark blue (highest); masked heads hatched
  grey."""
  rows, cols = len(matrix), len(matrix[0])
  flat = [v for row in matrix for v in row]
  lo, hi = min(flat), max(max(flat), min(flat) + 1e-12)
  parts = [f'<div class="heat"><div>{_esc(title)}</div>'
           f'<svg width="{max(cols * cell + 40, 200)}" height="{rows * cell + 20}" '
           'role="img">']
  for i, row in enumerate(matrix):
    parts.append(f'<text x="0" y="{i * cell + 13}" font-size="10">L{i}</text>')
    for j, v in enumerate(row):
      t = (v - lo) / (hi - lo)
      fill = f"rgb({int(255 - 222 * t)},{int(255 - 153 * t)},{int(255 - 51 * t)})"
      if mask is not None and not mask[i][j]:
        fill = "#bbbbbb"
      parts.append(f'<rect x="{30 + j * cell}" y="{i * cell}" width="{cell - 1}" '
                   f'height="{cell - 1}" fill="{fill}"><title>layer {i} head {j}: '
                   f'{v:.4g}</title></rect>')
  parts.append(f'<text x="30" y="{rows * cell + 14}" font-size="10">min {lo:.3g}, '
               f'max {hi:.3g}</text></svg></div>')
  return "".join(parts)


def _timeline(state: dict, last_step: int) -> str:
  events = state.get("events") or []
  if not events:
    return _waiting("No phase has started yet.")
  spans = []  # (start, end, name)
  current = ("warmup", 0)
  for e in events[1:]:
    if e["phase"] in ("prune", "done"):
      spans.append((current[1], e["step"], current[0]))
      current = ("finetune" if e["phase"] == "prune" else "done", e["step"])
  spans.append((current[1], max(last_step, current[1] + 1), current[0]))
  end = max(s[1] for s in spans) or 1
  width, pad = 900, 10
  scale = lambda x: pad + x / end * (width - 2 * pad)  # noqa: E731
  parts = [f'<svg width="{width}" height="80" role="img">']
  rows = {"baseline": 56, "regrow": 66, "evaluate": 76}  # Same-step marks stack.
  for start, stop, name in spans:
    bar = max(scale(stop) - scale(start), 1)
    parts.append(f'<rect x="{scale(start):.1f}" y="10" width="{bar:.1f}" '
                 f'height="30" fill="{PHASE_COLOURS.get(name, "#ccc")}" stroke="#fff">'
                 f'<title>{_esc(name)} {start}-{stop}</title></rect>'
                 f'<text x="{scale(start) + 3:.1f}" y="30" font-size="11">{_esc(name)}</text>')
  for e in events:
    if e["phase"] in rows:
      parts.append(f'<text x="{scale(e["step"]):.1f}" y="{rows[e["phase"]]}" font-size="10">'
                   f'{_esc(e["phase"][0].upper())}</text>')
  parts.append("</svg>")
  warm = state.get("warmup_end")
  ended = (f"Warm-up ended at step {warm['step']} by {_esc(warm['reason'])}."
           if warm else "Warm-up is running (plateau detector on the training loss).")
  listing = ", ".join(f"{e['phase']}@{e['step']}" for e in events)
  return "".join(parts) + f"<p>{ended} B = baseline kept, R = regrow, E = evaluate.</p>" \
      f'<p class="note">{_esc(listing)}</p>'


def _loss(state: dict, rows: list) -> str:
  train = [r for r in rows if r.get("split") == "train" and "loss" in r]
  if len(train) < 2:
    return _waiting("Waiting for training-loss logs.")
  marks = []
  warm = state.get("warmup_end")
  if warm:
    marks.append((warm["step"], f"warm-up end ({warm['reason']})", "#2ca02c"))
  for e in state.get("events") or []:
    if e["phase"] == "prune":
      marks.append((e["step"], f"prune c{e['cycle']} (-{e['count']})", "#d62728"))
    if e["phase"] == "regrow":
      marks.append((e["step"], f"regrow c{e['cycle']} (+{e['count']})", "#9467bd"))
  return _line_chart([r["step"] for r in train], [r["loss"] for r in train], marks)


def _heatmaps(state: dict) -> str:
  analyses = [c["analysis"] for c in state.get("cycles") or []]
  pending = state.get("analysis")
  if pending and all(a["cycle"] != pending["cycle"] for a in analyses):
    analyses.append(pending)
  if not analyses:
    return _waiting("Heads are scored when the warm-up ends.")
  parts = []
  for a in analyses:
    parts.append(f"<h3>Cycle {a['cycle']} (step {a['step']})</h3>")
    parts.append(_heatmap(a["normalized_entropy"], "normalised entropy"))
    parts.append(_heatmap(a["importance"], "gradient importance"))
  return "".join(parts)


def _masks(state: dict) -> str:
  cycles = state.get("cycles") or []
  pending = state.get("analysis")
  if not cycles and not pending:
    return _waiting("No head has been pruned yet.")
  mask = state["cycle"]["mask"]
  n_layer, n_head = len(mask), len(mask[0])
  columns = []  # Per cycle: {(l, h): "pruned" | "revived"} and the mask after it.
  for c in cycles:
    marks = {tuple(p): "pruned" for p in c["pruned"]}
    marks.update({tuple(p): "revived" for p in c["revived"]})
    columns.append((f"c{c['cycle']}", marks, c["mask"]))
  if pending and all(c["cycle"] != pending["cycle"] for c in cycles):
    columns.append((f"c{pending['cycle']} (fine-tuning)",
                    {tuple(p): "pruned" for p in pending["pruned"]}, mask))
  colour = {"pruned": "#d62728", "revived": "#2ca02c"}
  cell, label_w = 12, 60
  width = label_w + len(columns) * 80
  height = n_layer * n_head * cell + 30
  parts = [f'<svg width="{width}" height="{height}" role="img">']
  for k, (name, _, _) in enumerate(columns):
    parts.append(f'<text x="{label_w + k * 80}" y="12" font-size="11">{_esc(name)}</text>')
  for layer in range(n_layer):
    for head in range(n_head):
      y = 20 + (layer * n_head + head) * cell
      if head == 0:
        parts.append(f'<text x="0" y="{y + 10}" font-size="10">L{layer}</text>')
      for k, (name, marks, after) in enumerate(columns):
        fill = colour.get(marks.get((layer, head)),
                          "#3366cc" if after[layer][head] else "#dddddd")
        parts.append(f'<rect x="{label_w + k * 80}" y="{y}" width="70" height="{cell - 2}" '
                     f'fill="{fill}"><title>L{layer} H{head} {name}: '
                     f'{marks.get((layer, head), "active" if after[layer][head] else "masked")}'
                     '</title></rect>')
  parts.append("</svg>")
  return ('<p>Per head (rows, by layer) and cycle (columns): <b style="color:#d62728">'
          'pruned</b> in that cycle, <b style="color:#2ca02c">revived</b> at its regrowth, '
          'blue active, grey masked after the cycle.</p>' + "".join(parts))


def _table(state: dict) -> str:
  base = state.get("baseline")
  cycles = state.get("cycles") or []
  if not base or not cycles:
    return _waiting("The first row appears at the end of cycle 0's fine-tune.")
  head = ("<tr><th>cycle</th><th>step</th><th>pruned</th><th>revived</th><th>active</th>"
          "<th>metric</th><th>baseline</th><th>params</th><th>baseline params</th>"
          "<th>FLOPs</th><th>baseline FLOPs</th><th>time (s)</th><th>baseline time (s)</th>"
          "<th>speed-up</th></tr>")
  body = []
  for c in cycles:
    cost = c["cost"]
    b, p = cost["baseline"], cost["pruned"]
    body.append(
        f"<tr><td>{c['cycle']}</td><td>{c['step']}</td><td>{len(c['pruned'])}</td>"
        f"<td>{len(c['revived'])}</td><td>{c['active']}</td><td>{_fmt(c['metric'])}</td>"
        f"<td>{_fmt(c['baseline_metric'])}</td><td>{p['params']:,}</td>"
        f"<td>{b['params']:,}</td><td>{p['flops']:.4g}</td><td>{b['flops']:.4g}</td>"
        f"<td>{p['time_s']:.4g}</td><td>{b['time_s']:.4g}</td>"
        f"<td>{cost['speedup']:.3f}x</td></tr>")
  return f"<table>{head}{''.join(body)}</table>"


def _generations(state: dict) -> str:
  base = state.get("baseline") or {}
  cycles = state.get("cycles") or []
  baseline = base.get("generations") or []
  if not baseline:
    return _waiting("Generations are shown for language models once the baseline is kept "
                    "(an encoder run has none).")
  head = "<tr><th>prompt (seed)</th><th>baseline</th>" + "".join(
      f"<th>cycle {c['cycle']}</th>" for c in cycles) + "</tr>"
  rows = []
  for i, g in enumerate(baseline):
    cells = "".join(f"<td>{_esc(c['generations'][i]['text'])}</td>" for c in cycles
                    if len(c.get("generations") or []) > i)
    rows.append(f"<tr><td>{_esc(g['prompt'])} ({g['seed']})</td><td>{_esc(g['text'])}</td>"
                f"{cells}</tr>")
  return f'<table class="gen">{head}{"".join(rows)}</table>'


def render(state: dict, rows: list, *, title: str = "Plasticity run") -> str:
  """The dashboard page for a policy state and the run's metrics rows."""
  last_step = max([r["step"] for r in rows] or [0])
  bodies = {"timeline": ("Phase timeline", _timeline(state, last_step)),
            "loss": ("Training loss", _loss(state, rows)),
            "heatmaps": ("Entropy and importance per cycle (layer x head)", _heatmaps(state)),
            "masks": ("Head-mask timeline", _masks(state)),
            "table": ("Per cycle against the baseline", _table(state)),
            "generations": ("Generations, baseline and pruned", _generations(state))}
  sections = "".join(f'<section class="panel" id="{name}"><h2>{_esc(bodies[name][0])}</h2>'
                     f"{bodies[name][1]}</section>" for name in SECTIONS)
  data = json.dumps({"events": state.get("events") or []})
  return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_esc(title)}</title>"
          f"<style>{_STYLE}</style><script>{_ERRORS}</script></head>"
          f"<body><h1>{_esc(title)}</h1>{sections}"
          f'<footer class="note">up to step {last_step}; <span id="section-count"></span>'
          f'</footer><script type="application/json" id="events">{html.escape(data)}'
          f"</script><script>{_SCRIPT}</script></body></html>")


def write(workdir: str, state: dict, *, title: Optional[str] = None) -> str:
  """Renders the run in `workdir` to <workdir>/dashboard.html; returns the path."""
  path = os.path.join(workdir, "dashboard.html")
  page = render(state, plog.read_metrics(workdir), title=title or f"Plasticity: {workdir}")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(page)
  os.replace(tmp, path)
  return path
