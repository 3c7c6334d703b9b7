#!/usr/bin/env python
"""How many steps does a plain CNN need to learn φ_D→R on the trainer's batches? A yardstick for FA's learning curve.

MONAI's UNet (2 → 3 channels, full resolution) is trained on the `cpu` preset's batches (48³ crops at 1.5 mm, built-in
pool in --pool-dir), AdamW at --lr, batch 3, with
  --loss sup:  ‖φ − φ_gt‖² (what L_reg, Eq. 6, asks of FA);
  --loss sim:  local NCC (MONAI, kernel 7) of the warped clean moving volume against its aligned clean twin;
  --loss both: sim + 0.02 · sup.
--pair same feeds (I_R, I_R moved): one modality, clean; --pair cross feeds (I_R, I'_D): the task's two modalities,
I'_D degraded, as UniFuse sees them. Each batch is scored before it is trained on (every batch is new: random
subjects, crops and misalignments), so "online flow error / zero flow" over the last 250 steps is a held-out figure
(voxels with I_R > 0.05, as in `unifuse.train.alignment_check`).

    python scripts/registration_baseline.py --pair same --loss sup --steps 1500
    python scripts/registration_baseline.py --pair cross --loss both --steps 3000 --tasks mri ct pet

About 0.25 s a step (sup) or 0.4 s (sim) on an idle 2-core CPU. The last line is one JSON object.
"""
import argparse, json, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from unifuse.launch import configure
configure()
import torch
from unifuse.train import TrainConfig, Trainer, TASK_NAMES
from unifuse.spatial import warp

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--pair", choices=("same", "cross"), default="same")
ap.add_argument("--loss", choices=("sup", "sim", "both"), default="sup")
ap.add_argument("--steps", type=int, default=1500); ap.add_argument("--lr", type=float, default=2e-3)
ap.add_argument("--every", type=int, default=250, help="report the online ratio over this many steps")
ap.add_argument("--tasks", nargs="+", default=["mri"], choices=TASK_NAMES)
ap.add_argument("--channels", type=int, nargs="+", default=[16, 32, 32, 32])
ap.add_argument("--pool-dir", default="runs/pool")
a = ap.parse_args()
from monai.networks.nets import UNet
from monai.losses import LocalNormalizedCrossCorrelationLoss
cfg = TrainConfig.preset("cpu", steps=1000, val_subjects=0, workers=0, tasks=tuple(a.tasks))
torch.manual_seed(0)
t = Trainer(cfg, None, pool_dir=a.pool_dir, progress=False)
net = UNet(3, 2, 3, channels=tuple(a.channels), strides=(2,) * (len(a.channels) - 1))
opt = torch.optim.AdamW(net.parameters(), lr=a.lr)
lncc = LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=7)
err, zero, rows, t0 = [], [], [], time.time()
for k in range(a.steps):
    b = t.batch(k, 0)
    moving = b["ref_moved"] if a.pair == "same" else b["deg"]
    f = net(torch.cat([b["ref"], moving], 1))                               # φ (B, 3, D, H, W), voxels
    with torch.no_grad():                                                   # scored before the step trains on it
        m = b["ref"][:, 0] > 0.05
        err.append(float((f - b["flow"]).norm(dim=1)[m].mean())); zero.append(float(b["flow"].norm(dim=1)[m].mean()))
    sup = (f - b["flow"]).pow(2).sum(1).mean()
    src, tgt = (b["ref_moved"], b["ref"]) if a.pair == "same" else (b["deg_fine"], b["deg_label"])
    L = sup if a.loss == "sup" else lncc(warp(src, f), tgt) + (0.02 * sup if a.loss == "both" else 0)
    opt.zero_grad(); L.backward(); opt.step()
    if (k + 1) % a.every == 0:
        r = sum(err[-a.every:]) / sum(zero[-a.every:])
        rows.append(dict(step=k + 1, online_ratio=round(r, 4)))
        print(f"step {k + 1}: online flow error {r:.3f}× zero flow (last {a.every} batches)  [{time.time() - t0:.0f} s]", flush=True)
print(json.dumps(dict(pair=a.pair, loss=a.loss, tasks=a.tasks, lr=a.lr, channels=a.channels, steps=a.steps, curve=rows,
                      s_per_step=round((time.time() - t0) / max(a.steps, 1), 3), device="cpu")))
