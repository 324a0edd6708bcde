#!/usr/bin/env python3
"""Table of predicted vs measured step latency from `mixserve-run bench --json` files.

  python3 tools/fidelity_report.py <dir-with-json> [--bar 10]

One row per (case, step kind): the case's model, layers, batch, the step shape, how many steps,
the median measured and the median predicted latency, the error of the medians
(predicted - measured) / measured, and the median |error| over the individual steps. Every case
is listed; a case whose JSON is missing or unreadable is listed as missing (from its .log). The
summary gives the median and worst |error| over the rows and how many are within the bar.

  --svg FILE   also draw the rows as an SVG: measured (x) against predicted (y) median step
               latency on log axes, the y = x line and the +-bar band, one colour per model,
               circles for decode and squares for prefill (no plotting library needed).
"""
import glob
import json
import math
import os
import statistics
import sys


def load_rows(d):
    """(rows, missing) of a results directory: one row per (case, step kind)."""
    rows, missing = [], []
    cases = sorted({os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(d, "*.log"))} |
                   {os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(d, "*.json"))})
    for case in cases:
        path = os.path.join(d, case + ".json")
        try:
            with open(path) as f:
                r = json.load(f)
            steps = r["steps"]
        except (OSError, ValueError, KeyError) as e:
            missing.append((case, type(e).__name__))
            continue
        model = r.get("model", {})
        for kind in ("prefill", "decode"):
            ss = [s for s in steps if s["kind"] == kind]
            if not ss:
                continue
            meas = statistics.median(s["measured_ms"] for s in ss)
            pred = statistics.median(s["predicted_ms"] for s in ss)
            per = statistics.median(abs(s["predicted_ms"] - s["measured_ms"]) / s["measured_ms"] * 100 for s in ss)
            toks = sorted({s["num_tokens"] for s in ss})
            shape = (f"{ss[0]['num_seqs']} seqs x decode" if kind == "decode"
                     else f"chunks of {'/'.join(str(t) for t in toks)} tok")
            rows.append(dict(case=case, model=model.get("name", "?"), layers=model.get("num_layers", "?"),
                             batch=r.get("batch_size", "?"), kind=kind, shape=shape, n=len(ss), meas=meas,
                             pred=pred, err=(pred - meas) / meas * 100, per=per))
    return rows, missing


def write_svg(rows, bar, path):
    """Predicted against measured, log-log, with the y = x line and the +-bar band."""
    W, H, L, B, R, T = 640, 520, 70, 60, 170, 20
    vals = [x["meas"] for x in rows] + [x["pred"] for x in rows]
    lo, hi = math.log10(min(vals) / 1.3), math.log10(max(vals) * 1.3)
    pw, ph = W - L - R, H - T - B

    def px(v):
        return L + (math.log10(v) - lo) / (hi - lo) * pw

    def py(v):
        return T + ph - (math.log10(v) - lo) / (hi - lo) * ph

    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf"]
    models = sorted({x["model"] for x in rows})
    col = {m: colors[i % len(colors)] for i, m in enumerate(models)}
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
           f'font-size="12">', f'<rect width="{W}" height="{H}" fill="white"/>']
    a, b = 10 ** lo, 10 ** hi
    f = 1 + bar / 100
    band = [(a, a * f), (b, b * f), (b, b / f), (a, a / f)]
    out.append('<polygon fill="#e8e8e8" points="' +
               " ".join(f"{px(x):.1f},{py(min(max(y, a), b)):.1f}" for x, y in band) + '"/>')
    out.append(f'<line x1="{px(a):.1f}" y1="{py(a):.1f}" x2="{px(b):.1f}" y2="{py(b):.1f}" stroke="#555"/>')
    out.append(f'<rect x="{L}" y="{T}" width="{pw}" height="{ph}" fill="none" stroke="black"/>')
    for e in range(math.floor(lo), math.ceil(hi) + 1):
        for m in (1, 2, 5):
            v = m * 10 ** e
            if a <= v <= b:
                out.append(f'<line x1="{px(v):.1f}" y1="{T + ph}" x2="{px(v):.1f}" y2="{T + ph + 4}" stroke="black"/>')
                out.append(f'<text x="{px(v):.1f}" y="{T + ph + 17}" text-anchor="middle">{v:g}</text>')
                out.append(f'<line x1="{L - 4}" y1="{py(v):.1f}" x2="{L}" y2="{py(v):.1f}" stroke="black"/>')
                out.append(f'<text x="{L - 7}" y="{py(v) + 4:.1f}" text-anchor="end">{v:g}</text>')
    out.append(f'<text x="{L + pw / 2}" y="{H - 18}" text-anchor="middle">measured step latency (ms)</text>')
    out.append(f'<text x="16" y="{T + ph / 2}" text-anchor="middle" transform="rotate(-90 16 {T + ph / 2})">'
               f'predicted step latency (ms)</text>')
    for x in rows:
        cx, cy, c = px(x["meas"]), py(x["pred"]), col[x["model"]]
        tip = (f'<title>{x["model"]} {x["layers"]} layers, batch {x["batch"]}, {x["kind"]}: measured '
               f'{x["meas"]:.3f} ms, predicted {x["pred"]:.3f} ms ({x["err"]:+.1f}%)</title>')
        if x["kind"] == "decode":
            out.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="5" fill="{c}">{tip}</circle>')
        else:
            out.append(f'<rect x="{cx - 5:.1f}" y="{cy - 5:.1f}" width="10" height="10" fill="{c}">{tip}</rect>')
    ly = T + 10
    for m in models:
        out.append(f'<circle cx="{W - R + 16}" cy="{ly}" r="5" fill="{col[m]}"/>')
        out.append(f'<text x="{W - R + 26}" y="{ly + 4}">{m}</text>')
        ly += 18
    out.append(f'<circle cx="{W - R + 16}" cy="{ly + 10}" r="5" fill="#777"/>'
               f'<text x="{W - R + 26}" y="{ly + 14}">decode</text>')
    out.append(f'<rect x="{W - R + 11}" y="{ly + 23}" width="10" height="10" fill="#777"/>'
               f'<text x="{W - R + 26}" y="{ly + 32}">prefill</text>')
    out.append(f'<rect x="{W - R + 11}" y="{ly + 41}" width="10" height="10" fill="#e8e8e8" stroke="#999"/>'
               f'<text x="{W - R + 26}" y="{ly + 50}">within {bar:g}%</text>')
    within = sum(abs(x["err"]) <= bar for x in rows)
    out.append(f'<text x="{W - R + 11}" y="{ly + 74}">{within} of {len(rows)} rows</text>')
    out.append("</svg>")
    with open(path + ".tmp", "w") as fh:
        fh.write("\n".join(out) + "\n")
    os.replace(path + ".tmp", path)


def main():
    args = sys.argv[1:]
    bar = 10.0
    svg = None
    if "--bar" in args:
        i = args.index("--bar")
        bar = float(args[i + 1])
        del args[i:i + 2]
    if "--svg" in args:
        i = args.index("--svg")
        svg = args[i + 1]
        del args[i:i + 2]
    if len(args) != 1 or not os.path.isdir(args[0]):
        sys.exit("usage: fidelity_report.py <dir> [--bar PCT] [--svg FILE]")
    rows, missing = load_rows(args[0])
    print(f"| model | layers | batch | step | shape | steps | measured ms | predicted ms | error | median step |error| |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for x in rows:
        mark = "" if abs(x["err"]) <= bar else " (miss)"
        print(f"| {x['model']} | {x['layers']} | {x['batch']} | {x['kind']} | {x['shape']} | {x['n']} | "
              f"{x['meas']:.3f} | {x['pred']:.3f} | {x['err']:+.1f}%{mark} | {x['per']:.1f}% |")
    for case, why in missing:
        print(f"| {case} | | | | missing ({why}) | | | | | |")
    if rows:
        errs = [abs(x["err"]) for x in rows]
        within = sum(e <= bar for e in errs)
        print(f"\n{len(rows)} rows: median |error| {statistics.median(errs):.1f}%, worst {max(errs):.1f}%, "
              f"{within} of {len(rows)} within {bar:g}%; {len(missing)} case(s) missing")
        if svg:
            write_svg(rows, bar, svg)
    else:
        print(f"\nno results; {len(missing)} case(s) missing")


if __name__ == "__main__":
    main()
