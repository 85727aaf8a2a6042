#!/usr/bin/env python3
"""Pools the per-repetition lines ("  rep N vWire|vL3 S stream(s): X Gbit/s") that
`nsm-bench vl3 --only throughput` prints to stderr, over several runs' saved outputs:
medians and means of each wiring and their ratios, for 1 and 4 streams.

usage: pool-vl3-throughput.py UNPINNED_RUN[,UNPINNED_RUN...] [PINNED_RUN[,...]]
"""
import re,sys,statistics as st
def load(files):
    d={}
    for f in files:
        for line in open(f):
            m=re.match(r"\s+rep (\d+) (vWire|vL3)\s+(\d) stream\(s\): ([\d.]+) Gbit/s",line)
            if m:
                d.setdefault((f,int(m[1]),m[3]),{})[m[2]]=float(m[4])
    return d
groups=[("unpinned",sys.argv[1].split(","))]+([("pinned",sys.argv[2].split(","))] if len(sys.argv)>2 else [])
for label,files in groups:
    d=load(files)
    for s in "14":
        w=[v["vWire"] for k,v in d.items() if k[2]==s and len(v)==2]
        l=[v["vL3"] for k,v in d.items() if k[2]==s and len(v)==2]
        r=[v["vL3"]/v["vWire"] for k,v in d.items() if k[2]==s and len(v)==2]
        print(f"{label} {s} stream: n={len(w)} pooled median vWire {st.median(w):.2f} vL3 {st.median(l):.2f} ratio {st.median(l)/st.median(w):.3f}; median per-rep ratio {st.median(r):.3f}; mean vWire {st.mean(w):.2f} vL3 {st.mean(l):.2f} ratio {st.mean(l)/st.mean(w):.3f}")
