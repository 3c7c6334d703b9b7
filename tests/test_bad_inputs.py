"""Bad input at every public entry point, as a careless user would give it: one row per case.

Each module has a list of rows. A `Case` is a call (a function of a scratch folder), what it must do — raise
`exc` (a user's mistake raises ValueError or TypeError, or a subclass; FileNotFoundError for a missing file), warn
(`warns`), or return a result that `check` accepts — and `match`: patterns its message must contain, the argument's
name first, then what was expected. A `Cli` row runs a command's `main(argv)` in an empty scratch folder (after
`setup`) and expects exit status 2, exactly one line on stderr, no traceback, and nothing new left in the folder.

To add rows for another module, append `Case(...)` / `Cli(...)` rows to its list (MODEL, DEGRADE, TRAIN, FUSE
below); a new list goes into ROWS.
"""
from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

from unifuse import data as D
from fakes import fake_tree
from unifuse import evaluate as E
from unifuse import metrics as M
from unifuse import spatial as S
from unifuse.files import write_text


@dataclass
class Case:
    id: str                                          # "function: what is wrong"
    call: Callable[[Path], Any]                      # the call, given a scratch folder
    exc: type | tuple | None = None                  # the exception expected; None: the call returns
    match: tuple = ()                                # regexes the message must contain: the argument, then the expectation
    check: Callable[[Any], bool] | None = None       # rows that return: a test of the result
    warns: type | None = None                        # a warning expected (its message matches `match`)
    slow: bool = False                               # seconds, not milliseconds: skipped without --slow


@dataclass
class Cli:
    id: str                                          # "command: what is wrong"
    main: Callable                                   # the command's entry point, main(argv) -> int
    argv: list                                       # "{tmp}" is replaced by the scratch folder
    match: tuple = ()                                # regexes the one stderr line must contain
    setup: Callable[[Path], Any] | None = None       # files to make in the scratch folder first
    skip: Callable[[], str | None] = lambda: None    # a reason to skip this row here, or None


# ---------------------------------------------------------------- helpers for the rows

def vol(n=8, value=None, dtype=np.float32):
    "A small 3D array."
    return np.random.default_rng(0).random((n, n, n)).astype(dtype) if value is None else np.full((n, n, n), value, dtype)

def nii(tmp, name, arr, affine=None):
    "A NIfTI file in the scratch folder (bad values included: it makes the bad inputs)."
    return D.save_nifti(tmp / name, arr, np.eye(4) if affine is None else affine, check_finite=False)

def damaged(path):
    "Flip 64 bytes in the middle of a file (a bad copy): the archive's checksums no longer match."
    b = bytearray(Path(path).read_bytes()); n = len(b) // 2
    b[n:n + 64] = bytes(x ^ 0xFF for x in b[n:n + 64]); Path(path).write_bytes(bytes(b))
    return path

def with_nan(a, idx=(1, 2, 3)):
    a = a.copy() if isinstance(a, np.ndarray) else a.clone()
    a[idx] = float("nan")
    return a

def csv_file(tmp, text, name="pairs.csv", encoding="utf-8"):
    (tmp / name).write_bytes(text.encode(encoding))
    return tmp / name

def brats(tmp, n=2):
    return fake_tree(tmp / "brats", "brats2020", n=n, size=8)

def no_ct(tmp):
    root = fake_tree(tmp / "sr", "synthrad2023", n=1, size=8)
    next(root.rglob("ct.nii.gz")).unlink()
    return root

def no_pet(tmp):
    root = fake_tree(tmp / "pc", "petct", n=2, size=8)
    for f in list(root.rglob("SUV.nii.gz")) + list(root.rglob("PET.nii.gz")): f.unlink(); break
    return root

def split_file(tmp):
    "A BraTS tree whose split file was drawn with sizes (1, 1)."
    root = brats(tmp); f = tmp / "split.json"
    D.BraTS2020(root, split="test", sizes=(1, 1), split_file=f)
    return root, f

def t3(n=20, seed=0):
    return torch.rand(n, n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

def flow(n=6, b=1):
    return torch.zeros(b, 3, n, n, n)

def labels(n=8):
    lab = torch.zeros(n, n, n, dtype=torch.long); lab[2:5] = 3
    return lab

META = torch.empty(1, 1, 20, 20, 20, device="meta")


# ---------------------------------------------------------------- unifuse.data

DATA = [
    Case("builtin_pair: unknown task", lambda t: D.builtin_pair("xray"), ValueError, ("task", "one of")),
    Case("builtin_pair: size too small", lambda t: D.builtin_pair("mri", size=2), ValueError, ("size", "at least 4")),
    Case("builtin_pair: size a string", lambda t: D.builtin_pair("mri", size="big"), TypeError, ("size", "int or a")),
    Case("builtin_subject: unknown modality", lambda t: D.builtin_subject(0, 8, ("MRI-T1", "US")), ValueError, ("modality", "expected MRI-T1")),
    Case("builtin_subject: seed a string", lambda t: D.builtin_subject("abc", 8), TypeError, ("seed", "expected an int")),
    Case("builtin_affine: size 0", lambda t: D.builtin_affine(0), ValueError, ("size", "at least 4")),
    Case("BuiltinPairs: n 0", lambda t: D.BuiltinPairs(n=0), ValueError, ("n=0", "positive")),
    Case("BuiltinPairs: unknown task", lambda t: D.BuiltinPairs(("mri", "us")), ValueError, ("task", "one of")),
    Case("gaussian_blur: 3D tensor", lambda t: D.gaussian_blur(torch.zeros(4, 4, 4), 1.0), ValueError, ("x", r"\(C, D, H, W\)")),
    Case("gaussian_blur: negative sigma", lambda t: D.gaussian_blur(torch.zeros(1, 4, 4, 4), -1.0), ValueError, ("sigma", "non-negative")),
    Case("check_volume: 2D", lambda t: D.check_volume(np.zeros((4, 4)), "scan.nii"), ValueError, ("scan.nii", "one 3D volume")),
    Case("check_volume: NaN", lambda t: D.check_volume(with_nan(vol()), "scan.nii"), ValueError, ("scan.nii", "NaN or infinite")),
    Case("load_nifti: missing file", lambda t: D.load_nifti(t / "none.nii.gz"), FileNotFoundError, ("none.nii.gz", "no such file")),
    Case("load_nifti: empty file", lambda t: D.load_nifti(csv_file(t, "", "e.nii.gz")), ValueError, ("e.nii.gz", "empty")),
    Case("load_nifti: not NIfTI", lambda t: D.load_nifti(csv_file(t, "junk", "j.nii.gz")), ValueError, ("j.nii.gz", "could not be read as NIfTI")),
    Case("load_nifti: a folder", lambda t: D.load_nifti(t), IsADirectoryError, ("is a folder", r"\.nii")),
    Case("load_nifti: dtype too small (1509.5 as uint8)", lambda t: D.load_nifti(nii(t, "v.nii", vol(value=1509.5)), dtype=np.uint8),
         ValueError, ("dtype=uint8", r"1509\.5", r"0 \.\. 255")),
    Case("load_nifti: fractions as int16", lambda t: D.load_nifti(nii(t, "v.nii", vol()), dtype=np.int16), ValueError, ("dtype=int16", "non-integer")),
    Case("load_nifti: overflow in float16", lambda t: D.load_nifti(nii(t, "v.nii", vol(value=1e6)), dtype=np.float16), ValueError, ("dtype=float16", "overflow")),
    Case("load_nifti: dtype not a type", lambda t: D.load_nifti(nii(t, "v.nii", vol()), dtype="pixels"), TypeError, ("dtype", "number type")),
    Case("load_nifti: uint8 that fits", lambda t: D.load_nifti(nii(t, "v.nii", vol(value=200, dtype=np.int16)), dtype=np.uint8)[0],
         check=lambda v: v.dtype == np.uint8 and int(v.max()) == 200),
    Case("save_nifti: 4D volume", lambda t: D.save_nifti(t / "x.nii", np.zeros((2, 3, 3, 3)), np.eye(4)), ValueError, ("vol", r"\(D, H, W\)")),
    Case("save_nifti: 3x3 affine", lambda t: D.save_nifti(t / "x.nii", vol(), np.eye(3)), ValueError, ("affine", "4x4", "translation")),
    Case("save_nifti: singular affine", lambda t: D.save_nifti(t / "x.nii", vol(), np.diag([1.0, 0, 1, 1])), ValueError, ("affine", "singular")),
    Case("save_nifti: not a .nii name", lambda t: D.save_nifti(t / "x.png", vol(), np.eye(4)), ValueError, ("path", r"\.nii or \.nii\.gz")),
    Case("save_nifti: a folder", lambda t: D.save_nifti(t, vol(), np.eye(4)), ValueError, ("path", r"\.nii")),
    Case("save_nifti: a NaN voxel (load_nifti would refuse the file)", lambda t: D.save_nifti(t / "x.nii", with_nan(vol()), np.eye(4)), ValueError, ("vol", "NaN", "nothing")),
    Case("save_nifti: float64 beyond float32's range", lambda t: D.save_nifti(t / "x.nii", vol(dtype=np.float64) * 1e300, np.eye(4)), ValueError, ("vol", "float32's range", "nothing")),
    Case("save_nifti: nothing written when refused", lambda t: (pytest.raises(ValueError, D.save_nifti, t / "x.nii", with_nan(vol()), np.eye(4)),
                                                          sorted(x.name for x in t.iterdir()))[1], None, (), check=lambda names: names == []),
    Case("atomic writes: a replaced file keeps its mode", lambda t: (write_text(t / "a.txt", "1"), os.chmod(t / "a.txt", 0o600),
                                                             write_text(t / "a.txt", "2"), oct(os.stat(t / "a.txt").st_mode & 0o777))[-1],
         None, (), check=lambda m: m == "0o600"),
    Case("save_nifti: complex values", lambda t: D.save_nifti(t / "x.nii", vol().astype(np.complex64), np.eye(4)), TypeError, ("vol", "real numbers")),
    Case("save_nifti: meta tensor", lambda t: D.save_nifti(t / "x.nii", META[0, 0], np.eye(4)), TypeError, ("vol", "meta tensor")),
    Case("save_nifti: torch long labels", lambda t: D.load_nifti(D.save_nifti(t / "l.nii.gz", labels(), np.eye(4)), dtype=None)[0],
         check=lambda v: v.dtype == np.int32 and np.array_equal(v, labels().numpy())),
    Case("save_nifti: float16", lambda t: D.load_nifti(D.save_nifti(t / "h.nii", torch.ones(4, 4, 4).half(), np.eye(4)))[0],
         check=lambda v: v.dtype == np.float32 and (v == 1).all()),
    Case("orientation: 3x3 affine", lambda t: D.orientation(np.eye(3)), ValueError, ("affine", "4x4")),
    Case("to_canonical: 2D volume", lambda t: D.to_canonical(np.zeros((4, 4)), np.eye(4)), ValueError, ("vol", r"\(D, H, W\)")),
    Case("to_canonical: NaN affine", lambda t: D.to_canonical(vol(), with_nan(np.eye(4), (0, 3))), ValueError, ("affine", "finite")),
    Case("normalize: a NaN voxel", lambda t: D.normalize(with_nan(vol()), "MRI"), ValueError, ("vol", "1 of 512 voxels are NaN", "nan_to_num")),
    Case("normalize: unknown modality", lambda t: D.normalize(vol(), "ultrasound"), ValueError, ("modality", "expected MRI")),
    Case("normalize: reversed window", lambda t: D.normalize(vol(), "CT", window=(100, 0)), ValueError, ("window", "high > low")),
    Case("normalize: window of one value", lambda t: D.normalize(vol(), "CT", window=5), ValueError, ("window", "two numbers")),
    Case("normalize: reversed percentiles", lambda t: D.normalize(vol(), "MRI", percentiles=(99, 1)), ValueError, ("percentiles", "low < high")),
    Case("normalize: mask of another shape", lambda t: D.normalize(vol(), "MRI", mask=np.ones((4, 4, 4))), ValueError, ("mask", "shape of vol")),
    Case("normalize: meta tensor", lambda t: D.normalize(META, "MRI"), TypeError, ("vol", "meta tensor")),
    Case("normalize: constant volume", lambda t: D.normalize(vol(value=3), "MRI"), warns=UserWarning, match=("MRI", "constant"),
         check=lambda v: (v == 0).all()),
    Case("fov_overlap: singular affine", lambda t: D.fov_overlap((8, 8, 8), np.eye(4), (8, 8, 8), np.zeros((4, 4))), ValueError, ("affine_b", "singular")),
    Case("resample_to: 3x3 target affine", lambda t: D.resample_to(vol(), np.eye(4), (8, 8, 8), np.eye(3)), ValueError, ("target_affine", "4x4")),
    Case("resample_to: bad shape", lambda t: D.resample_to(vol(), np.eye(4), (8, 0, 8), np.eye(4)), ValueError, ("shape", "positive ints")),
    Case("resample_to: order 7", lambda t: D.resample_to(vol(), np.eye(4), (8, 8, 8), 2 * np.eye(4), order=7), ValueError, ("order", "0")),
    Case("resample_pair: singular other_affine", lambda t: D.resample_pair(vol(), np.eye(4), vol(), np.diag([1.0, 1, 0, 1])), ValueError, ("other_affine", "singular")),
    Case("resample_pair: 2D other", lambda t: D.resample_pair(vol(), np.eye(4), vol()[0], np.eye(4)), ValueError, ("other", r"one 3D volume \(D, H, W\)")),
    Case("resample_pair: (1, D, H, W) ref", lambda t: D.resample_pair(vol()[None], np.eye(4), vol(), np.eye(4)), ValueError, ("ref", r"ref\[0\]")),
    Case("resample_pair: 3x3 ref_affine", lambda t: D.resample_pair(vol(), np.eye(3), vol(), np.eye(4)), ValueError, ("ref_affine", "4x4", "translation")),
    Case("resample_pair: disjoint fields of view", lambda t: D.resample_pair(vol(), np.eye(4), vol(), np.eye(4) + np.pad([[500.0]], ((0, 3), (3, 0)))),
         ValueError, ("other", "overlap", "same subject")),
    Case("resize_grid: 3x3 affine", lambda t: D.resize_grid((8, 8, 8), np.eye(3), 4), ValueError, ("affine", "4x4")),
    Case("load_pair: unknown task", lambda t: D.load_pair("a.nii", "b.nii", "xray"), ValueError, ("task", "one of")),
    Case("load_pair: missing file", lambda t: D.load_pair(t / "a.nii", t / "b.nii", "mri"), FileNotFoundError, ("a.nii", "no such file")),
    Case("split_sizes: sizes an int", lambda t: D.split_sizes(10, 5), ValueError, ("sizes", r"\(train, test\)")),
    Case("split_sizes: negative n", lambda t: D.split_sizes(-1, (1, 1)), ValueError, ("n=-1", ">= 0")),
    Case("make_split: groups of another length", lambda t: D.make_split(["a", "b"], groups=["g"]), ValueError, ("groups", "one group per id")),
    Case("make_split: negative size", lambda t: D.make_split(["a", "b"], (-1, 1)), ValueError, ("sizes", "non-negative")),
    Case("make_split: a file holding other sizes", lambda t: D.make_split(["a", "b", "c"], (2, 1), path=D.make_split(["a", "b", "c"], (1, 2), path=t / "s.json") and t / "s.json"),
         ValueError, ("s.json", r"sizes=\(1, 2\)", "delete")),
    Case("BraTS2020: root missing", lambda t: D.BraTS2020(t / "nothing"), FileNotFoundError, ("root", "no such folder")),
    Case("BraTS2020: root is a file", lambda t: D.BraTS2020(csv_file(t, "x", "f.txt")), FileNotFoundError, ("root", "is a file")),
    Case("BraTS2020: empty folder", lambda t: D.BraTS2020(t), ValueError, ("found no", "layout")),
    Case("BraTS2020: unknown split", lambda t: D.BraTS2020(brats(t), split="val"), ValueError, ("split", "'train', 'test' or 'all'")),
    Case("BraTS2020: split file with other sizes", lambda t: D.BraTS2020(split_file(t)[0], split="test", sizes=(0, 2), split_file=t / "split.json"),
         ValueError, ("split.json", r"sizes=\(1, 1\)", "delete")),
    Case("BraTS2020: split file with another seed", lambda t: D.BraTS2020(split_file(t)[0], split="test", seed=9, split_file=t / "split.json"),
         ValueError, ("split.json", "seed=0", "seed=None")),
    Case("BraTS2020: split file, sizes=None", lambda t: len(D.BraTS2020(split_file(t)[0], split="test", split_file=t / "split.json")),
         check=lambda n: n == 1),
    Case("SynthRAD2023: a subject without ct", lambda t: D.SynthRAD2023(no_ct(t)), FileNotFoundError, ("1BA001", "no ct.nii.gz")),
    Case("PETCT: a study without PET", lambda t: D.PETCT(no_pet(t)), FileNotFoundError, ("CTres.nii.gz", "neither SUV.nii.gz nor PET.nii.gz")),
    Case("read_csv_rows: missing file", lambda t: D.read_csv_rows(t / "no.csv"), FileNotFoundError, ("csv_path", "no such file")),
    Case("read_csv_rows: header only", lambda t: D.read_csv_rows(csv_file(t, "\ufeffa, b\n")), ValueError, ("pairs.csv", r"header row \(a, b\)", "no data lines")),
    Case("CSVPairs: missing file", lambda t: D.CSVPairs(t / "no.csv"), FileNotFoundError, ("csv_path", "no such file")),
    Case("CSVPairs: header only", lambda t: D.CSVPairs(csv_file(t, "reference,other\n"), task="ct"), ValueError, ("pairs.csv", "no data lines")),
    Case("CSVPairs: empty file", lambda t: D.CSVPairs(csv_file(t, ""), task="ct"), ValueError, ("pairs.csv", "empty")),
    Case("CSVPairs: wrong columns", lambda t: D.CSVPairs(csv_file(t, "ref_path,other_path\na,b\n"), task="ct"), ValueError, ("pairs.csv", "'reference' and 'other'")),
    Case("CSVPairs: semicolons", lambda t: D.CSVPairs(csv_file(t, "reference;other\na;b\n"), task="ct"), ValueError, ("pairs.csv", "';'", "commas")),
    Case("CSVPairs: not UTF-8", lambda t: D.CSVPairs(csv_file(t, "reference,other\nbrücke,b\n", encoding="latin-1"), task="ct"), ValueError, ("pairs.csv", "UTF-8")),
    Case("CSVPairs: no task", lambda t: D.CSVPairs(csv_file(t, "reference,other\na,b\n")), ValueError, ("pairs.csv, line 2", "task")),
    Case("CSVPairs: unknown task in a line", lambda t: D.CSVPairs(csv_file(t, "reference,other,task\na,b,xray\n")), ValueError, ("line 2", "task='xray'", "one of")),
    Case("CSVPairs: missing file in a line", lambda t: D.CSVPairs(csv_file(t, "reference,other\nnothere.nii.gz,b\n"), task="ct"), FileNotFoundError, ("line 2", "nothere.nii.gz")),
    Case("CSVPairs: too many fields", lambda t: D.CSVPairs(csv_file(t, "reference,other\na,b,c\n"), task="ct"), ValueError, ("line 2", "3 fields", "2 columns")),
    Case("CSVPairs: BOM and spaces (Excel)", lambda t: D.CSVPairs(csv_file(fake_tree(t, "csv", n=1, size=8).parent,
         "\ufeffReference, Other, Task\ncase0/t1.nii.gz, case0/ct.nii.gz, ct\n", "x.csv")).items[0]["ref"].name, check=lambda n: n == "t1.nii.gz"),
    Case("fake_tree: unknown layout", lambda t: fake_tree(t, "nifti"), ValueError, ("layout", "brats2020")),
]


# ---------------------------------------------------------------- unifuse.spatial

SPATIAL = [
    Case("identity_grid: zero size", lambda t: S.identity_grid((4, 0, 4)), ValueError, ("size", "positive ints")),
    Case("identity_grid: hands out a copy", lambda t: (S.identity_grid((2, 3, 4)).zero_(), S.identity_grid((2, 3, 4)))[1],
         check=lambda g: g[0, :, 1, 2, 3].tolist() == [1.0, 2.0, 3.0]),
    Case("warp: flow not a tensor", lambda t: S.warp(torch.rand(1, 1, 4, 4, 4), None), TypeError, ("flow", "torch.Tensor")),
    Case("warp: flow with 2 channels in 3D", lambda t: S.warp(torch.rand(1, 1, 4, 4, 4), torch.zeros(1, 2, 4, 4, 4)), ValueError, ("flow", r"\(B, 3, D, H, W\)")),
    Case("warp: integer flow", lambda t: S.warp(torch.rand(1, 1, 4, 4, 4), torch.zeros(1, 3, 4, 4, 4, dtype=torch.long)), TypeError, ("flow", "floating")),
    Case("warp: x of another size", lambda t: S.warp(torch.rand(1, 1, 4, 4, 5), flow(4)), ValueError, ("x", "resample")),
    Case("warp: x without batch and channel", lambda t: S.warp(torch.rand(4, 4, 4), flow(4)), ValueError, ("x", r"\(B, C, \*spatial\)")),
    Case("warp: batch sizes 2 and 3", lambda t: S.warp(torch.rand(2, 1, 4, 4, 4), flow(4, 3)), ValueError, ("batch sizes of `x`", "match or be 1")),
    Case("warp: unknown mode", lambda t: S.warp(torch.rand(1, 1, 4, 4, 4), flow(4), mode="cubic"), ValueError, ("mode", "bilinear")),
    Case("warp: unknown padding", lambda t: S.warp(torch.rand(1, 1, 4, 4, 4), flow(4), padding_mode="edge"), ValueError, ("padding_mode", "border")),
    Case("warp: labels with mode='bilinear'", lambda t: S.warp(labels(4)[None, None], flow(4), mode="bilinear"), ValueError, ("mode", "nearest")),
    Case("warp: labels with a NaN flow", lambda t: S.warp(labels(6)[None, None], with_nan(flow(), (0, 0, 1, 1, 1))), ValueError, ("flow", "NaN or infinite")),
    Case("warp: labels {1, 3} stay {1, 3}", lambda t: S.warp(1 + 2 * (torch.arange(6) > 2).long().view(1, 1, 1, 1, 6).expand(1, 1, 6, 6, 6).contiguous(),
         torch.zeros(1, 3, 6, 6, 6).index_fill_(1, torch.tensor([2]), 0.5)), check=lambda y: y.unique().tolist() == [1, 3]),
    Case("warp: a NaN flow gives NaN there", lambda t: S.warp(torch.rand(1, 1, 6, 6, 6), with_nan(flow(), (0, 1, 2, 2, 2))),
         check=lambda y: bool(torch.isnan(y[0, 0, 2, 2, 2])) and int(torch.isnan(y).sum()) == 1),
    Case("warp: runs on meta tensors", lambda t: S.warp(META, torch.empty(1, 3, 20, 20, 20, device="meta")), check=lambda y: y.is_meta and y.shape == META.shape),
    Case("compose: two grids", lambda t: S.compose(flow(4), flow(5)), ValueError, ("`a`", "same grid")),
    Case("integrate: steps -1", lambda t: S.integrate(flow(4), steps=-1), ValueError, ("steps", "non-negative int")),
    Case("integrate: steps 2.5", lambda t: S.integrate(flow(4), steps=2.5), ValueError, ("steps", "non-negative int")),
    Case("resize_flow: 2 sizes for 3 channels", lambda t: S.resize_flow(flow(4), (8, 8)), ValueError, ("size", "3 entries")),
    Case("resize_flow: zero size", lambda t: S.resize_flow(flow(4), (8, 8, 0)), ValueError, ("size", "positive ints")),
    Case("rotation_matrix: a list", lambda t: S.rotation_matrix([0.1, 0.2, 0.3]), TypeError, ("angles", "torch.Tensor")),
    Case("rotation_matrix: (B, 4)", lambda t: S.rotation_matrix(torch.zeros(2, 4)), ValueError, ("angles", r"\(B, 3\)")),
    Case("affine_flow: 2x2 matrix for 3D", lambda t: S.affine_flow(torch.eye(2)[None], torch.zeros(1, 3), (4, 4, 4)), ValueError, ("matrix", r"\(B, 3, 3\)")),
    Case("affine_flow: centre of 2 values", lambda t: S.affine_flow(torch.eye(3)[None], torch.zeros(1, 3), (4, 4, 4), center=(1, 2)), ValueError, ("center", "3 coordinates")),
    Case("affine_flow: lists", lambda t: S.affine_flow([[1, 0, 0]], [0, 0, 0], (4, 4, 4)), TypeError, ("matrix", "torch.Tensor")),
    Case("jacobian_det: one voxel thick", lambda t: S.jacobian_det(torch.zeros(1, 3, 1, 4, 4)), ValueError, ("flow", "at least 2 voxels")),
]


# ---------------------------------------------------------------- unifuse.metrics

A, B, F20 = t3(20, 0), t3(20, 1), t3(20, 2)

METRICS = [
    Case("q_mse: a list", lambda t: M.q_mse(A.tolist(), B, F20), TypeError, ("a must be", "torch.Tensor or numpy")),
    Case("q_mse: shapes differ", lambda t: M.q_mse(A, B, F20[:-1]), ValueError, ("fused", "shapes differ", "one grid")),
    Case("q_mse: 2D volumes", lambda t: M.q_mse(A[0], B[0], F20[0]), ValueError, ("a must have shape", r"\(D, H, W\)")),
    Case("q_mse: one RGB volume without batch axis", lambda t: M.q_mse(A, B, F20.expand(3, 20, 20, 20)), ValueError, ("fused", r"x\[None\]")),
    Case("q_mse: a NaN", lambda t: M.q_mse(A, B, with_nan(F20)), ValueError, ("fused", "1 NaN", r"\[0, 1\]")),
    Case("q_cc: 0-255 data", lambda t: M.q_cc(A * 255, B, F20), ValueError, ("a has values", r"expect \[0, 1\]", "rescale")),
    Case("q_psnr: values up to 1.5", lambda t: M.q_psnr(A, B, F20 * 1.5), warns=UserWarning, match=("fused", r"outside \[0, 1\]", "Q_psnr"),
         check=lambda v: math.isfinite(v)),
    Case("q_psnr: empty batch", lambda t: M.q_psnr(A[None, None][:0], B[None, None][:0], F20[None, None][:0]), ValueError, ("a is an empty batch", "at least one")),
    Case("q_psnr: meta tensors", lambda t: M.q_psnr(META, META, META), TypeError, ("a is a meta tensor", "CPU or GPU")),
    Case("q_ssim: RGB fused is scored on Y", lambda t: M.q_ssim(A[None, None], B[None, None], F20[None, None].expand(1, 3, 20, 20, 20)),
         check=lambda v: torch.allclose(v, M.q_ssim(A[None, None], B[None, None], F20[None, None]))),
    Case("q_scd: a NaN in a", lambda t: M.q_scd(with_nan(A), B, F20), ValueError, ("a contains 1 NaN", "finite")),
    Case("q_viff: shapes differ", lambda t: M.q_viff(A, B[:, :-1], F20), ValueError, ("b", "shapes differ")),
    Case("ssim: volume below the window", lambda t: M.ssim(A[:8, :8, :8], B[:8, :8, :8]), ValueError, ("SSIM", "at least 11 voxels")),
    Case("q_vif: volume below the window", lambda t: M.q_vif(A[:10], B[:10], F20[:10]), ValueError, ("VIF", "at least 17 voxels")),
    Case("vif: complex values", lambda t: M.vif(A.to(torch.complex64), B), TypeError, ("ref", "real numbers")),
    Case("fusion_metrics: 4D of 2", lambda t: M.fusion_metrics(torch.stack([A, B]), A, B), ValueError, ("a must have shape", r"\(B, 1, D, H, W\)")),
    Case("alignment_metrics: shapes differ", lambda t: M.alignment_metrics(A, B[:-1]), ValueError, ("label", "shapes differ")),
    Case("dice: float labels", lambda t: M.dice(A, B), TypeError, ("seg", "integer labels", "round")),
    Case("dice: shapes differ", lambda t: M.dice(labels(4), labels(5)), ValueError, ("seg", "target", "differ in shape")),
    Case("dice: labels a string", lambda t: M.dice(labels(4), labels(4), labels="all"), TypeError, ("labels", "integer label values")),
    Case("folding_fraction: 2 channels", lambda t: M.folding_fraction(torch.zeros(2, 8, 8, 8)), ValueError, ("flow", r"\(3, D, H, W\)")),
    Case("folding_fraction: a NaN flow is NaN, not 0.0", lambda t: M.folding_fraction(with_nan(torch.zeros(3, 8, 8, 8), (0, 4, 4, 4))), check=math.isnan),
    Case("folding_fraction: meta", lambda t: M.folding_fraction(torch.empty(3, 8, 8, 8, device="meta")), TypeError, ("flow", "meta tensor")),
    Case("warp_labels: float labels", lambda t: M.warp_labels(A, torch.zeros(3, 20, 20, 20)), TypeError, ("labels", "integer labels")),
    Case("warp_labels: flow of another grid", lambda t: M.warp_labels(labels(8), torch.zeros(3, 9, 9, 9)), ValueError, ("labels", "flow", "same batch and grid")),
    Case("warp_labels: a NaN flow", lambda t: M.warp_labels(labels(8), with_nan(torch.zeros(3, 8, 8, 8), (0, 4, 4, 4))), ValueError, ("flow", "NaN or infinite")),
    Case("warp_labels: n_labels too small", lambda t: M.warp_labels(labels(8), torch.zeros(3, 8, 8, 8), n_labels=3), ValueError, ("n_labels=3", "below", "found 3")),
    Case("warp_labels: label 2035 needs 2 channels, not 2036", lambda t: M.warp_labels(labels(8) * 678 + 1, torch.full((3, 8, 8, 8), 0.3)),
         check=lambda y: y.unique().tolist() == [1, 2035]),
    Case("invert_flow: 2 channels", lambda t: M.invert_flow(torch.zeros(2, 4, 4, 4)), ValueError, ("flow", r"\(3, D, H, W\)")),
    Case("count_params: not a module", lambda t: M.count_params("net"), TypeError, ("module", "torch.nn.Module")),
    Case("count_flops: not callable", lambda t: M.count_flops("net"), TypeError, ("fn", "callable")),
    Case("flops_by_module: not a module", lambda t: M.flops_by_module(len, 1), TypeError, ("module", "torch.nn.Module")),
]


# ---------------------------------------------------------------- unifuse.evaluate (functions)

EVALUATE = [
    Case("restore: unknown task", lambda t: E.restore(A, "xray"), ValueError, ("task", "expected one of")),
    Case("restore_tv: negative weight", lambda t: E.restore_tv(A, -0.1), ValueError, ("weight", ">= 0")),
    Case("laplacian_pyramid: 3D tensor", lambda t: E.laplacian_pyramid(A, 3), ValueError, ("x", r"\(B, C, D, H, W\)")),
    Case("laplacian_pyramid: 0 levels", lambda t: E.laplacian_pyramid(A[None, None], 0), ValueError, ("levels", "positive int")),
    Case("builtin_cases: unknown task", lambda t: next(E.builtin_cases(["mri", "xray"])), ValueError, ("tasks", "one or more of")),
    Case("builtin_cases: n 0", lambda t: next(E.builtin_cases("mri", n=0)), ValueError, ("n=0", "at least 1")),
    Case("baseline_methods: unknown rule", lambda t: E.baseline_methods(["median"]), ValueError, ("rules", "median", "pyramid")),
    Case("unifuse_method: not a model", lambda t: E.unifuse_method("model.pt"), TypeError, ("model", "torch.nn.Module")),
    Case("evaluate: no methods", lambda t: E.evaluate([{}], {}), TypeError, ("methods", "baseline_methods")),
    Case("evaluate: no cases", lambda t: E.evaluate([], E.baseline_methods()), ValueError, ("cases", "at least one")),
    Case("summarise: rows without method", lambda t: E.summarise([{"Q_mse": 0.1}]), ValueError, ("rows", "'method'")),
    Case("write_csv: no rows", lambda t: E.write_csv([], t / "x.csv"), ValueError, ("rows", "non-empty")),
    Case("vif_scales: size 0", lambda t: E.vif_scales(0), ValueError, ("size", "positive int")),
    Case("restore: 2D", lambda t: E.restore(A[0], "mri"), ValueError, ("x must be one volume", r"\(D, H, W\)")),
    Case("restore: NaN", lambda t: E.restore(with_nan(A), "mri"), ValueError, ("x holds 1 NaN", "finite")),
    Case("register: two grids", lambda t: E.register(A, B[:-1]), ValueError, ("fixed", "moving", "one grid")),
    Case("fuse: unknown rule", lambda t: E.fuse(A, B, "median"), ValueError, ("rule", "'average', 'maximum' or 'pyramid'")),
    Case("fuse: shapes differ", lambda t: E.fuse(A, B[:-1]), ValueError, ("a", "b", "same shape")),
    Case("fuse: levels 0", lambda t: E.fuse(A, B, levels=0), ValueError, ("levels", "positive int")),
    Case("staged_baseline: unknown task", lambda t: E.staged_baseline(A, B, "xray"), ValueError, ("task", "expected one of")),
    Case("make_case: a pair without 'other'", lambda t: E.make_case({"ref": torch.rand(1, 8, 8, 8)}), ValueError, ("pair", "'other'", "builtin_pair")),
    Case("score_case: two volumes as fused", lambda t: E.score_case(next(E.builtin_cases(["mri"], 1, 20)), torch.zeros(2, 20, 20, 20)),
         ValueError, ("fused", "grey", "RGB")),
    Case("reader_cases: unknown dataset", lambda t: next(E.reader_cases("ixi", t)), ValueError, ("dataset", "brats2020")),
    Case("reader_cases: root missing", lambda t: next(E.reader_cases("brats2020", t / "none")), FileNotFoundError, ("root", "no such folder")),
]


# ---------------------------------------------------------------- commands

def _corrupt(tmp): (tmp / "model.pt").write_bytes(b"\x80\x02 not a checkpoint")
def _a_file(tmp): (tmp / "results").write_text("my notes")
def _used_out(tmp):
    (tmp / "ev").mkdir(); (tmp / "ev" / "fusion.md").write_text("old\n")
    (tmp / "ev" / "summary.json").write_text('{"meta": {}, "summary": []}')
def _header_only(tmp): (tmp / "pairs.csv").write_text("reference,other,task\n")
def _grey_model(tmp):
    from unifuse.model import UniFuse, UniFuseConfig
    UniFuse(UniFuseConfig.tiny()).save(tmp / "grey.pt")
def _root_here(): return "root writes to read-only folders" if hasattr(os, "geteuid") and os.geteuid() == 0 else None
def _cuda_here(): return "this machine has CUDA" if torch.cuda.is_available() else None

EVAL_CLI = [
    Cli("unifuse-eval: a checkpoint with NaN weights", E.main, ["--checkpoint", "{tmp}/nan.pt", "--n", "1"], ("nan.pt", "NaN or infinite weights"),
        lambda t: _nan_checkpoint(t / "nan.pt")),
    Cli("unifuse-eval: --size 0", E.main, ["--size", "0"], ("--size 0", "at least 17")),
    Cli("unifuse-eval: --size 8", E.main, ["--size", "8"], ("--size 8", "at least 17")),
    Cli("unifuse-eval: --n 0", E.main, ["--n", "0"], ("--n 0", "at least 1")),
    Cli("unifuse-eval: --no-baseline alone", E.main, ["--no-baseline"], ("--no-baseline", "--checkpoint")),
    Cli("unifuse-eval: --tasks xray", E.main, ["--tasks", "xray"], ("--tasks", "invalid choice")),
    Cli("unifuse-eval: unknown option", E.main, ["--epochs", "3"], ("unrecognized arguments", "--epochs")),
    Cli("unifuse-eval: --size not a number", E.main, ["--size", "big"], ("--size", "invalid int")),
    Cli("unifuse-eval: a reader without --root", E.main, ["--dataset", "brats2020"], ("--dataset brats2020", "--root")),
    Cli("unifuse-eval: --root missing", E.main, ["--dataset", "brats2020", "--root", "{tmp}/none"], ("--root", "no such file or folder")),
    Cli("unifuse-eval: --root is a file", E.main, ["--dataset", "brats2020", "--root", "{tmp}/results"], ("--dataset brats2020", "root", "is a file"), _a_file),
    Cli("unifuse-eval: --root with builtin", E.main, ["--root", "{tmp}"], ("--root", "--dataset")),
    Cli("unifuse-eval: header-only CSV", E.main, ["--dataset", "csv", "--root", "{tmp}/pairs.csv", "--size", "17"], ("pairs.csv", "no data lines"), _header_only),
    Cli("unifuse-eval: --out names a file", E.main, ["--out", "{tmp}/results"], ("--out", "is a file"), _a_file),
    Cli("unifuse-eval: --out under a file", E.main, ["--out", "{tmp}/results/ev"], ("--out", "is a file"), _a_file),
    Cli("unifuse-eval: --out holds an evaluation", E.main, ["--out", "{tmp}/ev"], ("--out", "earlier evaluation", "--overwrite"), _used_out),
    Cli("unifuse-eval: --device cuda without CUDA", E.main, ["--device", "cuda"], ("--device cuda", "CUDA is not available", "--device cpu"), skip=_cuda_here),
    Cli("unifuse-eval: --device bogus", E.main, ["--device", "gpu0"], ("--device gpu0", "expected auto, cpu")),
    Cli("unifuse-eval: --checkpoint missing", E.main, ["--checkpoint", "{tmp}/none.pt"], ("--checkpoint", "none.pt", "no such file")),
    Cli("unifuse-eval: --colour with a grey checkpoint", E.main, ["--checkpoint", "{tmp}/grey.pt", "--colour", "hot"],
        ("--colour hot", "grey model", "colour=True"), _grey_model),
    Cli("unifuse-eval: --colour not a colour map", E.main, ["--colour", "rainbowish"], ("--colour rainbowish", "colour map")),
    Cli("unifuse-eval: --checkpoint corrupt", E.main, ["--checkpoint", "{tmp}/model.pt"], ("--checkpoint", "model.pt", "could not be loaded"), _corrupt),
]

# Rows for the modules and commands of other engineers go here (unifuse.model, unifuse.degrade, unifuse-train,
# unifuse-fuse): Case rows for functions, Cli rows for commands.
from unifuse.model import UniFuse, UniFuseConfig
from unifuse.degrade import make_batch, DEFAULT_RANGES

_TINY = {}
def tiny():
    "One tiny model for every row (built once)."
    if "m" not in _TINY: torch.manual_seed(0); _TINY["m"] = UniFuse(UniFuseConfig.tiny()).eval()
    return _TINY["m"]

def t5(b=1, c=1, n=8, value=None):
    "A (B, C, n, n, n) tensor in [0, 1]."
    return torch.rand(b, c, n, n, n) if value is None else torch.full((b, c, n, n, n), float(value))

def good_batch():
    return make_batch(t5(1), t5(1), "mri", generator=0)

def batch_with(key, value):
    b = good_batch(); b[key] = value(b[key]); return b

def saved(tmp, edit):
    "A tiny checkpoint written by UniFuse.save, then edited by `edit(ckpt_dict)`."
    path = tiny().save(tmp / "m.pt")
    ck = torch.load(path, weights_only=True); edit(ck); torch.save(ck, path)
    return path

MODEL = [
    Case("UniFuse: config not a UniFuseConfig", lambda t: UniFuse({"patch": 4}), TypeError, ("config", "UniFuseConfig")),
    Case("UniFuseConfig: fa_heads do not divide fa_channels", lambda t: UniFuseConfig(fa_heads=3), ValueError, ("fa_heads", "divisible")),
    Case("UniFuseConfig: unknown switch value", lambda t: UniFuseConfig(oufr="lstm"), ValueError, ("oufr", "one of")),
    Case("UniFuseConfig: negative loss weight", lambda t: UniFuseConfig(loss_weights={"reg": -1}), ValueError, ("loss_weights", ">= 0")),
    Case("UniFuseConfig.from_dict: unknown field", lambda t: UniFuseConfig.from_dict({"patchsize": 4}), ValueError, ("unknown fields", "patchsize")),
    Case("UniFuse: ref without batch and channel axes", lambda t: tiny()(t5()[0, 0], t5()[0, 0]), ValueError, ("ref", r"\(B, 1, D, H, W\)", r"x\[None, None\]")),
    Case("UniFuse: RGB deg for a grey model", lambda t: tiny()(t5(), t5(c=3)), ValueError, ("deg", r"\(B, 1, D, H, W\)", "colour=True")),
    Case("UniFuse: empty batch", lambda t: tiny()(t5(b=0), t5(b=0)), ValueError, ("ref", "empty batch")),
    Case("UniFuse: an empty grid", lambda t: tiny()(torch.rand(1, 1, 0, 8, 8), torch.rand(1, 1, 0, 8, 8)), ValueError, ("ref", "empty grid", "at least one voxel")),
    Case("UniFuse.load: map_location 'gpu'", lambda t: UniFuse.load(tiny().save(t / "m.pt"), map_location="gpu"), ValueError, ("map_location='gpu'", "'cpu', 'cuda'")),
    Case("UniFuse: grids differ", lambda t: tiny()(t5(n=8), t5(n=12)), ValueError, ("same batch size and grid", "resample")),
    Case("UniFuse: NaN voxel", lambda t: tiny()(t5(), with_nan(t5(), (0, 0, 1, 2, 3))), ValueError, ("deg", "NaN")),
    Case("UniFuse: integer volume", lambda t: tiny()(t5().to(torch.uint8), t5().to(torch.uint8)), TypeError, ("ref", "floating")),
    Case("UniFuse: numpy array", lambda t: tiny()(t5().numpy(), t5()), TypeError, ("ref", "torch.Tensor")),
    Case("UniFuse: half-precision weights", lambda t: UniFuse(UniFuseConfig.tiny()).half()(t5(), t5()), TypeError, ("weights", "float16", "autocast")),
    Case("UniFuse: intensities far outside [0, 1] warn", lambda t: tiny()(t5() * 1000, t5()), None, ("intensities", r"\[0, 1\]"),
         check=lambda o: o["fused"].shape == (1, 1, 8, 8, 8), warns=UserWarning),
    Case("UniFuse.loss: not a make_batch dict", lambda t: tiny().loss({"ref": t5()}), ValueError, ("batch", "make_batch")),
    Case("UniFuse.loss: flow of the wrong grid", lambda t: tiny().loss(batch_with("flow", lambda f: f[..., :4])), ValueError, (r"batch\['flow'\]", r"\(1, 3, 8, 8, 8\)")),
    Case("UniFuse.loss: NaN in deg_fine", lambda t: tiny().loss(batch_with("deg_fine", lambda x: with_nan(x, (0, 0, 1, 1, 1)))), ValueError, ("deg_fine", "NaN")),
    Case("UniFuse.loss: NaN in flow", lambda t: tiny().loss(batch_with("flow", lambda x: with_nan(x, (0, 0, 1, 1, 1)))), ValueError, ("flow", "NaN")),
    Case("UniFuse.loss: NaN in ref_moved", lambda t: tiny().loss(batch_with("ref_moved", lambda x: with_nan(x, (0, 0, 1, 1, 1)))), ValueError, ("ref_moved", "NaN")),
    Case("UniFuse.loss: float labels", lambda t: tiny().loss(batch_with("label", lambda l: l.float())), TypeError, (r"batch\['label'\]", "long")),
    Case("UniFuse.loss: clean label with 3 classes", lambda t: tiny().loss(batch_with("label", lambda l: torch.full_like(l, 3))), ValueError, ("label", "n_classes=4")),
    Case("UniFuse.load: missing file", lambda t: UniFuse.load(t / "none.pt"), FileNotFoundError, ("UniFuse.load", "none.pt")),
    Case("UniFuse.load: truncated file", lambda t: UniFuse.load(Path(csv_file(t, "half a checkpoint", "m.pt"))), ValueError, ("m.pt", "not a readable checkpoint")),
    Case("UniFuse.load: a state_dict, not a checkpoint", lambda t: (torch.save(tiny().state_dict(), t / "sd.pt"), UniFuse.load(t / "sd.pt")), ValueError, ("sd.pt", "not a UniFuse checkpoint", "UniFuse.save")),
    Case("UniFuse.load: no config", lambda t: UniFuse.load(saved(t, lambda c: c.pop("config"))), ValueError, ("m.pt", "no config")),
    Case("UniFuse.load: unknown format_version", lambda t: UniFuse.load(saved(t, lambda c: c.update(format_version=99))), ValueError, ("format_version=99", "does not know")),
    Case("UniFuse.load: weights of another config", lambda t: UniFuse.load(saved(t, lambda c: c.update(config=UniFuseConfig.tiny(embed_dim=8).to_dict()))), ValueError, ("m.pt", "do not fit")),
    Case("UniFuse.load: map_location cuda without CUDA", lambda t: UniFuse.load(tiny().save(t / "m.pt"), map_location="cuda"), ValueError, ("map_location='cuda'", "no CUDA", "map_location='cpu'")),
    Case("UniFuse.load: damaged file (flipped bytes)", lambda t: UniFuse.load(damaged(tiny().save(t / "m.pt"))), ValueError, ("m.pt", "damaged", "intact copy")),
    Case("UniFuse.load: NaN weights (a diverged run)", lambda t: UniFuse.load(saved(t, lambda c: next(v for v in c["state_dict"].values() if v.is_floating_point()).fill_(float("nan")))),
         ValueError, ("m.pt", "NaN or infinite weights", "earlier checkpoint")),
    Case("UniFuse.pretrained: unknown name", lambda t: UniFuse.pretrained("no-such-weights"), FileNotFoundError, ("no-such-weights", "available")),
]
DEGRADE = [
    Case("make_batch: one volume without batch axes", lambda t: make_batch(t5()[0], t5()[0], "mri"), ValueError, ("ref", r"\(B, 1, D, H, W\)")),
    Case("make_batch: unknown task", lambda t: make_batch(t5(), t5(), "xray"), ValueError, ("task", "xray", "expected one of")),
    Case("make_batch: one task for two samples", lambda t: make_batch(t5(2), t5(2), ["mri"]), ValueError, ("task", "list of 2")),
    Case("make_batch: empty batch", lambda t: make_batch(t5(0), t5(0), "mri"), ValueError, ("ref", "empty batch")),
    Case("make_batch: meta tensors", lambda t: make_batch(t5().to("meta"), t5().to("meta"), "mri"), ValueError, ("meta", "real tensors")),
    Case("make_batch: generator not a Generator", lambda t: make_batch(t5(), t5(), "mri", generator="42"), TypeError, ("generator", "torch.Generator")),
    Case("make_batch: an int generator is a seed", lambda t: make_batch(t5(value=0.5), t5(value=0.5), "mri", generator=42)["flow"].shape, None, (),
         check=lambda s: s == (1, 3, 8, 8, 8)),
    Case("make_batch: NaN voxel", lambda t: make_batch(t5(), with_nan(t5(), (0, 0, 1, 1, 1)), "mri"), ValueError, ("other", "NaN")),
    Case("make_batch: intensities in HU", lambda t: make_batch(t5() * 1000, t5(), "ct"), ValueError, ("intensities", r"\[0, 1\]")),
    Case("make_batch: ranges not a Ranges", lambda t: make_batch(t5(), t5(), "mri", ranges={"rotation_deg": 5}), TypeError, ("ranges", "Ranges")),
    Case("make_batch: colour not a map name", lambda t: make_batch(t5(), t5(), "pet", colour=1), TypeError, ("colour", "colour map")),
    Case("make_batch: unknown colour map", lambda t: make_batch(t5(), t5(), "pet", colour="no-such-map"), ValueError, ("colour map", "no-such-map")),
    Case("make_batch: strength out of range", lambda t: make_batch(t5(), t5(), "mri", strength=1.5), ValueError, ("strength", r"\[0, 1\]")),
]
from unifuse import train as T
from unifuse import fuse as F

def _fuse_files(tmp):
    "A reference, a degraded volume, a flat one, a 4D one, one with a NaN, one far away, junk, and a tiny checkpoint."
    import nibabel as nib
    v = vol(16)
    for name, a in (("ref.nii.gz", v), ("deg.nii.gz", v), ("flat.nii.gz", v[:, :, :1]), ("nan.nii.gz", with_nan(v)),
                    ("const.nii.gz", vol(16, 0.5))):
        nii(tmp, name, a)
    nib.save(nib.Nifti1Image(np.stack([v, v], -1), np.eye(4)), str(tmp / "four.nii.gz"))
    far = np.eye(4); far[:3, 3] = 1000
    nii(tmp, "far.nii.gz", v, far)
    (tmp / "junk.pt").write_bytes(b"half a checkpoint")
    tiny().save(tmp / "m.pt")
    damaged(tiny().save(tmp / "bad.pt"))

def _nan_checkpoint(path):
    ck = tiny().checkpoint(); sd = ck["state_dict"] = {k: v.clone() for k, v in ck["state_dict"].items()}   # not the shared model
    sd["fa.head.2.bias"].fill_(float("nan")); torch.save(ck, path)

def _fuse(ref, deg, *extra):
    return ["{tmp}/" + ref, "{tmp}/" + deg, "-o", "{tmp}/fused.nii.gz", "--task", "mri", *extra]

def _used_run(tmp):
    (tmp / "run").mkdir(); (tmp / "run" / "train.log").write_text("an earlier run\n")

def _full_disk_train(tmp, when):
    "unifuse-train whose torch.save hits a full disk ('… file write failed') while making the pool or a checkpoint."
    import contextlib, io
    argv = ["--out", str(tmp / "r"), "--preset", "tiny", "--crop", "16", "--val-crop", "20", "--spacing-mm", "7", "--pool-size", "2",
            "--val-subjects", "1", "--workers", "0", "--steps", "2", "--quiet", "--pool-dir", str(tmp / "pool")]
    if when == "checkpoint":                                               # the pool is made first, on a disk with room
        T.warm_cache([T.BuiltinSubjects(range(2), 7.0, tmp / "pool"), T.BuiltinSubjects([T.VAL_SEED0], 7.0, tmp / "pool")], workers=0)
    def full(obj, f, *a, **k):
        Path(f).write_bytes(b"\0" * 10)                                    # a few bytes reach the disk, then it fails
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/3: file write failed")
    real, torch.save = torch.save, full
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err): code = T.main(argv)
    finally: torch.save = real
    left = sorted(p.name for p in (tmp / "r").iterdir()) if (tmp / "r").exists() else []
    hidden = [p.name for d in (tmp / "r", tmp / "pool") if d.exists() for p in d.iterdir() if p.name.startswith(".")]
    return code, err.getvalue(), left, hidden

def _one_line(r, *words):
    code, err, left, hidden = r
    return code == 2 and len(err.strip().splitlines()) == 1 and all(w in err for w in words) and "Errno" not in err and not hidden

def _killed_and_resumed(tmp):
    "unifuse-train --pool-dir P killed (SIGKILL) after its first checkpoint, then `--resume` alone: (pool made in OUT?, tb steps)."
    import signal, subprocess, sys, time
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root), "MPLBACKEND": "Agg"}
    out, pool = tmp / "run", tmp / "pool"
    args = [sys.executable, "-m", "unifuse.train", "--out", str(out), "--preset", "tiny", "--crop", "16", "--val-crop", "20",
            "--spacing-mm", "7", "--pool-size", "2", "--val-subjects", "1", "--workers", "0", "--steps", "8",
            "--ckpt-every", "2", "--val-every", "4", "--log-every", "1", "--quiet"]
    p = subprocess.Popen(args + ["--pool-dir", str(pool)], env=env, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.time()
    while not (out / "checkpoint.pt").exists():
        if p.poll() is not None or time.time() - t0 > 180: p.kill(); raise RuntimeError(p.communicate()[1].decode()[-1000:])
        time.sleep(0.05)
    time.sleep(0.5); p.send_signal(signal.SIGKILL); p.wait()                # killed a little after the checkpoint
    r = subprocess.run(args + ["--resume"], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    if r.returncode: raise RuntimeError(r.stderr[-1000:])
    events = [e for f in sorted((out / "tb").iterdir()) for e in EventFileLoader(str(f)).Load()]
    return (out / "pool").exists(), sorted(e.step for e in events for v in e.summary.value if v.tag == "train/total")

# The same kill is in tests/test_train.py (test_resume_after_sigkill_continues_on_the_same_schedule), which also checks
# that the resumed run ends bit for bit where an uninterrupted one does.
TRAIN = [
    Case("unifuse-train: killed, then --resume without --pool-dir (the saved pool is reused; TensorBoard holds each step once)",
         _killed_and_resumed, check=lambda r: r == (False, list(range(1, 9))), slow=True),
    Case("unifuse-train: a full disk while making the pool (one line; OUT left as it was, so the same command runs again)",
         lambda t: _full_disk_train(t, "pool"), check=lambda r: _one_line(r, "builtin", "disk full") and r[2] == []),
    Case("unifuse-train: a full disk at a checkpoint (one line naming the file, nothing half-written)",
         lambda t: _full_disk_train(t, "checkpoint"), check=lambda r: _one_line(r, "best.pt", "disk full", "--overwrite")),
    Case("TrainConfig.preset: unknown name", lambda t: T.TrainConfig.preset("huge"), ValueError, ("huge", "expected one of")),
    Case("TrainConfig: steps 0", lambda t: T.TrainConfig.preset("tiny", steps=0), ValueError, ("steps", ">= 1")),
    Case("TrainConfig: negative learning rate", lambda t: T.TrainConfig.preset("tiny", lr=-1.0), ValueError, ("lr", "> 0")),
    Case("TrainConfig.from_dict: unknown field", lambda t: T.TrainConfig.from_dict({"epochz": 3}), ValueError, ("unknown fields", "epochz")),
    Cli("unifuse-train: --out holds a run", T.main, ["--out", "{tmp}/run", "--steps", "1"], ("--out", "earlier run", "--resume", "--overwrite"), _used_run),
    Cli("unifuse-train: --resume with nothing to resume", T.main, ["--out", "{tmp}/fresh", "--resume"], ("--resume", "no checkpoint.pt")),
    Cli("unifuse-train: --cfg unknown field", T.main, ["--out", "{tmp}/r", "--cfg", "patchsize=4"], ("--cfg patchsize", "not a UniFuseConfig field")),
    Cli("unifuse-train: unknown preset", T.main, ["--out", "{tmp}/r", "--preset", "huge"], ("--preset", "invalid choice")),
    Cli("unifuse-train: --steps 0", T.main, ["--out", "{tmp}/r", "--steps", "0"], ("--steps", ">= 1", "got 0")),
    Cli("unifuse-train: --lr negative", T.main, ["--out", "{tmp}/r", "--lr", "-1"], ("--lr", "> 0")),
    Cli("unifuse-train: --device cuda without CUDA", T.main, ["--out", "{tmp}/r", "--device", "cuda"], ("--device cuda", "no CUDA", "--device cpu"), skip=_cuda_here),
    Cli("unifuse-train: a reader without --root", T.main, ["--out", "{tmp}/r", "--dataset", "brats2020"], ("--root", "folder", "brats2020")),
    Cli("unifuse-train: --init with NaN weights (no config.json left behind)", T.main, ["--out", "{tmp}/r", "--init", "{tmp}/nan.pt"], ("nan.pt", "NaN or infinite weights"),
        lambda t: _nan_checkpoint(t / "nan.pt")),
    Cli("unifuse-train: --device tpu", T.main, ["--out", "{tmp}/r", "--device", "tpu"], ("--device tpu", "expected auto, cpu, cuda")),
    Cli("unifuse-train: --init missing", T.main, ["--out", "{tmp}/r", "--init", "{tmp}/none.pt"], ("--init", "none.pt", "no such file")),
    Cli("unifuse-train: --init damaged", T.main, ["--out", "{tmp}/r", "--init", "{tmp}/bad.pt"], ("bad.pt", "damaged"),
        lambda t: damaged(tiny().save(t / "bad.pt"))),
]
FUSE = [
    Cli("unifuse-fuse: REF missing", F.main, _fuse("none.nii.gz", "deg.nii.gz", "--checkpoint", "{tmp}/m.pt"), ("none.nii.gz", "no such file"), _fuse_files),
    Cli("unifuse-fuse: a 2D image", F.main, _fuse("flat.nii.gz", "deg.nii.gz", "--checkpoint", "{tmp}/m.pt"), ("flat.nii.gz", "shape", "at least 2 voxels"), _fuse_files),
    Cli("unifuse-fuse: a 4D image", F.main, _fuse("ref.nii.gz", "four.nii.gz", "--checkpoint", "{tmp}/m.pt"), ("four.nii.gz", "one 3D volume", "4D")),
    Cli("unifuse-fuse: a NaN voxel", F.main, _fuse("ref.nii.gz", "nan.nii.gz", "--checkpoint", "{tmp}/m.pt"), ("nan.nii.gz", "NaN")),
    Cli("unifuse-fuse: grids that do not overlap", F.main, _fuse("ref.nii.gz", "far.nii.gz", "--checkpoint", "{tmp}/m.pt"), ("fields of view", "overlap", "same subject")),
    Cli("unifuse-fuse: not a NIfTI file", F.main, _fuse("junk.pt", "deg.nii.gz", "--checkpoint", "{tmp}/m.pt"), ("junk.pt", "NIfTI")),
    Cli("unifuse-fuse: unknown task", F.main, ["{tmp}/ref.nii.gz", "{tmp}/deg.nii.gz", "-o", "{tmp}/f.nii.gz", "--task", "xray"], ("--task", "invalid choice")),
    Cli("unifuse-fuse: checkpoint missing", F.main, _fuse("ref.nii.gz", "deg.nii.gz", "--checkpoint", "{tmp}/none.pt"), ("checkpoint", "none.pt", "no such file")),
    Cli("unifuse-fuse: checkpoint corrupt", F.main, _fuse("ref.nii.gz", "deg.nii.gz", "--checkpoint", "{tmp}/junk.pt"), ("junk.pt", "not a readable checkpoint")),
    Cli("unifuse-fuse: checkpoint damaged", F.main, _fuse("ref.nii.gz", "deg.nii.gz", "--checkpoint", "{tmp}/bad.pt"), ("bad.pt", "damaged")),
    Cli("unifuse-fuse: a CSV row whose output is another row's input", F.main, ["--csv", "{tmp}/pairs.csv", "--out-dir", "{tmp}", "--task", "mri", "--checkpoint", "{tmp}/m.pt"],
        ("b_fused.nii.gz", "input of this batch"), lambda t: (_fuse_files(t), nii(t, "b_fused.nii.gz", vol(16)),
        csv_file(t, "id,reference,other\na,ref.nii.gz,b_fused.nii.gz\nb,ref.nii.gz,deg.nii.gz\n"))),
    Cli("unifuse-fuse: --prealign rigid on a constant volume", F.main, _fuse("ref.nii.gz", "const.nii.gz", "--checkpoint", "{tmp}/m.pt", "--prealign", "rigid"),
        ("--prealign rigid", "DEG is constant")),
    Cli("unifuse-fuse: a file in the way of -o's folder", F.main, ["{tmp}/ref.nii.gz", "{tmp}/deg.nii.gz", "-o", "{tmp}/results/fused.nii.gz", "--task", "mri",
        "--checkpoint", "{tmp}/m.pt"], ("results", "is a file, not a folder"), lambda t: (_fuse_files(t), _a_file(t))),
    Cli("unifuse-fuse: -o in a read-only folder", F.main, ["{tmp}/ref.nii.gz", "{tmp}/deg.nii.gz", "-o", "{tmp}/ro/fused.nii.gz", "--task", "mri",
        "--checkpoint", "{tmp}/m.pt"], ("ro", "not writable"), lambda t: (_fuse_files(t), (t / "ro").mkdir(mode=0o555)), skip=_root_here),
    Cli("unifuse-fuse: --out-dir under a file", F.main, ["--csv", "{tmp}/pairs.csv", "--out-dir", "{tmp}/results/out", "--task", "mri", "--checkpoint", "{tmp}/m.pt"],
        ("--out-dir", "results", "is a file, not a folder"), lambda t: (_fuse_files(t), _a_file(t), csv_file(t, "id,reference,other\na,ref.nii.gz,deg.nii.gz\n"))),
    Cli("unifuse-fuse: no -o", F.main, ["{tmp}/ref.nii.gz", "{tmp}/deg.nii.gz", "--task", "mri"], ("-o FUSED", "to write")),
]
def _noise_pair(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 1, 24, 24, 24, generator=g), torch.rand(1, 1, 24, 24, 24, generator=g)

def _slope_overflow(tmp):
    import nibabel as nib
    img = nib.Nifti1Image((vol(8) * 100).astype(np.int16), np.eye(4)); img.header.set_slope_inter(1e37, 0)
    nib.save(img, str(tmp / "slope.nii.gz")); return tmp / "slope.nii.gz"

def _zero_pixdims(tmp):
    import nibabel as nib
    img = nib.Nifti1Image(vol(8), None); img.header["pixdim"][1:4] = 0
    img.header.set_qform(None, 0); img.header.set_sform(None, 0)
    nib.save(img, str(tmp / "nopix.nii.gz")); return tmp / "nopix.nii.gz"

FUSE += [
    Case("load_nifti: scl_slope takes the values beyond float32 (the header is blamed, not the voxels)",
         lambda t: D.load_nifti(_slope_overflow(t)), ValueError, ("scl_slope 1e\\+37", "header", "scl_slope = 1")),
    Case("load_nifti: zero voxel sizes and no orientation (warned: 1 mm is a guess)", lambda t: D.load_nifti(_zero_pixdims(t)),
         match=("pixdim", "not positive", "1 mm", "guess"), warns=UserWarning, check=lambda r: r[0].shape == (8, 8, 8)),
    Case("fuse_arrays: an 8³ pair (warned: too little anatomy)", lambda t: F.fuse_arrays(vol(8), np.eye(4), vol(8), np.eye(4), "mri", tiny()),
         match=("8×8×8 voxels", "too little anatomy"), warns=F.FuseWarning, check=lambda r: r["fused"].shape[-3:] == (8, 8, 8)),
    Case("prealign_rigid: two volumes of pure noise (DEG left as it is, with a warning)", lambda t: F.prealign_rigid(*_noise_pair()),
         match=("--prealign rigid", "mutual information", "DEG was left as it is"), warns=F.FuseWarning,
         check=lambda r: float(r[0].abs().max()) == 0 and "not used" in r[1]),
]
for _row in [r for r in FUSE if isinstance(r, Cli)]: _row.setup = _row.setup or _fuse_files            # every row starts from the same files

ROWS = DATA + SPATIAL + METRICS + EVALUATE + EVAL_CLI + MODEL + DEGRADE + TRAIN + FUSE
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, IsADirectoryError)


def test_row_ids_are_unique():
    ids = [r.id for r in ROWS]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})


def _check_message(msg:str, patterns:tuple):
    for p in patterns: assert re.search(p, msg), f"message lacks {p!r}: {msg}"


@pytest.mark.parametrize("row", [pytest.param(r, marks=pytest.mark.slow) if r.slow else r for r in ROWS if isinstance(r, Case)],
                         ids=lambda r: r.id)
def test_case(row, tmp_path):
    if row.exc is not None:
        assert issubclass(row.exc, USER_ERRORS), f"{row.exc.__name__}: a user's mistake raises ValueError or TypeError"
        assert len(row.match) >= 2, "a row names the argument and what was expected"
        with pytest.raises(row.exc) as e: row.call(tmp_path)
        _check_message(str(e.value), row.match)
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = row.call(tmp_path)
    if row.warns is not None:
        msgs = [str(w.message) for w in caught if issubclass(w.category, row.warns)]
        assert msgs, f"no {row.warns.__name__} was raised"
        _check_message(msgs[0], row.match)
    assert row.check is not None, "a row that returns checks its result"
    assert row.check(result), f"unexpected result: {result!r}"


@pytest.mark.parametrize("row", [r for r in ROWS if isinstance(r, Cli)], ids=lambda r: r.id)
def test_cli(row, tmp_path, monkeypatch, capsys):
    if row.skip() is not None: pytest.skip(row.skip())
    assert len(row.match) >= 2, "a row names the option and what was expected"
    monkeypatch.chdir(tmp_path)                                                  # default output folders land here
    if row.setup is not None: row.setup(tmp_path)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    argv = [a.replace("{tmp}", str(tmp_path)) for a in row.argv]
    capsys.readouterr()
    try: code = row.main(argv)                                                   # main returns the exit status,
    except SystemExit as e: code = e.code                                        # or argparse exits
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2, f"exit status {code}, expected 2; stderr: {err}"
    assert len(lines) == 1 and "Traceback" not in err, f"expected one line on stderr, got: {err}"
    _check_message(lines[0], row.match)
    after = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert after == before, f"left behind: {sorted(set(after) - set(before))}"


def test_eval_interrupted(tmp_path, monkeypatch, capsys):
    "Ctrl-C in unifuse-eval: one line, status 130, nothing written (as unifuse-fuse and unifuse-train)."
    monkeypatch.chdir(tmp_path)
    def stop(*a, **k): raise KeyboardInterrupt
    monkeypatch.setattr(E, "evaluate", stop)
    code = E.main(["--n", "1", "--size", "41", "--tasks", "mri", "--out", str(tmp_path / "ev"), "--quiet"])
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 130 and len(lines) == 1 and "interrupted" in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "ev").exists()
