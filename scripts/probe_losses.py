#!/usr/bin/env python
"""A short training loop on the trainer's own batches with chosen loss terms, then the held-out probe.

What does a loss term do to the unified features and to FA, before committing a long run to it? This runs
`--steps` AdamW steps (lr `--lr`, clipping at 1) of the terms named in `--losses` (others weighted 0) on the
`cpu` preset's batches (48³ crops at 1.5 mm, built-in pool in --pool-dir), then prints the held-out test of
`unifuse.train.alignment_check` (flow error / zero flow, content, margin, class) every `--every` steps.

    python scripts/probe_losses.py --losses moda                      # L_moda alone, 80 steps
    python scripts/probe_losses.py --losses ce+moda+reg --cfg "dict(fa_feature_grad=0.0)" --steps 120 --every 40
    python scripts/probe_losses.py --losses moda --tasks mri
    python scripts/probe_losses.py --losses ce+moda --tasks ct --train "dict(p_brain=0.0)"   # crops anywhere in the head

About 2 s a step on a 2-core CPU. The last line is one JSON object.
"""
import argparse, json, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from unifuse.launch import configure
configure()
import torch
from unifuse.config import LOSS_TERMS
from unifuse.train import TrainConfig, Trainer, heldout_set, alignment_check, TASK_NAMES

ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
ap.add_argument("--losses", default="ce+moda", help="terms of Eq. 15 to train, joined by + (default ce+moda)")
ap.add_argument("--cfg", default="{}", help="UniFuseConfig overrides as a Python dict expression")
ap.add_argument("--train", default="{}", help="TrainConfig overrides (e.g. crop sampling) as a Python dict expression")
ap.add_argument("--steps", type=int, default=80); ap.add_argument("--lr", type=float, default=2e-3)
ap.add_argument("--every", type=int, default=0, help="probe every this many steps (default: at the end)")
ap.add_argument("--tasks", nargs="+", default=list(TASK_NAMES), choices=TASK_NAMES)
ap.add_argument("--subjects", type=int, default=2, help="held-out subjects for the probe (default 2)")
ap.add_argument("--pool-dir", default="runs/pool")
ap.add_argument("--save", default=None, help="write the model here at the end (UniFuse.save)")
a = ap.parse_args()
terms = a.losses.split("+")
if set(terms) - set(LOSS_TERMS): sys.exit(f"--losses {a.losses}: terms must come from {LOSS_TERMS}")
weights = {k: float(k in terms) for k in LOSS_TERMS}
cfg = TrainConfig.preset("cpu", steps=1000, val_subjects=0, workers=0, tasks=tuple(a.tasks), **eval(a.train, {}))
cfg = cfg.replace(model={**cfg.model, **eval(a.cfg, {}), "loss_weights": weights})
torch.manual_seed(0)
t = Trainer(cfg, None, pool_dir=a.pool_dir, progress=False)
m = t.model
opt = torch.optim.AdamW(m.parameters(), lr=a.lr, weight_decay=cfg.weight_decay)
hb = heldout_set(a.subjects, 48, t.spacing_mm, a.pool_dir, cfg, workers=0)
g, t0, rows = torch.Generator().manual_seed(0), time.time(), []
def report(k):
    r = alignment_check(m, hb)["all"]
    rows.append(dict(step=k, **{x: round(r[x], 4) for x in ("epe_ratio", "content", "margin", "acc")}))
    print(f"step {k}: flow error {r['epe_ratio']:.3f}× zero flow, content {r['content']:.3f}, margin {r['margin']:+.3f}, "
          f"class accuracy {r['acc']:.2f}  [{time.time() - t0:.0f} s]", flush=True)
report(0)
for k in range(a.steps):
    m.train(); L = m.loss(t.batch(k, 0), generator=g)
    opt.zero_grad(); L["total"].backward(); torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); opt.step()
    if (a.every and (k + 1) % a.every == 0) or k + 1 == a.steps: report(k + 1)
if a.save: m.save(a.save)
print(json.dumps(dict(losses=terms, cfg=a.cfg, train=a.train, tasks=a.tasks, steps=a.steps, lr=a.lr,
                      last_losses={k: round(float(v.detach()), 4) for k, v in L.items()}, probe=rows)))
