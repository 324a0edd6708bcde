#!/usr/bin/env python3
# Per-kernel table of the `bench: profile*` case of test_gpu_forward run under
#   ncu --profile-from-start off --clock-control none --cache-control none \
#       --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum \
#       --csv --page raw --print-kernel-base function --log-file ncu.csv
# Usage: ncu_summary.py ncu.csv. Steps are split at the embedding gather (the first kernel of a
# step); the case profiles b=1 previous, b=1 decode kernels, b=64 previous, b=64 decode kernels.
import csv
import sys

rows = [r for r in csv.reader(l for l in open(sys.argv[1]) if not l.startswith('=='))]
h = rows[0]
ki, gi = h.index('Kernel Name'), h.index('Grid Size')
ti, ri = h.index('gpu__time_duration.sum'), h.index('dram__bytes_read.sum')
assert rows[1][ti] == 'ns' and rows[1][ri] == 'byte', rows[1][ti]


def num(x):
    return float(x.replace(',', ''))


steps, cur = [], None
for r in rows[2:]:
    if r[ki].startswith('gather_rows') and (cur is None or r[ki] != cur[-1][ki] and
                                            cur[-1][ki].startswith(('nvjet', 'gemv'))):
        cur = []
        steps.append(cur)
    cur.append(r)
labels = ['b=1 previous kernels', 'b=1 decode kernels', 'b=64 previous kernels', 'b=64 decode kernels (grouped GEMV v2: the default when this ran)']
for lab, st in zip(labels, steps):
    print(f"## {lab}: {len(st)} kernels, sum {sum(num(r[ti]) for r in st) / 1e3:.1f} us")
    for r in st:
        t, rd = num(r[ti]), num(r[ri])
        print(f"  {r[ki][:44]:44s} {r[gi]:>14s} {t / 1e3:8.2f} us  read {rd / 1e6:9.3f} MB  {rd / t:6.0f} GB/s")
