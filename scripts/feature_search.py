#!/usr/bin/env python
"""Can φ be read off the unified features by a plain similarity search? A yardstick for what FA has to work with.

For every token p of F̄_R, the cosine with F̄'_D at p + o for the 5³ offsets o of ±2 tokens (FA's neighbourhood) is
averaged over a cube of --smooth³ tokens around p (a block-matching cost volume), and the soft-argmax at temperature
τ gives a displacement on the 1/Q grid. Its error against φ_gt (on that grid, over tokens that are mostly head) is
divided by the zero-flow error, per task, on held-out built-in pairs (`unifuse.train.heldout_set`, 48³ crops).
The same search on the raw 4³ intensity patches of a same-modality pair (I_R against I_R moved), each patch
centred, is printed as the reference: what a search finds when the features do match.

    python scripts/feature_search.py runs/x/checkpoint.pt
    python scripts/feature_search.py runs/x/checkpoint.pt --smooth 1 3 5 --tau 0.05 0.1

The last line is one JSON object.
"""
import argparse, json, os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from unifuse.launch import configure
configure()
import torch, torch.nn.functional as F
from unifuse.model import UniFuse
from unifuse.fa import cost_volume, offsets, token_patches
from unifuse.spatial import resize_flow
from unifuse.train import TrainConfig, heldout_set

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("checkpoint", help="a UniFuse.save or unifuse-train file, or 'shipped'")
ap.add_argument("--smooth", type=int, nargs="+", default=[1, 5], help="sides of the cost-volume averaging cube, tokens (odd)")
ap.add_argument("--tau", type=float, nargs="+", default=[0.05, 0.1], help="soft-argmax temperatures")
ap.add_argument("--subjects", type=int, default=2); ap.add_argument("--pool-dir", default="runs/pool")
a = ap.parse_args()
R = 2                                                                      # FA's neighbourhood: ±2 tokens
OFFS = offsets(R)                                                          # (125, 3)

def search(fr, fd, smooth, tau):
    "(B, M, d, h, w) twice → soft-argmax displacement (B, 3, d, h, w) of fr's tokens into fd, 1/Q voxels."
    s = cost_volume(fr, fd, R)                                             # (B, 125, d, h, w) cosines
    if smooth > 1: s = F.avg_pool3d(s, smooth, 1, smooth // 2, count_include_pad=False)
    return torch.einsum("bkdhw,kc->bcdhw", (s / tau).softmax(1), OFFS)

m = UniFuse.pretrained() if a.checkpoint == "shipped" else UniFuse.load(a.checkpoint)
m.eval()
q = m.cfg.patch
hb = heldout_set(a.subjects, 48, float(m.meta.get("spacing_mm", 1.5)), a.pool_dir, TrainConfig.preset("cpu"), workers=0)
sums = {}
for i in range(hb["ref"].shape[0]):
    ref, deg, gt, task = hb["ref"][i:i + 1], hb["deg"][i:i + 1], hb["flow"][i:i + 1].float(), hb["task"][i]
    with torch.no_grad():
        fd, fr = m.features(ref, deg)
        g = resize_flow(gt, tuple(fd.shape[2:]))
        head = F.adaptive_avg_pool3d((ref > 0.05).float(), fd.shape[2:])[:, 0] > 0.5
        zero = float(g.norm(dim=1)[head].mean())
        for src, (x, y) in (("features", (fr, fd)), ("raw same-modality", (token_patches(ref, q), token_patches(hb["ref_moved"][i:i + 1], q)))):
            for sm in a.smooth:
                for tau in a.tau:
                    err = float((search(x, y, sm, tau) - g).norm(dim=1)[head].mean())
                    for t in (task, "all"):
                        e = sums.setdefault((src, sm, tau, t), [0.0, 0.0]); e[0] += err; e[1] += zero
rows = [dict(source=src, smooth=sm, tau=tau, task=t, ratio=round(e / z, 3)) for (src, sm, tau, t), (e, z) in sums.items()]
for src in ("features", "raw same-modality"):
    for sm in a.smooth:
        for tau in a.tau:
            print(f"{src:18s} cube {sm}³ τ={tau}: " + "  ".join(f"{r['task']} {r['ratio']:.3f}" for r in rows
                                                          if (r["source"], r["smooth"], r["tau"]) == (src, sm, tau)), flush=True)
print(json.dumps(dict(checkpoint=a.checkpoint, subjects=a.subjects, rows=rows)))
