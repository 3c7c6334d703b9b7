#!/usr/bin/env python
"""Fused NIfTI files scored the way real pairs are: `unifuse-fuse` with its defaults beside the staged pipeline and the naive average.

    python scripts/realdata_check.py pair REF DEG CLEAN_REF CLEAN_OTHER --task mri [--checkpoint CK]
    python scripts/realdata_check.py standins --out runs/standins [--checkpoint CK]

`pair`: REF and DEG as a user has them (DEG degraded and moved); CLEAN_REF and CLEAN_OTHER the clean, unmoved sources
(any grid of the same world). Three fused volumes, all on REF's grid:

- UniFuse: `unifuse-fuse REF DEG -o OUT --task T`, every other option at its default (automatic normalisation, no
  `--prealign`);
- TV + rigid + average: the staged classical pipeline (`unifuse.evaluate.staged_baseline`) on the same normalised inputs;
- average: the mean of REF and DEG resampled onto REF's grid, nothing else.

Each is scored against both clean sources (each normalised as its modality is, resampled onto REF's grid) after a
linear intensity fit a·F + b (least squares over all voxels): MSE, CC and 3D SSIM, the mean over the two sources. The
rule: for `mri` UniFuse beats the staged pipeline on at least 2 of the 3, for `ct` and `pet` the average.

`standins`: the same check on stand-ins built from held-out built-in heads, shaped like the real pairs the rule names:
a skull-stripped T1/T2 at 1 mm on an oblique grid with T2 moved and motion-corrupted; MRI/CT and CT/PET at 2 mm with
metal and low dose (CT in Hounsfield units, MRI in scanner units, PET ×10). The last line is one JSON object.
"""
from __future__ import annotations
import argparse, json, math, os, sys, time
from pathlib import Path
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from unifuse.launch import configure
configure()
import numpy as np
import torch

BRAIN_LABELS = (1, 2, 3, 6)        # csf, grey matter, white matter, lesion: what skull stripping keeps
SCALE = {"MRI-T1": 1000.0, "MRI-T2": 1000.0, "PET": 10.0}    # built-in [0, 1] → the units of the stand-in files


def _on_ref(path, modality, ref_shape, ref_aff):
    "A file normalised as its modality is (`normalise_input`, automatic) and resampled onto REF's grid."
    from unifuse.nifti import load_nifti, resample_to
    from unifuse.fuse import normalise_input
    vol, aff, _ = load_nifti(path)
    v01 = normalise_input(vol, modality, "auto", str(path))[0]
    return np.asarray(resample_to(v01, aff, ref_shape, ref_aff, cval=0.0), dtype=np.float32)


def scores(fused:np.ndarray, sources:list) -> dict:
    "MSE, CC, SSIM of `fused` against each clean source after a linear fit a·F + b, averaged over the sources."
    from unifuse.metrics import ssim
    f = fused.astype(np.float64).ravel()
    out = {"mse": [], "cc": [], "ssim": []}
    for s in sources:
        y = s.astype(np.float64).ravel()
        a, b = np.linalg.lstsq(np.stack([f, np.ones_like(f)], 1), y, rcond=None)[0]
        fit = (a * fused + b).astype(np.float32)
        out["mse"].append(float(np.mean((fit.astype(np.float64) - s) ** 2)))
        out["cc"].append(float(np.corrcoef(f, y)[0, 1]))
        out["ssim"].append(float(ssim(torch.from_numpy(np.clip(fit, 0, 1)), torch.from_numpy(s.astype(np.float32)))))
    return {k: float(np.mean(v)) for k, v in out.items()}


def wins(a:dict, b:dict) -> int:
    "How many of MSE (lower), CC and SSIM (higher) `a` beats `b` on."
    return int(a["mse"] < b["mse"]) + int(a["cc"] > b["cc"]) + int(a["ssim"] > b["ssim"])


def check_pair(ref, deg, clean_ref, clean_other, task:str, out:Path, checkpoint=None, log=print, window="auto") -> dict:
    "The three fused volumes of one pair, their scores and whether UniFuse passes the rule."
    from unifuse.data import TASKS
    from unifuse.nifti import load_nifti
    from unifuse.evaluate import staged_baseline
    from unifuse.fuse import fuse_files
    out.mkdir(parents=True, exist_ok=True)
    ref_mod, deg_mod = TASKS[task]
    vol, raff, _ = load_nifti(ref)
    shape = vol.shape[:3]
    t0 = time.perf_counter()
    s = fuse_files(ref, deg, out / "unifuse.nii.gz", task, checkpoint=checkpoint, window=window)
    t_uni = time.perf_counter() - t0
    uni = np.asarray(load_nifti(out / "unifuse.nii.gz")[0], dtype=np.float32)   # on REF's grid, in [0, 1]
    r01, d01 = _on_ref(ref, ref_mod, shape, raff), _on_ref(deg, deg_mod, shape, raff)
    t0 = time.perf_counter()
    st = staged_baseline(torch.from_numpy(r01), torch.from_numpy(d01), task, ("average",))
    t_staged = time.perf_counter() - t0
    fused = {"UniFuse": uni, "TV + rigid + average": st["fused"]["average"].numpy().reshape(shape),
             "average": (r01 + d01) / 2}
    src = [_on_ref(clean_ref, ref_mod, shape, raff), _on_ref(clean_other, deg_mod, shape, raff)]
    res = {k: scores(v, src) for k, v in fused.items()}
    rival = "TV + rigid + average" if task == "mri" else "average"
    n = wins(res["UniFuse"], res[rival])
    for k, v in res.items():
        log(f"  {k:22s} MSE {v['mse']:.5f}  CC {v['cc']:.4f}  SSIM {v['ssim']:.4f}")
    log(f"  UniFuse beats {rival} on {n} of 3 ({'pass' if n >= 2 else 'FAIL'}); class {s['predicted']} "
        f"(expected {s['expected']}, p {s['probability']:.2f}); UniFuse {t_uni:.0f} s, staged {t_staged:.0f} s")
    return dict(task=task, scores=res, rival=rival, wins=n, passed=n >= 2, predicted=s["predicted"],
                expected=s["expected"], seconds_unifuse=round(t_uni, 1), seconds_staged=round(t_staged, 1))


def make_standins(out:Path, seed:int=990_000, sizes=(224, 112)) -> list:
    "Stand-in files for the three real pairs: (task, REF, DEG, CLEAN_REF, CLEAN_OTHER) each."
    from unifuse.data import builtin_pair, builtin_affine, TASKS
    from unifuse.nifti import save_nifti, CT_WINDOW
    from unifuse.degrade import make_batch
    from unifuse.train import TrainConfig, physical_ranges
    out.mkdir(parents=True, exist_ok=True)
    lo, hi = CT_WINDOW
    units = lambda v, m: v * (hi - lo) + lo if m == "CT" else v * SCALE[m]
    tilt = math.radians(12.0)
    oblique = np.array([[math.cos(tilt), -math.sin(tilt), 0, 0], [math.sin(tilt), math.cos(tilt), 0, 0],
                        [0, 0, 1, 0], [0, 0, 0, 1.0]])
    pairs = []
    for k, (task, size) in enumerate(zip(("mri", "ct", "pet"), (sizes[0], sizes[1], sizes[1]))):   # 1 mm, 2 mm: the 224 mm head
        p = builtin_pair(task, seed=seed + k, size=size)
        ref, other = p["ref"], p["other"]                                    # (1, D, H, W) in [0, 1], aligned
        if task == "mri":                                                   # skull-stripped
            brain = torch.zeros_like(p["labels"], dtype=torch.bool)
            for lab in BRAIN_LABELS: brain |= p["labels"] == lab
            ref, other = ref * brain, other * brain
        spacing = 224.0 / size
        b = make_batch(ref[None], other[None], task, generator=torch.Generator().manual_seed(seed + k),
                       ranges=physical_ranges(TrainConfig.preset("cpu"), spacing, size))
        aff = builtin_affine(size)
        if task == "mri": aff = oblique @ aff                               # an oblique grid, the same for all four files
        ref_mod, deg_mod = TASKS[task]
        files = []
        for name, vol, mod in (("ref", ref[0], ref_mod), ("deg", b["deg"][0, 0], deg_mod),
                               ("clean_ref", ref[0], ref_mod), ("clean_other", other[0], deg_mod)):
            f = out / f"{task}_{name}.nii.gz"
            save_nifti(f, units(vol.numpy().astype(np.float32), mod), aff)
            files.append(f)
        pairs.append((task, *files))
    return pairs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p1 = sub.add_parser("pair", help="score one pair of files")
    for name in ("ref", "deg", "clean_ref", "clean_other"): p1.add_argument(name, type=Path)
    p1.add_argument("--task", required=True, choices=["mri", "ct", "pet"])
    p1.add_argument("--out", type=Path, default=Path("runs/realdata_check"), help="folder for the fused volumes")
    p2 = sub.add_parser("standins", help="make the three stand-in pairs from built-in heads, then score each")
    p2.add_argument("--out", type=Path, default=Path("runs/standins"))
    p2.add_argument("--sizes", type=int, nargs=2, default=(224, 112), metavar=("MRI", "CT_PET"),
                    help="voxels per side of the 224 mm head: the T1/T2 pair and the other two (default 224 112: 1 and 2 mm)")
    for p in (p1, p2):
        p.add_argument("--checkpoint", default=None, help="a UniFuse.save file or a training checkpoint (default: the shipped weights)")
        p.add_argument("--window", default="auto", help="unifuse-fuse's --window (default auto, its default); a side in voxels to compare")
    a = ap.parse_args(argv)
    for f in ([a.ref, a.deg, a.clean_ref, a.clean_other] if a.cmd == "pair" else []):
        if not f.is_file(): ap.error(f"{f}: no such file")
    jobs = [(a.task, a.ref, a.deg, a.clean_ref, a.clean_other)] if a.cmd == "pair" else make_standins(a.out, sizes=a.sizes)
    results = []
    for task, ref, deg, cr, co in jobs:
        print(f"{task}: {ref.name} + {deg.name}")
        results.append(check_pair(ref, deg, cr, co, task, a.out / f"{task}_fused", a.checkpoint,
                                  window=a.window if a.window == "auto" else int(a.window)))
    print(json.dumps(dict(checkpoint=a.checkpoint or "shipped", results=results)))
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
