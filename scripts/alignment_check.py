#!/usr/bin/env python
"""Does a checkpoint align? The held-out test of `unifuse.train.alignment_check`, printed per task.

    python scripts/alignment_check.py shipped                       # the weights in the package
    python scripts/alignment_check.py runs/x/checkpoint.pt --crop 64 --subjects 4
    python scripts/alignment_check.py runs/x/checkpoint.pt --tasks mri

Built-in subjects from `unifuse.train.TEST_SEED0` (no run trains or validates on them), made once at the
checkpoint's spacing in --pool-dir, cut to --crop³ centre crops, degraded and moved with the `cpu` preset's
ranges. Per task: flow error / zero flow (sums over the pairs of each pair's mean ‖φ − φ_gt‖ where
I_R > 0.05), the mean errors in voxels, the content of F̄'_D and the correspondence margin
(`UniFuse.feature_probe`), and the class accuracy. The last line is one JSON object.
"""
import argparse, json, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from unifuse.launch import configure
configure()
from unifuse.model import UniFuse
from unifuse.train import TrainConfig, heldout_set, alignment_check, TASK_NAMES

ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
ap.add_argument("checkpoint", help="a UniFuse.save or unifuse-train file, or 'shipped'")
ap.add_argument("--crop", type=int, default=48, help="side of the centre crops, voxels (default 48)")
ap.add_argument("--subjects", type=int, default=8, help="held-out subjects, one pair per task each (default 8)")
ap.add_argument("--tasks", nargs="+", default=list(TASK_NAMES), choices=TASK_NAMES)
ap.add_argument("--pool-dir", default="runs/pool", help="where the subjects are made once and cached (default runs/pool)")
a = ap.parse_args()
m = UniFuse.pretrained() if a.checkpoint == "shipped" else UniFuse.load(a.checkpoint)
t0 = time.time()
spacing = float(m.meta.get("spacing_mm", 1.5))
vb = heldout_set(a.subjects, a.crop, spacing, a.pool_dir, TrainConfig.preset("cpu", tasks=tuple(a.tasks)))
r = alignment_check(m, vb)
for k, v in r.items():
    print(f"{k:4s} flow error {v['epe_ratio']:.3f}× zero flow ({v['epe_vox']:.2f} vs {v['zero_vox']:.2f} voxels), "
          f"content {v['content']:.3f}, margin {v['margin']:+.3f}, class accuracy {v['acc']:.2f}, {v['n']} pairs")
print(json.dumps(dict(checkpoint=a.checkpoint, crop=a.crop, subjects=a.subjects, spacing_mm=spacing,
                      seconds=round(time.time() - t0, 1), results=r)))
