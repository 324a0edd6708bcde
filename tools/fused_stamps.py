#!/usr/bin/env python3
"""A fused decode layer's per-block stamps from the 48-layer bench log, as a timeline.

  python3 tools/fused_stamps.py LOG [LOG ...]

LOG: the output of `MIXSERVE_FUSED_PHASE_TIMING=1 test_gpu_forward --no-skip
-tc='bench: Qwen3-30B-A3B all 48*'` (or its `fused_bench` log from tools/gpu-quick.sh), whose line
"fused layer stamps (us after the first block start, median / max over N blocks): NAME m/x ..."
holds one layer's stamps (decode_layer.hpp `diag`, the middle layer of the launch). For each log:
the events sorted by their median, with the median, the max over the blocks and the gap to the
previous event, so that the layer's dependent chain reads top to bottom. Exit 2 naming the log when
the line is missing.
"""
import re
import sys

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
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
