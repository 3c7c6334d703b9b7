"Test helpers: built-in subjects written as files in the published layouts of the paper's datasets."
import csv, io
from pathlib import Path
import numpy as np
from unifuse.data import builtin_subject, _CT_WINDOW, _PET_MAX
from unifuse.nifti import save_nifti, resample_to, resize_grid
from unifuse.files import write_text


def _hu_and_suv(seed, size, lesion=None):
    "A built-in subject with raw-unit volumes: MRI (0..1000), CT (HU) and PET (SUV)."
    sub = builtin_subject(seed, size, lesion=lesion)
    lo, hi = _CT_WINDOW
    ct_hu = sub["CT"][0].numpy() * (hi - lo) + lo                             # back to HU (clipped by the window)
    ct_hu[ct_hu <= lo + 1e-3] = -1024.0                                       # air
    return dict(t1=sub["MRI-T1"][0].numpy() * 1000, t2=sub["MRI-T2"][0].numpy() * 1000, ct=ct_hu,
                suv=sub["PET"][0].numpy() * _PET_MAX, affine=sub["affine"])

def _flip_lps(vol, aff):
    "Store a RAS volume in LPS voxel order (as DICOM-derived files often are): same world, other voxel order."
    out = vol[::-1, ::-1, :].copy()
    flip = np.diag([-1.0, -1.0, 1.0, 1.0]); flip[0, 3] = vol.shape[0] - 1; flip[1, 3] = vol.shape[1] - 1
    return out, aff @ flip

def fake_tree(root, # folder to write into
              layout:str, # "brats2020", "synthrad2023", "petct" or "csv"
              n:int=4, # number of subjects
              size=24, # voxels per axis of the built-in volumes
              seed:int=0, # first subject's seed
             ) -> Path:
    "Write `n` built-in subjects in a dataset's published layout (for tests and demos); returns the root (or the CSV)."
    if layout not in ("brats2020", "synthrad2023", "petct", "csv"):
        raise ValueError(f"layout={layout!r}: expected 'brats2020', 'synthrad2023', 'petct' or 'csv'")
    root = Path(root)
    rows = []
    for k in range(n):
        v = _hu_and_suv(seed + k, size)
        aff = v["affine"]
        if layout == "brats2020":
            sid = f"BraTS20_Training_{k + 1:03d}"; d = root / "MICCAI_BraTS2020_TrainingData" / sid
            for m in ("t1", "t2"):
                save_nifti(d / f"{sid}_{m}.nii.gz", *_flip_lps(v[m].astype(np.float32), aff))
            save_nifti(d / f"{sid}_flair.nii.gz", *_flip_lps(v["t2"].astype(np.float32), aff))
            save_nifti(d / f"{sid}_t1ce.nii.gz", *_flip_lps(v["t1"].astype(np.float32), aff))
        elif layout == "synthrad2023":
            sid = f"1B{'ABC'[k % 3]}{k + 1:03d}"; d = root / "Task1" / "brain" / sid
            save_nifti(d / "mr.nii.gz", v["t1"].astype(np.float32), aff)
            coarse = resize_grid(v["ct"].shape, aff, max(4, size * 2 // 3))
            save_nifti(d / "ct.nii.gz", resample_to(v["ct"], aff, (max(4, size * 2 // 3),) * 3, coarse, cval=-1024).astype(np.int16), coarse)
            save_nifti(d / "mask.nii.gz", (v["ct"] > -500).astype(np.uint8), aff)
        elif layout == "petct":
            sid = f"PETCT_{k // 2:04x}"; d = root / sid / f"0{k % 2 + 1}-01-2005-NA-PET-CT"
            save_nifti(d / "CTres.nii.gz", v["ct"].astype(np.float32), aff)
            coarse = resize_grid(v["suv"].shape, aff, max(4, size // 2))
            save_nifti(d / ("SUV.nii.gz" if k % 3 else "PET.nii.gz"), resample_to(v["suv"], aff, (max(4, size // 2),) * 3, coarse, cval=0), coarse)
        elif layout == "csv":
            d = root / f"case{k}"
            save_nifti(d / "t1.nii.gz", v["t1"].astype(np.float32), aff); save_nifti(d / "ct.nii.gz", v["ct"].astype(np.float32), aff)
            rows.append(dict(id=f"case{k}", reference=f"case{k}/t1.nii.gz", other=f"case{k}/ct.nii.gz", task="ct"))
        else: raise ValueError(f"layout={layout!r}: expected 'brats2020', 'synthrad2023', 'petct' or 'csv'")
    if layout == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["id", "reference", "other", "task"]); w.writeheader(); w.writerows(rows)
        return write_text(root / "pairs.csv", buf.getvalue())
    return root