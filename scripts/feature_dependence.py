#!/usr/bin/env python
"""Which input do the unified features depend on? Mirror one input at a time and see which stream moves.

For each checkpoint (or `init`: the same architecture with fresh weights) and each held-out built-in pair (48³ centre
crops, `unifuse.train.heldout_set`), the relative change ‖c(F) − c(F')‖ / ‖c(F)‖ (c: each channel's spatial mean
removed, as in `unifuse.metrics.feature_content`) of F̄'_D and of F̄_R when DEG, or REF, is mirrored along all three
axes. F̄'_D | DEG is the issue's content; F̄'_D | REF shows a leak of the reference into the degraded stream;
F̄_R | REF the reference stream's own content.

    python scripts/feature_dependence.py init runs/x/checkpoint.pt
"""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch
from unifuse.model import UniFuse
from unifuse.train import heldout_set, TrainConfig

def change(a, b):
    c = lambda f: f - f.mean((2, 3, 4), keepdim=True)
    return float((c(a) - c(b)).norm() / c(a).norm().clamp_min(1e-12))

args = sys.argv[1:] or ["init", "shipped"]
for name in args:
    m = (UniFuse.pretrained() if name == "shipped" else
         UniFuse(UniFuse.load(next(a for a in args if a not in ("init", "shipped"))).cfg) if name == "init" else UniFuse.load(name))
    m.eval()
    hb = heldout_set(2, 48, float(m.meta.get("spacing_mm", 1.5)) if name != "init" else 1.493, "runs/pool", TrainConfig.preset("cpu"), workers=0)
    rows = []
    with torch.no_grad():
        for i in range(hb["ref"].shape[0]):
            r, d = hb["ref"][i:i + 1], hb["deg"][i:i + 1]
            fd, fr = m.features(r, d)
            fd_d, fr_d = m.features(r, d.flip(2, 3, 4))
            fd_r, fr_r = m.features(r.flip(2, 3, 4), d)
            rows.append((hb["task"][i], change(fd, fd_d), change(fd, fd_r), change(fr, fr_r), change(fr, fr_d)))
    for t in dict.fromkeys(x[0] for x in rows):
        rs = [x for x in rows if x[0] == t]
        v = [sum(x[k] for x in rs) / len(rs) for k in range(1, 5)]
        print(f"{name} {t}: F'_D | DEG mirrored {v[0]:.2f}, F'_D | REF mirrored {v[1]:.2f}, "
              f"F_R | REF mirrored {v[2]:.2f}, F_R | DEG mirrored {v[3]:.2f}")
