#!/usr/bin/env python
"""Where on the token grid do the unified features vary, and is it the image? Content and margin by distance to the border.

For held-out built-in pairs (`unifuse.train.heldout_set`, 48³ crops) the features FA receives (F̄'_D, F̄_R, each
channel centred over the grid) are split into shells by their distance in tokens to the crop's border (0: the
outermost layer, 3: three or more tokens in). Per task and shell: the share of F̄'_D's variation that lies there, its
content (‖c(F̄'_D) − c(F̄'_D of the mirrored DEG)‖ / ‖c(F̄'_D)‖ over that shell) and the correspondence margin there
(`unifuse.metrics.correspondence_margin`, per token). Features that encode where a token sits in the crop rather than
what is there put their variation in the outer shells and keep little content anywhere.

    python scripts/feature_shells.py runs/x/checkpoint.pt
    python scripts/feature_shells.py shipped

The last line is one JSON object.
"""
import argparse, json, os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from unifuse.launch import configure
configure()
import torch, torch.nn.functional as F
from unifuse.model import UniFuse
from unifuse.spatial import resize_flow, warp
from unifuse.train import TrainConfig, heldout_set

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("checkpoint", help="a UniFuse.save or unifuse-train file, or 'shipped'")
ap.add_argument("--subjects", type=int, default=2); ap.add_argument("--pool-dir", default="runs/pool")
a = ap.parse_args()
m = UniFuse.pretrained() if a.checkpoint == "shipped" else UniFuse.load(a.checkpoint)
m.eval()
hb = heldout_set(a.subjects, 48, float(m.meta.get("spacing_mm", 1.5)), a.pool_dir, TrainConfig.preset("cpu"), workers=0)
centred = lambda f: f - f.mean((2, 3, 4), keepdim=True)
acc = {}
for i in range(hb["ref"].shape[0]):
    ref, deg, gt, task = hb["ref"][i:i + 1], hb["deg"][i:i + 1], hb["flow"][i:i + 1].float(), hb["task"][i]
    with torch.no_grad():
        fd, fr = m.features(ref, deg)
        fdm, _ = m.features(ref, deg.flip(2, 3, 4))
        phi = resize_flow(gt, tuple(fd.shape[2:]))
    d, dm, r = centred(fd.double()), centred(fdm.double()), centred(fr.double())
    margin = (F.cosine_similarity(r, warp(d, phi.double()), dim=1) - F.cosine_similarity(r, dm, dim=1))[0]
    g = torch.tensor(fd.shape[2:]).view(3, 1, 1, 1)
    idx = torch.stack(torch.meshgrid(*[torch.arange(int(s)) for s in fd.shape[2:]], indexing="ij"))
    shell = torch.minimum(idx, g - 1 - idx).min(0).values.clamp(max=3)            # tokens to the nearest border
    for s in range(4):
        sel = shell == s
        if not sel.any(): continue
        e = acc.setdefault((task, s), [0.0, 0.0, 0.0, 0])
        e[0] += float((d - dm)[0][:, sel].pow(2).sum()); e[1] += float(d[0][:, sel].pow(2).sum())
        e[2] += float(margin[sel].sum()); e[3] += int(sel.sum())
rows = []
for task in dict.fromkeys(t for t, _ in acc):
    total = sum(e[1] for (t, _), e in acc.items() if t == task)
    for s in range(4):
        if (task, s) not in acc: continue
        num, den, mg, n = acc[task, s]
        rows.append(dict(task=task, shell=s, tokens=n, variation_share=round(den / total, 3),
                         content=round((num / max(den, 1e-30)) ** 0.5, 3), margin=round(mg / n, 3)))
        print(f"{task:4s} shell {s}{'+' if s == 3 else ' '} ({n:5d} tokens): {100 * den / total:5.1f} % of the variation, "
              f"content {rows[-1]['content']:.2f}, margin {rows[-1]['margin']:+.3f}", flush=True)
print(json.dumps(dict(checkpoint=a.checkpoint, subjects=a.subjects, rows=rows)))
