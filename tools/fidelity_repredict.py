#!/usr/bin/env python3
"""Re-predict stored fidelity measurements with the current cost model and a profile, on the CPU.

    python3 tools/fidelity_repredict.py <results-dir> <plans-dir> <out-dir> [--profile P]

For every <model>-L<layers>-B<batch>.json in results-dir (mixserve-run bench --json), runs
`mixserve-plan validate --plan <plans-dir>/plan-<model>.yaml --results R` with the results'
prediction.profile replaced by P (default: the profile name the results name), writes the results
with each step's predicted_ms replaced by validate's into out-dir, and prints the fidelity table
(tools/fidelity_report.py) over them. The measurements are not changed: this is a re-prediction,
not a new measurement.
"""
import argparse
import hashlib
import glob
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("plans")
    ap.add_argument("out")
    ap.add_argument("--profile", default="")
    ap.add_argument("--plan-bin", default=os.path.join(ROOT, "build", "planner", "mixserve-plan"))
    ap.add_argument("--regenerated-plans", action="store_true",
                    help="the plans were re-made by `tools/fidelity.sh prepare` (same model, cluster, workload "
                         "and layout; another creation time, so another sha256): the results' plan.sha256 is "
                         "replaced by the given plan's (after checking model and layout agree)")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    files = sorted(glob.glob(os.path.join(a.results, "*-L*-B*.json")))
    if not files:
        sys.exit(f"fidelity_repredict: no results in {a.results}")
    for f in files:
        r = json.load(open(f))
        if a.profile:
            r["prediction"]["profile"] = os.path.abspath(a.profile)
        model = r["plan"]["model"]
        plan_path = os.path.join(a.plans, f"plan-{model}.yaml")
        if a.regenerated_plans:
            text = open(plan_path, "rb").read()
            layout = r["plan"].get("layout", "")
            if layout and layout.encode() not in text:
                sys.exit(f"fidelity_repredict: {plan_path} does not hold the results' layout '{layout}'")
            r["plan"]["sha256"] = hashlib.sha256(text).hexdigest()
        tmp = os.path.join(a.out, os.path.basename(f))
        json.dump(r, open(tmp, "w"))
        vj = tmp + ".validate"
        p = subprocess.run([a.plan_bin, "validate", "--plan", os.path.join(a.plans, f"plan-{model}.yaml"),
                            "--results", tmp, "--json", vj], capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"fidelity_repredict: validate failed on {f}:\n{p.stderr}")
        v = json.load(open(vj))
        os.remove(vj)
        if len(v["steps"]) != len(r["steps"]):
            sys.exit(f"fidelity_repredict: {f}: validate gave {len(v['steps'])} steps, results have {len(r['steps'])}")
        for s, vs in zip(r["steps"], v["steps"]):
            s["predicted_ms"] = vs["predicted_ms"]
        json.dump(r, open(tmp, "w"), indent=1)
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "fidelity_report.py"), a.out], check=True)


if __name__ == "__main__":
    main()
