"""Summarise a jax.profiler trace (*.xplane.pb) without TensorFlow/xprof: GPU kernel time by kernel name and by
kind (gemm, cuDNN attention, XLA fusion, copies), from the raw protobuf wire format.

    python experiments/xplane_summary.py TRACE_DIR [--steps 2] [--top 40]

XSpace.planes(1) -> XPlane{name 2, lines 3, event_metadata 4: map<int64, XEventMetadata{name 2, display_name 4}>};
XLine{name 2, events 4}; XEvent{metadata_id 1, duration_ps 3}.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re


def _varint(b, i):
    r = s = 0
    while True:
        c = b[i]
        i += 1
        r |= (c & 0x7F) << s
        s += 7
        if c < 0x80:
            return r, i


def fields(b):
    """(field number, wire type, value) of one message; value bytes for length-delimited fields."""
    i, n = 0, len(b)
    while i < n:
        key, i = _varint(b, i)
        f, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _varint(b, i)
        elif wt == 1:
            v, i = int.from_bytes(b[i:i + 8], "little"), i + 8
        elif wt == 2:
            ln, i = _varint(b, i)
            v, i = b[i:i + ln], i + ln
        elif wt == 5:
            v, i = int.from_bytes(b[i:i + 4], "little"), i + 4
        else:
            raise ValueError(f"wire type {wt}")
        yield f, wt, v


def kind(name: str) -> str:
    n = name.lower()
    if any(s in n for s in ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul", "triton_gemm", "dot")):
        return "gemm"
    if any(s in n for s in ("cudnn", "fmha", "flash", "sdpa")):
        return "attention (cuDNN)"
    if "memcpy" in n or "memset" in n or "copy" in n:
        return "copy/memset"
    if "fusion" in n or "reduce" in n or "transpose" in n or "scatter" in n or "gather" in n:
        return "xla fusion"
    return "other"


def summarise(path: str, steps: int, top: int):
    files = sorted(glob.glob(os.path.join(path, "**", "*.xplane.pb"), recursive=True))
    if not files:
        print(f"no .xplane.pb under {path}")
        return
    data = open(files[-1], "rb").read()
    for f, _, plane in fields(data):
        if f != 1:
            continue
        pname, meta, lines = "", {}, []
        for pf, _, pv in fields(plane):
            if pf == 2:
                pname = pv.decode(errors="replace")
            elif pf == 3:
                lines.append(pv)
            elif pf == 4:  # map entry: key 1, value 2 (XEventMetadata)
                key, name = 0, ""
                for ef, _, ev in fields(pv):
                    if ef == 1:
                        key = ev
                    elif ef == 2:
                        disp = ""
                        for mf, _, mv in fields(ev):
                            if mf == 2 and not name:
                                name = mv.decode(errors="replace")
                            elif mf == 4:
                                disp = mv.decode(errors="replace")
                        name = disp or name
                meta[key] = name
        if not pname.startswith("/device:GPU"):
            print(f"(plane {pname}: {len(lines)} lines, skipped)")
            continue
        by_name, by_line = collections.Counter(), collections.Counter()
        count = collections.Counter()
        for line in lines:
            lname, evs = "", []
            for lf, _, lv in fields(line):
                if lf == 2:
                    lname = lv.decode(errors="replace")
                elif lf == 4:
                    evs.append(lv)
            for e in evs:
                mid = dur = 0
                for ef, _, ev in fields(e):
                    if ef == 1:
                        mid = ev
                    elif ef == 3:
                        dur = ev
                by_line[lname] += dur
                if "stream" in lname.lower() or lname.isdigit() or lname == "":
                    by_name[meta.get(mid, str(mid))] += dur
                    count[meta.get(mid, str(mid))] += 1
        print(f"== {pname}: lines {dict((k, round(v / 1e9 / steps, 2)) for k, v in by_line.items())} (ms/step)")
        total = sum(by_name.values())
        kinds, groups = collections.Counter(), collections.Counter()
        for n, d in by_name.items():
            kinds[kind(n)] += d
            groups[re.sub(r"[._]\d+$", "", n)[:60]] += d
        print(f"kernel time {total / 1e9 / steps:.2f} ms/step, {sum(count.values()) // steps} kernels/step")
        for k, d in kinds.most_common():
            print(f"  {k:22s} {d / 1e9 / steps:8.2f} ms  {100 * d / max(total, 1):5.1f}%")
        print("by kernel group:")
        for n, d in groups.most_common(top):
            print(f"  {d / 1e9 / steps:8.2f} ms  {n}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--top", type=int, default=40)
    a = ap.parse_args()
    summarise(a.path, a.steps, a.top)


if __name__ == "__main__":
    main()
