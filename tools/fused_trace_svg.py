#!/usr/bin/env python3
"""The ring stages of one fused decode layer, from trace builds' bench logs, as an SVG.

  python3 tools/fused_trace_svg.py OUT.svg LABEL=LOG [LABEL=LOG ...]

LOG: the output of `MIXSERVE_FUSED_PHASE_TIMING=1 test_gpu_forward --no-skip
-tc='bench: Qwen3-30B-A3B all 48*'` from a build with -DMIXSERVE_FUSED_TRACE_STAGES=N (decode_layer.hpp),
whose lines "#   stage G KIND issue I land A done D (n B)" give, for the stamped (middle) layer and
each of a block's ring stages G, the median over the blocks of when the producer issued its copy,
when its consumer warp saw it landed and when that warp had summed it (us after the first block's
start). One panel per log: a stage per row, a thin line from issue to landing, a bar from landing to
done, coloured by kind; vertical marks at the layer's named stamps (median over the blocks: the
residual combined, routed, SwiGLU staged, the last down sum). A consumer sees a stage "landed" when
it gets there, so a late "land" is the copy or the consumer, whichever came later. No plotting
library is needed. Exit 2 naming the log when it has no stage lines.
"""
import re
import sys

KINDS = {"qkv": "#4e79a7", "oproj": "#76b7b2", "router": "#59a14f", "gateup": "#edc948", "down": "#b07aa1"}
STAGE = re.compile(r"#\s+stage\s+(\d+)\s+(\w+)\s+issue\s+(-?[0-9.]+)\s+land\s+(-?[0-9.]+)\s+done\s+(-?[0-9.]+)\s+\(n (\d+)\)")
STAMPS = re.compile(r"fused layer stamps \(us after the first block start, median / max over \d+ blocks\):(.*)")
EVENT = re.compile(r"\s*([A-Za-z][A-Za-z0-9() ]*?)\s+(-?[0-9.]+)/(-?[0-9.]+)")
MARKS = ["pdl wait", "combined", "routed", "staged", "last red"]
MARK_LABEL = {"pdl wait": "layer start", "combined": "combined", "routed": "routed", "staged": "SwiGLU staged",
              "last red": "down summed"}


def read_log(path):
    """([(stage, kind, issue, land, done, n)], {stamp: median}, step us or None) of one trace log."""
    try:
        text = open(path, encoding="utf-8", errors="replace").read()
    except OSError as e:
        sys.exit(f"fused_trace_svg: cannot read {path}: {e}")
    stages = [(int(g), k, float(i), float(a), float(d), int(n)) for g, k, i, a, d, n in STAGE.findall(text)]
    if not stages:
        print(f"fused_trace_svg: {path}: no stage trace lines (a build with -DMIXSERVE_FUSED_TRACE_STAGES=N, "
              "run with MIXSERVE_FUSED_PHASE_TIMING=1)", file=sys.stderr)
        sys.exit(2)
    marks = {}
    m = STAMPS.search(text)
    if m:
        for name, med, _ in EVENT.findall(m.group(1)):
            marks[name.strip()] = float(med)
    step = re.search(r"\d+L decode b=1 ctx=\d+ GEMV, graph, fused decode layer\s+([0-9.]+)", text)
    return stages, marks, float(step.group(1)) if step else None


def esc(s):
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def main(argv):
    if len(argv) < 3 or any("=" not in a for a in argv[2:]):
        print(__doc__, file=sys.stderr)
        return 2
    out = argv[1]
    runs = [(a.split("=", 1)[0], read_log(a.split("=", 1)[1])) for a in argv[2:]]
    tmax = max(max(max(s[2], s[3], s[4]) for s in st) for _, (st, _, _) in runs)
    tmax = max(tmax, max((max(mk.values()) if mk else 0.0) for _, (_, mk, _) in runs))
    tmax = (int(tmax / 5) + 1) * 5
    row, left, width, top = 7, 60, 760, 44
    panels = []
    y = top
    for label, (stages, marks, step) in runs:
        h = row * (max(s[0] for s in stages) + 1)
        panels.append((label, stages, marks, step, y, h))
        y += h + 70
    height = y + 10
    sx = lambda t: left + width * max(t, 0.0) / tmax
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 150}" height="{height}" '
         'font-family="sans-serif" font-size="11">',
         f'<text x="{left}" y="18" font-size="13">A fused layer\'s ring stages (one block\'s stage order, median over '
         'the 132 blocks): issue - landing seen (line), summed (bar)</text>']
    lx = left
    for k, c in KINDS.items():
        o.append(f'<rect x="{lx}" y="26" width="10" height="8" fill="{c}"/><text x="{lx + 13}" y="34">{k}</text>')
        lx += 70
    for label, stages, marks, step, y0, h in panels:
        title = esc(label) + (f" (step {step:.1f} us)" if step else "")
        o.append(f'<text x="{left}" y="{y0 + 12}" font-size="12">{title}</text>')
        ya = y0 + 18
        for t in range(0, tmax + 1, 5):
            o.append(f'<line x1="{sx(t):.1f}" y1="{ya}" x2="{sx(t):.1f}" y2="{ya + h}" stroke="#eee"/>')
            o.append(f'<text x="{sx(t):.1f}" y="{ya + h + 12}" text-anchor="middle" fill="#666">{t}</text>')
        for g, kind, issue, land, done, n in stages:
            c = KINDS.get(kind, "#999")
            yy = ya + g * row
            o.append(f'<line x1="{sx(issue):.1f}" y1="{yy + row / 2:.1f}" x2="{sx(land):.1f}" y2="{yy + row / 2:.1f}" '
                     f'stroke="{c}" stroke-width="1"/>')
            o.append(f'<rect x="{sx(land):.1f}" y="{yy + 1}" width="{max(sx(done) - sx(land), 1):.1f}" '
                     f'height="{row - 2}" fill="{c}"><title>stage {g} {kind}: issue {issue} land {land} done {done} '
                     f'(n {n})</title></rect>')
        for i, name in enumerate(MARKS):
            if name in marks:
                x = sx(marks[name])
                o.append(f'<line x1="{x:.1f}" y1="{ya}" x2="{x:.1f}" y2="{ya + h}" stroke="#c00" '
                         'stroke-dasharray="3,3"/>')
                o.append(f'<text x="{x + 2:.1f}" y="{ya + 9 + 10 * (i % 3)}" fill="#c00" font-size="9">'
                         f'{MARK_LABEL[name]}</text>')
        o.append(f'<text x="{left + width + 6}" y="{ya + h + 12}" fill="#666">us</text>')
    o.append("</svg>")
    with open(out, "w", encoding="utf-8") as f:
        f.write("\n".join(o) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
