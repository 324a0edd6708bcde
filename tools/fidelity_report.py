#!/usr/bin/env python3
"""Table of predicted vs measured step latency from `mixserve-run bench --json` files.

  python3 tools/fidelity_report.py <dir-with-json> [--bar 10]

One row per (case, step kind): the case's model, layers, batch, the step shape, how many steps,
the median measured and the median predicted latency, the error of the medians
(predicted - measured) / measured, and the median |error| over the individual steps. Every case
is listed; a case whose JSON is missing or unreadable is listed as missing (from its .log). The
summary gives the median and worst |error| over the rows and how many are within the bar.
"""
import glob
import json
import os
import statistics
import sys


def main():
    args = sys.argv[1:]
    bar = 10.0
    if "--bar" in args:
        i = args.index("--bar")
        bar = float(args[i + 1])
        del args[i:i + 2]
    if len(args) != 1 or not os.path.isdir(args[0]):
        sys.exit("usage: fidelity_report.py <dir> [--bar PCT]")
    d = args[0]
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
    else:
        print(f"\nno results; {len(missing)} case(s) missing")


if __name__ == "__main__":
    main()
