#!/usr/bin/env python3
"""A fused decode layer's per-block stamps from the 48-layer bench log, as a timeline.

  python3 tools/fused_stamps.py LOG [LOG ...]

LOG: the output of `MIXSERVE_FUSED_PHASE_TIMING=1 test_gpu_forward --no-skip
-tc='bench: Qwen3-30B-A3B all 48*'` (or its `fused_bench` log from tools/gpu-quick.sh), whose line
"fused layer stamps (us after the first block start, median / max over N blocks): NAME m/x ..."
holds one layer's stamps (decode_layer.hpp `diag`, the middle layer of the launch). For each log:
the events sorted by their median, with the median, the max over the blocks and the gap to the
previous event, so that the layer's dependent chain reads top to bottom; for a trace build's log
(-DMIXSERVE_FUSED_TRACE_STAGES=N) also its ring stages by kind. Exit 2 naming the log when the line
is missing.
"""
import re
import sys

STAGE = re.compile(r"#\s+stage\s+(\d+)\s+(\w+)\s+issue\s+(-?[0-9.]+)\s+land\s+(-?[0-9.]+)\s+done\s+(-?[0-9.]+)")
LINE = re.compile(r"fused layer stamps \(us after the first block start, median / max over (\d+) blocks\):(.*)")
EVENT = re.compile(r"\s*([A-Za-z][A-Za-z0-9() ]*?)\s+(-?[0-9.]+)/(-?[0-9.]+)")


def read_stamps(path):
    """(blocks, [(name, median, max)]) of the log's stamps line, sorted by median."""
    try:
        text = open(path, encoding="utf-8", errors="replace").read()
    except OSError as e:
        sys.exit(f"fused_stamps: cannot read {path}: {e}")
    m = LINE.search(text)
    if not m:
        print(f"fused_stamps: {path}: no 'fused layer stamps' line (run the bench with MIXSERVE_FUSED_PHASE_TIMING=1)",
              file=sys.stderr)
        sys.exit(2)
    events = [(name.strip(), float(med), float(mx)) for name, med, mx in EVENT.findall(m.group(2))]
    if not events:
        print(f"fused_stamps: {path}: the stamps line has no events", file=sys.stderr)
        sys.exit(2)
    return int(m.group(1)), sorted(events, key=lambda e: e[1])


def stage_kinds(path):
    """Per kind of a trace build's stage lines (in stage order): [(kind, stages, first issue, last
    issue, first land, last land, last done)]; empty without them."""
    text = open(path, encoding="utf-8", errors="replace").read()
    rows = []
    for _, kind, issue, land, done in STAGE.findall(text):
        issue, land, done = float(issue), float(land), float(done)
        if rows and rows[-1][0] == kind:
            k, n, i0, _, l0, _, d = rows[-1]
            rows[-1] = (k, n + 1, i0, issue, l0, land, max(d, done))
        else:
            rows.append((kind, 1, issue, issue, land, land, done))
    return rows


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    for path in argv[1:]:
        blocks, events = read_stamps(path)
        print(f"# {path}: one layer's stamps, us after the first block's start (median / max over {blocks} blocks)")
        print(f"{'event':<18} {'median':>8} {'max':>8} {'+gap':>7}")
        prev = None
        for name, med, mx in events:
            gap = "" if prev is None else f"{med - prev:+7.2f}"
            print(f"{name:<18} {med:8.2f} {mx:8.2f} {gap:>7}")
            prev = med
        kinds = stage_kinds(path)
        if kinds:
            print("# the stage trace by kind (medians over the blocks): stages, issued, seen landed, last summed")
            print(f"{'kind':<8} {'n':>3} {'issue first':>12} {'last':>7} {'land first':>11} {'last':>7} {'done last':>10}")
            for k, n, i0, i1, l0, l1, d in kinds:
                print(f"{k:<8} {n:3d} {i0:12.2f} {i1:7.2f} {l0:11.2f} {l1:7.2f} {d:10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
