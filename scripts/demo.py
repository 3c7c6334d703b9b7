#!/usr/bin/env python
"""The main job: train a small UniFuse on the built-in data, fuse held-out built-in pairs of the three tasks
with it and with the weights that ship in the package, and write NIfTI, PNG and metrics beside the staged
classical baseline.

    bash scripts/demo.sh                    # sets up .venv, then runs this file
    .venv/bin/python scripts/demo.py [--out runs/demo] [--size 96] [--train-args "--steps 50"] [--skip-train]

Writes, under --out:
  train/               the training run (checkpoint.pt, best.pt, train.log, metrics.csv, progress.png, previews/)
  inputs/<task>_*.nii.gz   the held-out pairs as a user would have them: REF (I_R), DEG (I'_D: degraded and moved)
                           and, for scoring only, CLEAN (I_D: the clean volume aligned with REF)
  fused/<task>_<model>.nii.gz (+ _flow, _aligned)   what `unifuse-fuse` writes for each pair and model (and prealign)
  montage_<task>_<model>.png   reference, degraded, aligned, fused, error, one row each (model: trained, shipped,
                               shipped_rigid = the shipped weights after `--prealign rigid`)
  metrics.json         the six Q metrics and the alignment metrics of every method on every pair
  evaluation/          the same as tables (fusion.md, alignment.md, cases.csv) as `unifuse-eval` writes them
"""
from __future__ import annotations
import argparse, json, shlex, subprocess, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from unifuse.launch import configure
configure()                                   # before torch loads: fewer threads when other processes keep cores busy
import nibabel as nib
import numpy as np
import torch


def _log(msg): print(f"[demo] {msg}", flush=True)


def train(out:Path, extra:list) -> Path:
    "Run `unifuse-train --preset tiny` into out/train (a fresh run each time), return its checkpoint."
    cmd = [sys.executable, "-m", "unifuse.train", "--preset", "tiny", "--out", str(out / "train"), "--overwrite", *extra]
    _log("training: " + " ".join(shlex.quote(c) for c in cmd[2:]))
    t0 = time.time()
    r = subprocess.run(cmd)
    if r.returncode: sys.exit(f"[demo] training failed (exit status {r.returncode}); see {out / 'train' / 'train.log'}")
    _log(f"training took {time.time() - t0:.0f} s")
    return out / "train" / "checkpoint.pt"


def write_inputs(case:dict, folder:Path, affine:np.ndarray) -> dict:
    "The case as NIfTI files on a RAS grid: REF, DEG (what a user has) and CLEAN (only for scoring)."
    from unifuse.nifti import save_nifti
    from unifuse.colour import luma
    t = case["task"]
    paths = {k: folder / f"{t}_{k}.nii.gz" for k in ("ref", "deg", "clean")}
    save_nifti(paths["ref"], case["ref"][0, 0].cpu().numpy(), affine)
    save_nifti(paths["deg"], luma(case["deg"])[0, 0].cpu().numpy(), affine)
    save_nifti(paths["clean"], luma(case["deg_label"])[0, 0].cpu().numpy(), affine)
    return paths


def file_method(model, name:str, folder:Path, inputs:dict, prealign:str="none"):
    "An `evaluate` method that fuses through the files, as `unifuse-fuse` does, and reads the result back."
    from unifuse.fuse import fuse_files
    def m(case):
        p = inputs[case["id"]]
        out = folder / f"{case['task']}_{name}.nii.gz"
        t0 = time.perf_counter()
        fuse_files(p["ref"], p["deg"], out, case["task"], model=model, flow_path=True, aligned_path=True,
                   ref_norm="none", deg_norm="none", prealign=prealign)
        seconds = time.perf_counter() - t0
        fused = np.asarray(nib.load(out).dataobj, dtype=np.float32)                    # (X, Y, Z): RAS = (D, H, W)
        flow = np.asarray(nib.load(str(out).replace(".nii.gz", "_flow.nii.gz")).dataobj, dtype=np.float32)
        flow = np.moveaxis(flow.reshape(*fused.shape, 3), -1, 0)                         # (3, D, H, W) in voxels
        return torch.from_numpy(fused)[None, None], torch.from_numpy(flow)[None], seconds
    return m


def montage(case:dict, fused:torch.Tensor, flow:torch.Tensor, title:str, path:Path):
    "Reference, degraded, aligned, fused and error (|fused − max(I_R, I_D)|) in five rows of axial slices."
    from unifuse.viz import show_montage
    from unifuse.spatial import warp
    from unifuse.files import atomic_path
    from unifuse.colour import luma
    ref, deg, clean = case["ref"].cpu(), luma(case["deg"]).cpu(), luma(case["deg_label"]).cpu()
    aligned = warp(deg, flow.reshape(1, 3, *ref.shape[2:]).float())
    err = (fused.reshape(ref.shape) - torch.maximum(ref, clean)).abs()
    from unifuse.viz import modality_display
    from unifuse.data import TASKS
    shown = [modality_display(m) for m in (*TASKS[case["task"]][:1], TASKS[case["task"]][1], TASKS[case["task"]][1], "fused")]
    fig = show_montage(ref, deg, aligned, fused.reshape(ref.shape), err, n=6, plane="axial",
                       titles=["reference I_R", "degraded I'_D", "aligned W(I'_D, φ)", "fused", "|fused − max(I_R, I_D)|"],
                       cmap=[d["cmap"] for d in shown] + ["magma"], vmin=[d["vmin"] for d in shown] + [0],
                       vmax=[d["vmax"] for d in shown] + [0.5], size=1.5, dpi=100)         # CT in its display range
    fig.text(0.5, 1.0, title, ha="center", va="bottom", fontsize=11)          # above the column titles (saved with a tight box)
    with atomic_path(path) as tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    ap.add_argument("--size", type=int, default=96, help="voxels per side of the held-out pairs (224 mm field of view; default 96 = 2.33 mm)")
    ap.add_argument("--seed", type=int, default=3, help="held-out block of built-in subjects (training uses others)")
    ap.add_argument("--train-args", default="", help="extra arguments for unifuse-train, e.g. \"--steps 50\"")
    ap.add_argument("--skip-train", action="store_true", help="reuse OUT/train/checkpoint.pt")
    a = ap.parse_args(argv)
    import warnings
    warnings.showwarning = lambda message, category, *rest, **kw: print(f"[demo] {category.__name__}: {message}", flush=True)
    from unifuse.model import UniFuse
    from unifuse.data import builtin_affine
    from unifuse.evaluate import builtin_cases, baseline_methods, evaluate, write_evaluation

    t0 = time.time()
    ckpt = a.out / "train" / "checkpoint.pt"
    if not a.skip_train: ckpt = train(a.out, shlex.split(a.train_args))
    elif not ckpt.is_file(): sys.exit(f"[demo] --skip-train: no checkpoint at {ckpt}; run without --skip-train first")
    models = {"trained": UniFuse.load(ckpt).eval()}
    if UniFuse.shipped(): models["shipped"] = UniFuse.pretrained().eval()
    else: _log("no weights ship with this installation: fusing with the model trained here only")

    _log(f"held-out built-in pairs at {a.size}³ ({224 / a.size:.2f} mm), degraded and moved")
    cases = list(builtin_cases(("mri", "ct", "pet"), n=1, size=a.size, seed=a.seed))
    affine = builtin_affine(a.size)
    inputs = {c["id"]: write_inputs(c, a.out / "inputs", affine) for c in cases}
    variants = {k: (m, "none") for k, m in models.items()}           # name -> (model, prealign)
    if "shipped" in models: variants["shipped_rigid"] = (models["shipped"], "rigid")   # `unifuse-fuse --prealign rigid`
    methods = {f"UniFuse ({k})": file_method(m, k, a.out / "fused", inputs, pre) for k, (m, pre) in variants.items()}
    methods.update(baseline_methods(("average", "pyramid")))
    res = evaluate(cases, methods, progress=True)

    files = write_evaluation(res, a.out / "evaluation", {"dataset": "builtin", "size": a.size, "seed": a.seed,
                                                        "checkpoint": str(ckpt), "methods": list(methods)})
    for c in cases:                                                    # one montage per task and UniFuse model
        ex = res["examples"][c["id"]]
        for k in variants:
            flow = np.asarray(nib.load(a.out / "fused" / f"{c['task']}_{k}_flow.nii.gz").dataobj)
            flow = torch.from_numpy(np.moveaxis(flow.reshape(*c["ref"].shape[2:], 3), -1, 0).astype(np.float32))
            label = "shipped weights after the rigid pre-alignment" if k == "shipped_rigid" else f"{k} weights"
            montage(c, ex["fused"][f"UniFuse ({k})"], flow, f"{c['task']}: UniFuse ({label})",
                    a.out / f"montage_{c['task']}_{k}.png")
    metrics = {}
    for r in res["cases"]:
        metrics.setdefault(r["task"], {})[r["method"]] = {k: v for k, v in r.items() if k not in ("case", "task", "method")}
    from unifuse.files import write_json
    write_json(a.out / "metrics.json", {"size": a.size, "spacing_mm": 224 / a.size, "checkpoint": str(ckpt),
                                        "scored_against": "the clean aligned sources I_R and I_D", "per_task": metrics})
    keys = ("Q_mse", "Q_psnr", "Q_ssim", "Q_vif", "align_cc", "align_dice")
    print("\n" + f"{'task':5s} {'method':32s}" + "".join(f"{k:>11s}" for k in keys))
    for t, rows in metrics.items():
        for m, v in rows.items(): print(f"{t:5s} {m:32s}" + "".join(f"{v[k]:11.4f}" for k in keys))
    _log(f"done in {time.time() - t0:.0f} s. Outputs in {a.out}/:")
    for p in sorted(a.out.glob("montage_*.png")) + [a.out / "metrics.json", a.out / "fused", a.out / "inputs", a.out / "evaluation"]:
        print(f"  {p}")


if __name__ == "__main__":
    main()
