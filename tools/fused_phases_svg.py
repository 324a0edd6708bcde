#!/usr/bin/env python3
"""Where a fused batch-1 decode layer's time goes, from the 48-layer bench logs, as an SVG.

  python3 tools/fused_phases_svg.py OUT.svg LABEL=LOG [LABEL=LOG ...]

LOG: the output of `MIXSERVE_FUSED_PHASE_TIMING=1 test_gpu_forward --no-skip
-tc='bench: Qwen3-30B-A3B all 48*'` (or its `fused_bench` log from tools/gpu-quick.sh). From each
it reads the b=1 rows (the fused step and the unfused decode kernels, us and % of the copy
bandwidth) and the line "fused layer phases (us, block 0, mean per layer)": the seven phases of
the kernel as block 0 sees them (each ends where the next begins, barrier or wait included).
One horizontal bar per log, the phases stacked, the step time and its share of the copy bandwidth
at the right; a dashed line where a layer would have to end for 60% of the copy bandwidth (the
step's time outside the layers taken from each log as step - layers x the phases' sum, averaged:
an estimate, and labelled so). No plotting library is needed. Exit 2 naming the log when a line is missing.
"""
import re
import sys

PHASES = ["q|k|v", "attention", "merge", "o_proj", "router", "routing + gate|up", "down + end"]
COLOURS = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1"]


def read_log(path):
    """(phases [7] us, fused step us, fused % copy, unfused step us or None, layers) of one bench log."""
    try:
        text = open(path, encoding="utf-8", errors="replace").read()
    except OSError as e:
        sys.exit(f"fused_phases_svg: cannot read {path}: {e}")
    m = re.search(r"fused layer phases \(us, block 0, mean per layer\):((?:\s+[0-9.]+){7})", text)
    fused = re.search(r"(\d+)L decode b=1 ctx=\d+ GEMV, graph, fused decode layer\s+([0-9.]+)(?:\s+\S+){3}\s+([0-9.]+)%",
                      text)
    unfused = re.search(r"b=1 ctx=\d+ GEMV, graph, decode kernels\s+([0-9.]+)", text)
    if not m or not fused:
        print(f"fused_phases_svg: {path}: no 'fused layer phases' line or no fused b=1 row", file=sys.stderr)
        sys.exit(2)
    phases = [float(x) for x in m.group(1).split()]
    layers = int(fused.group(1))
    return phases, float(fused.group(2)), float(fused.group(3)), float(unfused.group(1)) if unfused else None, layers


def write_svg(rows, path):
    # Room at the left for the longest label (~6.6 px a character at 12 px sans-serif).
    left = max(190, int(max(len(r[0]) for r in rows) * 6.6) + 16)
    right, top, bar_h, gap = 380, 78, 26, 14
    scale = 9.0  # px per us of a layer
    longest = max(sum(r[1]) for r in rows)
    W = int(left + longest * scale + right)
    H = top + len(rows) * (bar_h + gap) + 60
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
           f'font-size="12">', f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{left}" y="20" font-size="14">Fused b=1 decode layer of Qwen3-30B-A3B on the H200: '
           f'mean time per layer (block 0)</text>']
    # 60%: the step at 60% of the copy bandwidth (fused x pct / 60) minus the time outside the layers.
    outside = sum(r[2] - r[5] * sum(r[1]) for r in rows) / len(rows)
    target = sum((r[2] * r[3] / 60.0 - outside) / r[5] for r in rows) / len(rows)
    tx = left + target * scale
    out.append(f'<line x1="{tx:.1f}" y1="{top - 8}" x2="{tx:.1f}" y2="{top + len(rows) * (bar_h + gap) - gap + 4}" '
               f'stroke="#333" stroke-dasharray="4,3"/>')
    out.append(f'<text x="{tx + 4:.1f}" y="{top - 24}" fill="#333">60% of the copy bandwidth: ~{target:.1f} us/layer</text>')
    out.append(f'<text x="{tx + 4:.1f}" y="{top - 10}" fill="#333">(estimate: {outside:.0f} us of each step outside the '
               f'layers)</text>')
    for i, (label, phases, fused, pct, unfused, _) in enumerate(rows):
        y = top + i * (bar_h + gap)
        out.append(f'<text x="{left - 8}" y="{y + bar_h * 0.68:.1f}" text-anchor="end">{label}</text>')
        x = left
        for k, v in enumerate(phases):
            w = v * scale
            out.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{COLOURS[k]}">'
                       f'<title>{PHASES[k]}: {v:.2f} us</title></rect>')
            if w > 26:
                out.append(f'<text x="{x + w / 2:.1f}" y="{y + bar_h * 0.68:.1f}" text-anchor="middle" '
                           f'fill="white">{v:.1f}</text>')
            x += w
        tail = f"{sum(phases):.1f} us/layer; step {fused:.0f} us = {pct:.1f}%"
        if unfused:
            tail += f" (unfused {unfused:.0f})"
        out.append(f'<text x="{x + 6:.1f}" y="{y + bar_h * 0.68:.1f}">{tail}</text>')
    ly = top + len(rows) * (bar_h + gap) + 10
    lx = left
    for k, name in enumerate(PHASES):
        out.append(f'<rect x="{lx}" y="{ly}" width="12" height="12" fill="{COLOURS[k]}"/>')
        out.append(f'<text x="{lx + 16}" y="{ly + 10}">{name}</text>')
        lx += 16 + 7 * len(name) + 18
    out.append(f'<text x="{left}" y="{ly + 34}" fill="#555">% = the copy bandwidth over the bytes the step '
               f'must read (issue #5 asks 60%)</text>')
    out.append("</svg>")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(out) + "\n")
    import os
    os.replace(tmp, path)


def main(argv):
    if len(argv) < 3 or any("=" not in a for a in argv[2:]):
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    rows = []
    for arg in argv[2:]:
        label, path = arg.split("=", 1)
        rows.append((label,) + read_log(path))
    write_svg(rows, argv[1])
    for label, phases, fused, pct, unfused, _ in rows:
        print(f"{label}: {' '.join(f'{v:.2f}' for v in phases)} us/layer; step {fused:.1f} us ({pct:.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
