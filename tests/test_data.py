"""Tests of unifuse.data: built-in volumes, NIfTI I/O, orientation, normalisation, resampling, readers, splits."""
import csv
import json
import os
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from unifuse import data as D
from fakes import fake_tree


# ---------------------------------------------------------------- built-in volumes

@pytest.mark.parametrize("task", ["mri", "ct", "pet"])
def test_builtin_pair_shapes_ranges(task):
    p = D.builtin_pair(task, seed=3, size=24)
    assert p["ref"].shape == (1, 24, 24, 24) and p["other"].shape == (1, 24, 24, 24)
    assert p["ref"].dtype == torch.float32 and p["other"].dtype == torch.float32
    for k in ("ref", "other"):
        assert 0 <= float(p[k].min()) and float(p[k].max()) <= 1
        assert float(p[k].std()) > 0.05                      # not a blank volume
    assert p["labels"].shape == (24, 24, 24) and p["labels"].dtype == torch.long
    assert set(p["labels"].unique().tolist()) <= set(range(7))
    assert {1, 2, 3, 4, 5} <= set(p["labels"].unique().tolist())
    assert p["affine"].shape == (4, 4) and p["task"] == task and p["modalities"] == D.TASKS[task]


def test_builtin_pair_non_cubic_and_affine():
    p = D.builtin_pair("mri", seed=0, size=(20, 24, 16))
    assert p["ref"].shape == (1, 20, 24, 16) and p["labels"].shape == (20, 24, 16)
    sp = np.diag(p["affine"])[:3]
    np.testing.assert_allclose(sp * np.array([20, 24, 16]), D._FOV_MM)   # same field of view at any size
    assert D.orientation(p["affine"]) == "RAS"


def test_builtin_deterministic_and_distinct():
    a, b = D.builtin_pair("ct", seed=7, size=20), D.builtin_pair("ct", seed=7, size=20)
    assert torch.equal(a["ref"], b["ref"]) and torch.equal(a["other"], b["other"]) and torch.equal(a["labels"], b["labels"])
    c = D.builtin_pair("ct", seed=8, size=20)
    assert (a["ref"] - c["ref"]).abs().mean() > 0.01 and not torch.equal(a["labels"], c["labels"])


def test_builtin_same_subject_across_tasks_and_sizes():
    # one seed is one head: the T1 of task "mri" and task "ct" are the same volume
    assert torch.equal(D.builtin_pair("mri", 5, 20)["ref"], D.builtin_pair("ct", 5, 20)["ref"])
    small, big = D.builtin_pair("ct", 2, 16)["ref"], D.builtin_pair("ct", 2, 32)["ref"]
    pooled = torch.nn.functional.avg_pool3d(big[None], 2)[0]
    r = np.corrcoef(small.ravel().numpy(), pooled.ravel().numpy())[0, 1]
    assert r > 0.9


def test_builtin_lesion_switch():
    on, off = D.builtin_pair("pet", 4, 32, lesion=True), D.builtin_pair("pet", 4, 32, lesion=False)
    assert on["lesion"] and (on["labels"] == 6).sum() > 0
    assert not off["lesion"] and (off["labels"] == 6).sum() == 0
    m = on["labels"] == 6
    assert on["other"][0][m].mean() > off["other"][0][m].mean()    # the tumour is hot on PET


def test_builtin_tissue_contrasts():
    s = D.builtin_subject(1, 32, lesion=False)
    lab = s["labels"]
    mean = lambda m, k: float(s[m][0][lab == k].mean())
    assert mean("MRI-T1", 3) > mean("MRI-T1", 2) > mean("MRI-T1", 1)      # T1: WM > GM > CSF
    assert mean("MRI-T2", 1) > mean("MRI-T2", 2) > mean("MRI-T2", 3)      # T2: CSF > GM > WM
    assert mean("CT", 4) > 3 * mean("CT", 2)                             # CT: bone bright
    assert mean("PET", 2) > 1.5 * mean("PET", 3)                         # FDG: GM hot


def test_builtin_bad_args():
    with pytest.raises(ValueError, match="task"): D.builtin_pair("xray")
    with pytest.raises(ValueError, match="size"): D.builtin_pair("mri", size=(8, 8))
    with pytest.raises(TypeError, match="size"): D.builtin_pair("mri", size="big")


def test_builtin_pairs_dataset():
    ds = D.BuiltinPairs(("mri", "pet"), n=4, size=16, seed=0)
    assert len(ds) == 4
    b = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert b["ref"].shape == (4, 1, 16, 16, 16) and b["affine"].shape == (4, 4, 4)
    assert b["task"] == ["mri", "pet", "mri", "pet"]
    other = D.BuiltinPairs(("mri", "pet"), n=4, size=16, seed=1)
    assert not torch.equal(ds[0]["ref"], other[0]["ref"])
    with pytest.raises(IndexError): ds[4]


# ---------------------------------------------------------------- NIfTI I/O

def _oblique_affine():
    a = np.array([[0, 0, -2.0, 30], [-1.5, 0, 0, 20], [0, 3, 0, -5], [0, 0, 0, 1]])
    return a


def test_nifti_round_trip_keeps_affine_and_header(tmp_path):
    vol = np.random.default_rng(0).random((6, 7, 8)).astype(np.float32)
    aff = _oblique_affine()
    f = D.save_nifti(tmp_path / "a.nii.gz", vol, aff)
    v, a, h = D.load_nifti(f)
    np.testing.assert_array_equal(v, vol); np.testing.assert_allclose(a, aff)
    h["descrip"] = b"kept"; h.set_xyzt_units("mm", "sec"); h["intent_name"] = b"unifuse"
    v2, a2, h2 = D.load_nifti(D.save_nifti(tmp_path / "b.nii", torch.from_numpy(v)[None], a, h))
    np.testing.assert_array_equal(v2, vol); np.testing.assert_allclose(a2, aff)
    assert h2["descrip"].item() == b"kept" and h2["intent_name"].item() == b"unifuse"
    assert h2.get_xyzt_units() == ("mm", "sec")
    np.testing.assert_allclose(h2.get_zooms(), h.get_zooms())
    t, _, _ = D.load_nifti(f, tensor=True)
    assert isinstance(t, torch.Tensor) and t.shape == (6, 7, 8)


def test_nifti_integer_data_and_trailing_axis(tmp_path):
    lab = np.random.default_rng(1).integers(0, 5, (5, 5, 5)).astype(np.int16)
    v, _, h = D.load_nifti(D.save_nifti(tmp_path / "l.nii.gz", lab, np.eye(4)), dtype=None)
    assert v.dtype == np.int16 and np.array_equal(v, lab)
    nib.save(nib.Nifti1Image(np.ones((4, 5, 6, 1), np.float32), np.eye(4)), str(tmp_path / "t.nii.gz"))
    assert D.load_nifti(tmp_path / "t.nii.gz")[0].shape == (4, 5, 6)


@pytest.mark.parametrize("name,content,match", [
    ("missing.nii.gz", None, "no such file"),
    ("empty.nii.gz", b"", "empty"),
    ("junk.nii.gz", b"garbage bytes", "could not be read"),
])
def test_load_nifti_bad_files(tmp_path, name, content, match):
    f = tmp_path / name
    if content is not None: f.write_bytes(content)
    with pytest.raises((ValueError, FileNotFoundError), match=match) as e:
        D.load_nifti(f)
    assert name in str(e.value)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_load_nifti_non_finite(tmp_path, value):
    v = np.zeros((6, 6, 6), np.float32); v[1, 2, 3] = value
    f = D.save_nifti(tmp_path / "bad.nii.gz", v, np.eye(4), check_finite=False)   # a bad file made elsewhere
    with pytest.raises(ValueError, match="NaN or infinite") as e: D.load_nifti(f)
    assert "bad.nii.gz" in str(e.value)


def test_load_nifti_not_3d(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((6, 6, 6, 2), np.float32), np.eye(4)), str(tmp_path / "4d.nii.gz"))
    with pytest.raises(ValueError, match="one 3D volume"): D.load_nifti(tmp_path / "4d.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((6, 6), np.float32), np.eye(4)), str(tmp_path / "2d.nii.gz"))
    with pytest.raises(ValueError, match="3D"): D.load_nifti(tmp_path / "2d.nii.gz")


def test_save_nifti_bad_args(tmp_path):
    with pytest.raises(ValueError, match="vol"): D.save_nifti(tmp_path / "x.nii", np.zeros((2, 3, 3, 3)), np.eye(4))
    with pytest.raises(ValueError, match="affine"): D.save_nifti(tmp_path / "x.nii", np.zeros((3, 3, 3)), np.eye(3))


# ---------------------------------------------------------------- orientation

def test_to_canonical_keeps_world_positions():
    vol = np.random.default_rng(2).random((5, 6, 7)).astype(np.float32)
    aff = _oblique_affine()
    assert D.orientation(aff) == "PSL"
    can, caff = D.to_canonical(vol, aff)
    assert D.orientation(caff) == "RAS" and can.shape == (7, 5, 6)
    # every voxel keeps its world position
    for ijk in np.ndindex(vol.shape):
        w = aff @ np.array([*ijk, 1.0])
        c = np.linalg.solve(caff, w)[:3]
        np.testing.assert_allclose(c, c.round(), atol=1e-6)
        assert can[tuple(c.round().astype(int))] == vol[ijk]
    # channel-first tensors too; RAS input is returned unchanged
    t, taff = D.to_canonical(torch.from_numpy(np.stack([vol, 2 * vol])), aff)
    assert isinstance(t, torch.Tensor) and t.shape == (2, 7, 5, 6)
    np.testing.assert_allclose(t[1].numpy(), 2 * can); np.testing.assert_allclose(taff, caff)
    same, saff = D.to_canonical(can, caff)
    assert same is can


def test_load_nifti_canonical(tmp_path):
    vol = np.random.default_rng(3).random((5, 6, 7)).astype(np.float32)
    f = D.save_nifti(tmp_path / "o.nii.gz", vol, _oblique_affine())
    v, a, _ = D.load_nifti(f, canonical=True)
    ref, raff = D.to_canonical(vol, _oblique_affine())
    np.testing.assert_array_equal(v, ref); np.testing.assert_allclose(a, raff)


# ---------------------------------------------------------------- normalisation

def test_normalize_mri_robust():
    rng = np.random.default_rng(0)
    v = rng.normal(500, 80, (16, 16, 16)).clip(1); v[:3] = 0; v[8, 8, 8] = 1e6
    n = D.normalize(v, "MRI-T1")
    assert n.min() == 0 and n.max() == 1 and n.dtype == np.float32
    assert 0.3 < np.median(n[3:]) < 0.7                          # one hot voxel does not squash the rest
    assert (n[:3] == 0).all()
    lo, hi = np.percentile(v[3:], [0.5, 99.5])
    np.testing.assert_allclose(n[5, 5, 5], np.clip((v[5, 5, 5] - lo) / (hi - lo), 0, 1), rtol=1e-5)
    t = D.normalize(torch.from_numpy(v), "T2")
    assert isinstance(t, torch.Tensor) and torch.allclose(t, torch.from_numpy(D.normalize(v, "T2")))


def test_normalize_ct_window_and_pet():
    hu = np.array([-1024.0, -100, 400, 900, 2500])
    np.testing.assert_allclose(D.normalize(hu, "CT"), [0, 0, 0.5, 1, 1])
    np.testing.assert_allclose(D.normalize(hu, "CT", window=(-1000, 2000)), [0, 0.3, 1400 / 3000, 1900 / 3000, 1], atol=1e-6)
    suv = np.zeros((10, 10, 10)); suv[2:8, 2:8, 2:8] = np.linspace(1, 10, 216).reshape(6, 6, 6)
    n = D.normalize(suv, "PET")
    assert n[0, 0, 0] == 0 and n.max() == 1
    with pytest.raises(ValueError, match="modality"): D.normalize(hu, "ultrasound")
    with pytest.raises(ValueError, match="window"): D.normalize(hu, "CT", window=(100, 0))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert (D.normalize(np.ones((4, 4, 4)), "MRI") == 0).all() and w


# ---------------------------------------------------------------- resampling

def test_resample_pair_known_shift_and_spacing():
    rng = np.random.default_rng(4)
    ref = rng.random((12, 14, 10)).astype(np.float32)
    aff = np.diag([2.0, 3.0, 1.5, 1.0]); aff[:3, 3] = [10, -20, 5]
    # the other grid: half the spacing, origin 2 reference voxels (4 fine voxels) further along y
    fine = aff.copy(); fine[:3, :3] /= 2; fine[1, 3] += 2 * 3.0
    other = D.resample_to(ref, aff, (24, 20, 20), fine, order=1)
    # fine voxel (2i, 2j - 4, 2k) sits on reference voxel (i, j, k)
    np.testing.assert_allclose(other[::2, 0::2, ::2][:, :10], ref[:, 2:12], atol=1e-5)
    back = D.resample_pair(ref, aff, other, fine)
    assert back.shape == ref.shape
    np.testing.assert_allclose(back[:, 2:12], ref[:, 2:12], atol=1e-5)    # covered part: exact
    assert (back[:, :2] == other.min()).all()                              # outside: the background


def test_resample_integer_shift_moves_by_that_many_voxels():
    ref = np.zeros((10, 10, 10), np.float32); ref[4, 5, 6] = 1
    aff = np.eye(4)
    shifted = aff.copy(); shifted[0, 3] = 3.0                               # other grid starts 3 mm further
    out = D.resample_to(ref, aff, (10, 10, 10), shifted, order=1)
    assert out[1, 5, 6] == 1 and out.sum() == 1
    lab = np.zeros((10, 10, 10), np.int16); lab[2:5] = 3
    nn = D.resample_to(lab, aff, (10, 10, 10), shifted, order=0)
    assert nn.dtype == np.int16 and set(np.unique(nn)) <= {0, 3}


def test_resample_pair_refuses_disjoint_fields_of_view():
    v = np.ones((8, 8, 8), np.float32)
    far = np.eye(4); far[2, 3] = 1000.0
    with pytest.raises(ValueError, match="overlap") as e:
        D.resample_pair(v, np.eye(4), v, far, names=("t1.nii.gz", "t2.nii.gz"))
    assert "t1.nii.gz" in str(e.value) and "same subject" in str(e.value)
    assert D.fov_overlap((8, 8, 8), np.eye(4), (8, 8, 8), np.eye(4)) == 1.0


def test_resize_grid_keeps_field_of_view():
    aff = D.builtin_affine(32)
    new = D.resize_grid((32, 32, 32), aff, (16, 8, 64))
    for shape, a in (((32, 32, 32), aff), ((16, 8, 64), new)):
        lo = a @ np.array([-0.5, -0.5, -0.5, 1]); hi = a @ np.array([*(np.array(shape) - 0.5), 1])
        np.testing.assert_allclose(lo[:3], aff[:3, 3] - np.diag(aff)[:3] / 2)
        np.testing.assert_allclose(hi[:3], aff[:3, 3] + np.diag(aff)[:3] * 31.5)


# ---------------------------------------------------------------- readers

@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    root = tmp_path_factory.mktemp("trees")
    return {k: fake_tree(root / k, k, n=n, size=16) for k, n in
            (("brats2020", 4), ("synthrad2023", 4), ("petct", 5), ("csv", 3))}


@pytest.mark.parametrize("cls,layout,task", [(D.BraTS2020, "brats2020", "mri"), (D.SynthRAD2023, "synthrad2023", "ct"),
                                             (D.PETCT, "petct", "pet")])
def test_readers_on_fake_trees(trees, tmp_path, cls, layout, task):
    ds = cls(trees[layout], split="all", size=16)
    assert len(ds) == (5 if layout == "petct" else 4)
    p = ds[0]
    assert p["ref"].shape == (1, 16, 16, 16) and p["other"].shape == (1, 16, 16, 16)
    assert p["task"] == task and p["modalities"] == D.TASKS[task]
    assert D.orientation(p["affine"].numpy()) == "RAS" and p["affine"].shape == (4, 4)
    for k in ("ref", "other"): assert 0 <= float(p[k].min()) and float(p[k].max()) <= 1 and float(p[k].std()) > 0.05
    b = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert b["ref"].shape == (2, 1, 16, 16, 16)
    native = cls(trees[layout], split="all")[0]                          # no size: the reference's own grid
    assert native["ref"].shape == native["other"].shape


def test_readers_content_matches_the_source(trees):
    # BraTS files are stored LPS; after reading, T1 must match the built-in subject it came from (RAS)
    p = D.BraTS2020(trees["brats2020"], split="all")[0]
    sub = D.builtin_subject(0, 16)
    np.testing.assert_allclose(p["affine"].numpy(), sub["affine"])
    r = np.corrcoef(p["ref"].ravel().numpy(), sub["MRI-T1"].ravel().numpy())[0, 1]
    assert r > 0.95
    # SynthRAD CT on a coarser grid is resampled onto the MR grid: the skull stays where the MR's head is
    s = D.SynthRAD2023(trees["synthrad2023"], split="all")[0]
    assert s["mask"].shape == s["ref"].shape
    assert float(s["other"][s["mask"] > 0].mean()) > float(s["other"][s["mask"] == 0].mean())


def test_petct_ids_groups_and_pet_fallback(trees):
    ds = D.PETCT(trees["petct"], split="all")
    ids = [it["id"] for it in ds.items]
    assert all("/" in i for i in ids) and len({i.split("/")[0] for i in ids}) == 3
    assert any(it["other"].name == "PET.nii.gz" for it in ds.items) and any(it["other"].name == "SUV.nii.gz" for it in ds.items)


def test_csv_reader(trees, tmp_path):
    ds = D.CSVPairs(trees["csv"], size=16)
    assert len(ds) == 3 and ds[1]["id"] == "case1" and ds[1]["task"] == "ct"
    f = tmp_path / "bad.csv"
    f.write_text("reference,other\nnothere.nii.gz,alsonot.nii.gz\n")
    with pytest.raises(FileNotFoundError, match="nothere.nii.gz"): D.CSVPairs(f, task="mri")
    f.write_text("ref_path,other_path\na,b\n")
    with pytest.raises(ValueError, match="reference"): D.CSVPairs(f, task="mri")


def test_reader_missing_and_bad_files(trees, tmp_path):
    import shutil
    root = tmp_path / "brats"; shutil.copytree(trees["brats2020"], root)
    t2 = next(root.rglob("*_002_t2.nii.gz")); t2.unlink()
    with pytest.raises(FileNotFoundError, match="BraTS20_Training_002"): D.BraTS2020(root, split="all")
    with pytest.raises(FileNotFoundError, match="no such folder"): D.BraTS2020(tmp_path / "nothing")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(ValueError, match="found no"): D.SynthRAD2023(tmp_path / "emptydir")
    # a corrupt file is reported, by name, when its item is read
    root2 = tmp_path / "brats2"; shutil.copytree(trees["brats2020"], root2)
    bad = next(root2.rglob("*_001_t2.nii.gz")); bad.write_bytes(b"")
    ds = D.BraTS2020(root2, split="all")
    with pytest.raises(ValueError, match="empty") as e: ds[0]
    assert bad.name in str(e.value)


# ---------------------------------------------------------------- splits

def test_split_sizes_rule():
    assert D.split_sizes(494, (369, 125)) == (369, 125)
    assert D.split_sizes(600, (369, 125)) == (369, 125)                # extra subjects unused
    assert D.split_sizes(40, (369, 125)) == (30, 10)                    # scaled in proportion
    assert D.split_sizes(2, (298, 62)) == (1, 1) and D.split_sizes(1, (298, 62)) == (1, 0)
    assert D.split_sizes(10, (None, 3)) == (7, 3) and D.split_sizes(10, (4, None)) == (4, 6)


def test_split_written_and_reused(trees, tmp_path):
    f = tmp_path / "split.json"
    tr = D.BraTS2020(trees["brats2020"], split="train", seed=0, split_file=f)
    te = D.BraTS2020(trees["brats2020"], split="test", seed=0, split_file=f)
    assert f.exists() and len(tr) + len(te) == 4 and len(te) == 1
    assert not {i["id"] for i in tr.items} & {i["id"] for i in te.items}
    sp = json.loads(f.read_text())
    assert sp["test"] == [i["id"] for i in te.items] and sp["seed"] == 0 and sp["n_found"] == 4
    again = D.BraTS2020(trees["brats2020"], split="test", split_file=f)     # seed=None: the file's split
    assert [i["id"] for i in again.items] == sp["test"]
    with pytest.raises(ValueError, match="seed=0") as e:                     # another seed: not silently the old split
        D.BraTS2020(trees["brats2020"], split="test", seed=123, split_file=f)
    assert str(f) in str(e.value) and "delete" in str(e.value)
    # the same seed draws the same split without a file; another seed (usually) another
    ids = [f"s{i:02d}" for i in range(30)]
    assert D.make_split(ids, (20, 10), seed=5) == D.make_split(ids, (20, 10), seed=5)
    assert D.make_split(ids, (20, 10), seed=5)["test"] != D.make_split(ids, (20, 10), seed=6)["test"]


def test_split_default_file_next_to_data(trees):
    ds = D.SynthRAD2023(trees["synthrad2023"], split="train", seed=3)
    assert ds.split_file.parent == trees["synthrad2023"] and ds.split_file.exists()
    ds.split_file.unlink()


def test_split_file_with_missing_subjects(tmp_path):
    f = tmp_path / "s.json"
    D.make_split([f"s{i}" for i in range(6)], (4, 2), path=f)
    with pytest.raises(ValueError, match="not in the folder"): D.make_split([f"s{i}" for i in range(4)], (4, 2), path=f)


def test_split_keeps_groups_together():
    ids = [f"p{i // 3}/st{i % 3}" for i in range(30)]
    sp = D.make_split(ids, (None, 7), seed=1, groups=[i.split("/")[0] for i in ids])
    tr, te = {i.split("/")[0] for i in sp["train"]}, {i.split("/")[0] for i in sp["test"]}
    assert not tr & te and len(sp["test"]) >= 7 and len(sp["train"]) + len(sp["test"]) == 30


def test_load_pair_refuses_disjoint_pair(tmp_path):
    v = np.ones((8, 8, 8), np.float32)
    far = np.eye(4); far[0, 3] = 500
    a = D.save_nifti(tmp_path / "t1.nii.gz", v, np.eye(4)); b = D.save_nifti(tmp_path / "t2.nii.gz", v, far)
    with pytest.raises(ValueError, match="overlap") as e: D.load_pair(a, b, "mri")
    assert "t2.nii.gz" in str(e.value)


def test_builtin_device_argument_and_blur():
    a = D.builtin_pair("mri", seed=1, size=16)
    b = D.builtin_pair("mri", seed=1, size=16, device="cpu")
    assert torch.equal(a["ref"], b["ref"]) and torch.equal(a["labels"], b["labels"])
    x = torch.zeros(1, 9, 9, 9); x[0, 4, 4, 4] = 1
    y = D.gaussian_blur(x, 1.0)
    assert y.shape == x.shape and abs(float(y.sum()) - 1) < 1e-5 and float(y.max()) < 0.1
    assert torch.allclose(y[0], y[0].permute(1, 2, 0), atol=1e-6)        # isotropic
    assert torch.equal(D.gaussian_blur(x, 0.1), x)                        # below 0.3 voxel: untouched


# ---------------------------------------------------------------- issue 14: nothing lost, nothing silently wrong

def test_save_nifti_is_atomic(tmp_path, monkeypatch):
    f = D.save_nifti(tmp_path / "a.nii.gz", np.ones((4, 4, 4), np.float32), np.eye(4))
    before = f.read_bytes()
    def broken(img, fname):                                                  # a full disk halfway through
        Path(fname).write_bytes(b"partial"); raise OSError("No space left on device")
    monkeypatch.setattr(D.nib, "save", broken)
    with pytest.raises(OSError, match="No space"): D.save_nifti(f, np.zeros((4, 4, 4), np.float32), np.eye(4))
    assert f.read_bytes() == before and os.listdir(tmp_path) == ["a.nii.gz"]   # old file intact, no temporary left
    monkeypatch.undo()
    assert np.array_equal(D.load_nifti(f)[0], np.ones((4, 4, 4), np.float32))


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        f = D.save_nifti(tmp_path / "a.nii", np.ones((4, 4, 4), np.float32), np.eye(4))
        s = D.make_split([f"s{i}" for i in range(4)], (2, 2), path=tmp_path / "split.json")
    finally: os.umask(old)
    assert (f.stat().st_mode & 0o777) == 0o640 and ((tmp_path / "split.json").stat().st_mode & 0o777) == 0o640
    assert len(s["test"]) == 2


def test_save_nifti_torch_long_half_and_bfloat16(tmp_path):
    lab = torch.randint(0, 7, (5, 6, 7))                                      # torch long labels
    v, _, h = D.load_nifti(D.save_nifti(tmp_path / "lab.nii.gz", lab, np.eye(4)), dtype=None)
    assert v.dtype == np.int32 and np.array_equal(v, lab.numpy())
    big = torch.tensor([0, 2 ** 40]).repeat(32).reshape(4, 4, 4)              # beyond int32: stays int64
    assert D.load_nifti(D.save_nifti(tmp_path / "big.nii", big, np.eye(4)), dtype=None)[0].dtype == np.int64
    x = torch.rand(1, 4, 5, 6)
    for dt in (torch.float16, torch.bfloat16):
        v, _, _ = D.load_nifti(D.save_nifti(tmp_path / f"{dt}.nii.gz", x.to(dt), np.eye(4)))
        assert v.dtype == np.float32 and np.allclose(v, x[0].numpy(), atol=1e-2)
    mask = D.load_nifti(D.save_nifti(tmp_path / "m.nii", np.ones((3, 3, 3), bool), np.eye(4)), dtype=None)[0]
    assert mask.dtype == np.uint8


def test_load_nifti_refuses_a_dtype_that_cannot_hold_the_data(tmp_path):
    v = np.full((4, 4, 4), 1509.5, np.float32); v[0] = 3
    f = D.save_nifti(tmp_path / "v.nii.gz", v, np.eye(4))
    with pytest.raises(ValueError, match=r"1509.5.*uint8.*0 \.\. 255"): D.load_nifti(f, dtype=np.uint8)
    with pytest.raises(ValueError, match="non-integer"): D.load_nifti(f, dtype=np.int16)
    assert D.load_nifti(f, dtype=np.float64)[0].dtype == np.float64
    with pytest.raises(ValueError, match="overflow"): D.load_nifti(D.save_nifti(tmp_path / "w.nii", v * 1e3, np.eye(4)), dtype=np.float16)
    ok = D.save_nifti(tmp_path / "i.nii.gz", np.arange(64, dtype=np.int16).reshape(4, 4, 4) * 3, np.eye(4))
    got = D.load_nifti(ok, dtype=np.uint8)[0]                                  # fits: converted exactly
    assert got.dtype == np.uint8 and got.max() == 189


def test_normalize_refuses_nan_and_checks_its_options():
    v = np.random.default_rng(0).random((8, 8, 8)).astype(np.float32)
    good = D.normalize(v, "MRI")
    assert np.isfinite(good).all()
    v[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="1 of 512 voxels are NaN"): D.normalize(v, "MRI")
    with pytest.raises(ValueError, match="NaN"): D.normalize(torch.from_numpy(v), "CT")
    with pytest.raises(ValueError, match="mask"): D.normalize(good, "PET", mask=np.ones((4, 4, 4), bool))
    with pytest.raises(ValueError, match="percentiles"): D.normalize(good, "MRI", percentiles=(99, 1))


def test_resample_pair_checks_affines_and_shapes():
    v = np.ones((8, 8, 8), np.float32)
    with pytest.raises(ValueError, match="other_affine: its 3x3 part is singular"):
        D.resample_pair(v, np.eye(4), v, np.diag([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="ref_affine: expected a 4x4.*3x3 matrix holds only"):
        D.resample_pair(v, np.eye(3), v, np.eye(4))
    with pytest.raises(ValueError, match=r"other: expected one 3D volume \(D, H, W\), got shape \(8, 8\)"):
        D.resample_pair(v, np.eye(4), v[0], np.eye(4))
    lab = np.zeros((8, 8, 8), np.int64); lab[2:5] = 3                          # int64 labels resample with order 0
    shifted = np.eye(4); shifted[0, 3] = 1.0
    out = D.resample_to(lab, np.eye(4), (8, 8, 8), shifted, order=0)
    assert out.dtype == np.int64 and np.array_equal(out[1:4], lab[2:5]) and set(np.unique(out)) == {0, 3}


def test_split_file_refuses_other_sizes(trees, tmp_path):
    f = tmp_path / "split.json"
    te = D.BraTS2020(trees["brats2020"], split="test", sizes=(2, 2), split_file=f)
    assert len(te) == 2
    with pytest.raises(ValueError, match=r"sizes=\(2, 2\)") as e:
        D.BraTS2020(trees["brats2020"], split="test", sizes=(0, 4), split_file=f)
    assert str(f) in str(e.value) and "delete" in str(e.value) and "sizes=None" in str(e.value)
    assert len(D.BraTS2020(trees["brats2020"], split="test", split_file=f)) == 2       # sizes=None: the file's
    assert json.loads(f.read_text())["sizes_asked"] == [2, 2]


def test_csv_reader_accepts_excel_files(trees, tmp_path):
    root = Path(trees["csv"]).parent
    f = root / "excel.csv"
    f.write_bytes("\ufeffID, Reference , Other,TASK\r\n\r\ncase1, case1/t1.nii.gz, case1/ct.nii.gz, ct\r\n".encode("utf-8"))
    ds = D.CSVPairs(f, size=16)
    assert len(ds) == 1 and ds.items[0]["id"] == "case1" and ds[0]["task"] == "ct"
    rows = D.read_csv_rows(f)
    assert rows == [{"id": "case1", "reference": "case1/t1.nii.gz", "other": "case1/ct.nii.gz", "task": "ct", "_line": 3}]
    f.write_text("reference, other\n")
    with pytest.raises(ValueError, match="header row .* but no data lines"): D.CSVPairs(f, task="ct")
    f.write_text("")
    with pytest.raises(ValueError, match="empty"): D.CSVPairs(f, task="ct")
    f.write_text("reference;other\na;b\n")
    with pytest.raises(ValueError, match="';'"): D.CSVPairs(f, task="ct")
    f.write_bytes("reference,other\nbr\xfcche.nii,b.nii\n".encode("latin-1"))
    with pytest.raises(ValueError, match="UTF-8"): D.CSVPairs(f, task="ct")
    f.unlink()


def test_meta_tensors_are_refused_clearly(tmp_path):
    m = torch.zeros(4, 4, 4, device="meta")
    with pytest.raises(TypeError, match="vol: a meta tensor has no values"): D.save_nifti(tmp_path / "m.nii", m, np.eye(4))
    with pytest.raises(TypeError, match="meta tensor"): D.normalize(m, "MRI")
    assert not list(tmp_path.iterdir())


def test_resample_to_keeps_boundary_faces_of_oblique_grids():
    "Round-off in oblique affines puts boundary centres a hair outside the grid: they keep their values, not `cval`."
    c, s = np.cos(0.17), np.sin(0.17)
    aff = np.diag([-1.0, -1.0, 1.0, 1.0]); aff[1:3, 1:3] = [[c, -s], [s, c]]; aff[:3, 3] = [3, 4, 5]
    near = aff.copy(); near[0, 3] += 1e-7
    out = D.resample_to(np.ones((8, 8, 8), np.float32), aff, (8, 8, 8), near, cval=0.0)
    assert (out == 1).all()
    shift = aff.copy(); shift[:3, 3] += aff[:3, :3] @ np.array([4.0, 0, 0])   # four voxels along the first axis
    vol = np.arange(512, dtype=np.float32).reshape(8, 8, 8)
    out = D.resample_to(vol, aff, (8, 8, 8), shift, cval=-1.0)
    assert (out[4:] == -1).all() and np.array_equal(out[:4], vol[4:])
