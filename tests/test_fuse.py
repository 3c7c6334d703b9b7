"Tests of unifuse.fuse: NIfTI in, fused NIfTI out on REF's grid and affine; the unifuse-fuse command, good and bad input."
import csv
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import unifuse.fuse as fz
from unifuse.data import builtin_pair, builtin_affine
from unifuse.nifti import save_nifti, resample_to, resize_grid, to_canonical
from fakes import fake_tree
from unifuse.model import UniFuse, UniFuseConfig
from unifuse.spatial import warp

S = 24                                                                     # voxels per side of the test volumes


def oblique_lps(affine_ras, n, degrees=12.0):
    "The same world grid stored in LPS voxel order, tilted `degrees` about S: (flip, tilt) to apply to a RAS array/affine."
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    tilt = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    flip = np.diag([-1.0, -1.0, 1.0, 1.0]); flip[:2, 3] = n - 1
    return tilt @ affine_ras @ flip, tilt


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    "REF: T1 in scanner units, oblique LPS; DEG: T2 on a coarser RAS grid (same world, tilted the same); two tiny models."
    d = tmp_path_factory.mktemp("fuse")
    p = builtin_pair("mri", seed=2, size=S)
    aff = builtin_affine(S)
    ref_aff, tilt = oblique_lps(aff, S)
    t1 = np.ascontiguousarray(p["ref"][0].numpy()[::-1, ::-1, :] * 1000)
    save_nifti(d / "t1.nii.gz", t1, ref_aff)
    coarse = resize_grid((S,) * 3, aff, 18)
    t2 = resample_to(p["other"][0].numpy() * 800, aff, (18,) * 3, coarse, cval=0)
    save_nifti(d / "t2.nii.gz", t2, tilt @ coarse)
    torch.manual_seed(0)
    UniFuse(UniFuseConfig.tiny()).save(d / "tiny.pt")
    UniFuse(UniFuseConfig.tiny()).save(d / "tiny_2x.pt", meta={"spacing_mm": 2 * 224 / S})
    return d


def run(argv, capsys):
    "main(argv) in this process: (exit status, stdout, stderr lines)."
    rc = fz.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, [l for l in err.splitlines() if l.strip()]


class Stub(torch.nn.Module):
    "A stand-in with UniFuse's interface: fused = ref, a constant flow (canonical voxels), fixed class probabilities."
    def __init__(self, flow=(0.0, 0.0, 0.0), probs=(0.9, 0.05, 0.05), spacing=None, flow_fn=None):
        super().__init__()
        self.cfg, self.multiple = UniFuseConfig.tiny(), 4
        self.meta = {} if spacing is None else {"spacing_mm": spacing}
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.flow, self.probs, self.flow_fn = torch.tensor(flow), torch.tensor(probs), flow_fn
    def forward(self, ref, deg):
        B, _, *size = ref.shape
        flow = self.flow.view(1, 3, 1, 1, 1).expand(B, 3, *size).clone() if self.flow_fn is None else self.flow_fn(ref)
        return dict(fused=ref.clone(), flow=flow, warped=warp(deg, flow), probs=self.probs.expand(B, -1))


# ---------------------------------------------------------------------------------------------- good input
def test_one_pair_on_refs_grid_and_affine(files, tmp_path, capsys):
    out = tmp_path / "fused.nii.gz"
    rc, stdout, err = run([files / "t1.nii.gz", files / "t2.nii.gz", "-o", out, "--task", "mri", "--checkpoint",
                           files / "tiny.pt", "--device", "cpu", "--flow", "--aligned"], capsys)
    assert rc == 0, err
    ref = nib.load(files / "t1.nii.gz")
    for name, shape in (("fused.nii.gz", (S,) * 3), ("fused_flow.nii.gz", (S, S, S, 1, 3)), ("fused_aligned.nii.gz", (S,) * 3)):
        im = nib.load(tmp_path / name)
        assert im.shape == shape, name
        assert im.get_data_dtype() == np.float32
        np.testing.assert_allclose(im.affine, ref.affine, atol=1e-5)        # oblique LPS kept exactly
        assert int(im.header["sform_code"]) == int(ref.header["sform_code"])
    f = nib.load(out).get_fdata()
    assert 0 <= f.min() and f.max() <= 1 and np.isfinite(f).all()
    assert nib.load(tmp_path / "fused_flow.nii.gz").header.get_intent()[0] == "vector"
    assert "degradation: " in stdout and "folding: " in stdout and "LPS → RAS" in stdout
    assert "the model records no training spacing" in stdout               # said, not silent


def test_voxels_land_where_they_should(files, tmp_path):
    "With fused = REF, the fused file is REF's own voxels (normalised), in REF's LPS order, on the oblique grid."
    s = fz.fuse_files(files / "t1.nii.gz", files / "t2.nii.gz", tmp_path / "f.nii.gz", "mri", model=Stub())
    ref = nib.load(files / "t1.nii.gz").get_fdata(dtype=np.float32)
    expect = fz.normalise_input(ref, "MRI-T1")[0]
    np.testing.assert_allclose(nib.load(tmp_path / "f.nii.gz").get_fdata(), expect, atol=1e-5)
    assert s["predicted"] == "motion" and s["fused_at"] == [S, S, S] and s["windows"] == 1


def test_flow_convention_in_refs_voxels(files, tmp_path):
    "+1 voxel towards R in the model's RAS frame is -1 along the LPS file's first axis; aligned = DEG(p + φ(p))."
    fz.fuse_files(files / "t1.nii.gz", files / "t1.nii.gz", tmp_path / "f.nii.gz", "mri", model=Stub(flow=(1.0, 0, 0)),
                  flow_path=True, aligned_path=True)
    flow = nib.load(tmp_path / "f_flow.nii.gz").get_fdata(dtype=np.float32)[:, :, :, 0, :]      # (X, Y, Z, 3)
    np.testing.assert_allclose(flow[..., 0], -1.0); np.testing.assert_allclose(flow[..., 1:], 0.0)
    aligned = nib.load(tmp_path / "f_aligned.nii.gz").get_fdata(dtype=np.float32)
    ref = fz.normalise_input(nib.load(files / "t1.nii.gz").get_fdata(dtype=np.float32), "MRI-T1")[0]
    np.testing.assert_allclose(aligned[1:], ref[:-1], atol=1e-5)            # sampled one voxel to the right (file axis 0 points L)
    by_hand = warp(torch.from_numpy(ref)[None, None], torch.from_numpy(np.moveaxis(flow, -1, 0))[None])[0, 0].numpy()
    np.testing.assert_allclose(aligned, by_hand, atol=1e-5)                 # the written φ reproduces the written W(DEG, φ)


def test_prealign_rigid_undoes_a_shift_and_composes_with_phi(files, tmp_path):
    """DEG = REF shifted 2 voxels along the file's third axis: the rigid step undoes it, and the written φ (rigid, then the
    network's) reproduces the written W(DEG, φ), whatever φ the network adds."""
    img = nib.load(files / "t1.nii.gz")
    save_nifti(tmp_path / "moved.nii.gz", np.roll(img.get_fdata(dtype=np.float32), 2, axis=2), img.affine)
    ref = fz.normalise_input(img.get_fdata(dtype=np.float32), "MRI-T1")[0]
    deg = np.roll(ref, 2, axis=2)                                           # what DEG is after its normalisation
    head = ref > 0.1
    for net in ((0.0, 0.0, 0.0), (0.0, 0.0, 1.0)):
        s = fz.fuse_files(files / "t1.nii.gz", tmp_path / "moved.nii.gz", tmp_path / "f.nii.gz", "mri", model=Stub(flow=net),
                          flow_path=True, aligned_path=True, prealign="rigid")
        assert s["prealign"] == "rigid" and any("pre-aligned" in n for n in s["notes"])
        flow = nib.load(tmp_path / "f_flow.nii.gz").get_fdata(dtype=np.float32)[:, :, :, 0, :]  # (X, Y, Z, 3)
        aligned = nib.load(tmp_path / "f_aligned.nii.gz").get_fdata(dtype=np.float32)
        by_hand = warp(torch.from_numpy(deg)[None, None], torch.from_numpy(np.moveaxis(flow, -1, 0))[None])[0, 0].numpy()
        np.testing.assert_allclose(aligned, by_hand, atol=1e-4)
        if net == (0.0, 0.0, 0.0):
            assert abs(float(flow[..., 2][head].mean()) - 2.0) < 0.3          # DEG(p + φ) = REF(p): φ ≈ +2 along axis 2
            assert np.abs(aligned - ref)[head].mean() < 0.3 * np.abs(deg - ref)[head].mean()
    with pytest.raises(ValueError, match="prealign"):
        fz.fuse_files(files / "t1.nii.gz", files / "t2.nii.gz", tmp_path / "g.nii.gz", "mri", model=Stub(), prealign="affine")


def test_from_canonical_inverts_to_canonical_for_volumes_and_flows():
    aff, _ = oblique_lps(builtin_affine(8), 8)
    aff = aff @ np.array([[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1.0]])   # axes permuted too
    x = np.random.default_rng(0).random((3, 6, 7, 8)).astype(np.float32)
    xc, _ = to_canonical(x, aff)
    np.testing.assert_array_equal(fz.from_canonical(xc, aff), x)
    np.testing.assert_array_equal(fz.from_canonical(fz.flow_to_canonical(x, aff), aff, vector=True), x)
    # warping commutes with the change of frame
    w_file = warp(torch.from_numpy(x[:1])[None], torch.from_numpy(x)[None])[0, 0].numpy()
    fc = fz.flow_to_canonical(x, aff)
    w_can = warp(torch.from_numpy(xc[:1])[None], torch.from_numpy(fc)[None])[0, 0].numpy()
    np.testing.assert_allclose(fz.from_canonical(w_can, aff), w_file, atol=1e-5)


def test_spacing_of_the_model_there_and_back(files, tmp_path, capsys):
    s = fz.fuse_files(files / "t1.nii.gz", files / "t2.nii.gz", tmp_path / "f.nii.gz", "mri", model=Stub(spacing=2 * 224 / S))
    assert s["fused_at"] == [S // 2] * 3 and s["model_spacing_mm"] == [2 * 224 / S] * 3
    ref = fz.normalise_input(nib.load(files / "t1.nii.gz").get_fdata(dtype=np.float32), "MRI-T1")[0]
    f = nib.load(tmp_path / "f.nii.gz").get_fdata()
    assert f.shape == ref.shape and np.corrcoef(f.ravel(), ref.ravel())[0, 1] > 0.9   # half resolution and back
    rc, out, err = run([files / "t1.nii.gz", files / "t2.nii.gz", "-o", tmp_path / "g.nii.gz", "--task", "mri",
                        "--checkpoint", files / "tiny_2x.pt", "--device", "cpu"], capsys)
    assert rc == 0 and f"fused on {S // 2}×{S // 2}×{S // 2} voxels" in out


def test_windows_blend_back_to_the_whole(files):
    ref = torch.rand(1, 1, 32, 32, 28)
    o = fz.fuse_volume(Stub(flow=(0.5, -0.25, 0)), ref, ref, window=16, overlap=0.25)
    assert o["window"] == 16 and o["windows"] > 1
    torch.testing.assert_close(o["fused"], ref, atol=1e-5, rtol=0)          # a blend of identical views is the view
    torch.testing.assert_close(o["flow"][:, 0], torch.full_like(ref[:, 0], 0.5), atol=1e-5, rtol=0)
    tiny = UniFuse.load(files / "tiny.pt")
    w, whole = fz.fuse_volume(tiny, ref, ref, window=16), fz.fuse_volume(tiny, ref, ref, window=0)
    assert w["fused"].shape == whole["fused"].shape == (1, 1, 32, 32, 28) and w["flow"].shape == (1, 3, 32, 32, 28)
    assert abs(float(w["probs"].sum()) - 1) < 1e-5 and whole["windows"] == 1


def test_windows_chosen_when_memory_is_short(files, tmp_path, capsys, monkeypatch):
    tiny = UniFuse(UniFuseConfig.tiny())
    monkeypatch.setattr(fz, "available_memory", lambda device: 2 * fz.memory_estimate(tiny, (32, 32, 32)))
    assert fz.plan_windows(tiny, (32, 32, 32), "cpu") is None and fz.plan_windows(tiny, (40, 40, 40), "cpu") == 32
    p = builtin_pair("mri", seed=3, size=40)
    save_nifti(tmp_path / "a.nii.gz", p["ref"][0].numpy(), p["affine"]); save_nifti(tmp_path / "b.nii.gz", p["other"][0].numpy(), p["affine"])
    rc, out, err = run([tmp_path / "a.nii.gz", tmp_path / "b.nii.gz", "-o", tmp_path / "f.nii.gz", "--task", "mri",
                        "--checkpoint", files / "tiny.pt", "--device", "cpu", "--window", "auto"], capsys)
    assert rc == 0 and "8 windows of 32³" in out, out
    assert nib.load(tmp_path / "f.nii.gz").shape == (40, 40, 40)


def test_warnings_for_class_and_folding(files, tmp_path, capsys):
    with pytest.warns(fz.FuseWarning, match="sees metal"):
        fz.fuse_files(files / "t1.nii.gz", files / "t2.nii.gz", tmp_path / "a.nii.gz", "mri", model=Stub(probs=(0.1, 0.8, 0.1)))
    with pytest.warns(fz.FuseWarning, match="unsure"):
        fz.fuse_files(files / "t1.nii.gz", files / "t2.nii.gz", tmp_path / "b.nii.gz", "mri", model=Stub(probs=(0.4, 0.3, 0.3)))
    fold = lambda r: torch.stack([-2 * torch.arange(r.shape[2], dtype=r.dtype).view(-1, 1, 1).expand(r.shape[2:]),
                                  torch.zeros(r.shape[2:]), torch.zeros(r.shape[2:])])[None]   # det J = 1 - 2 < 0
    with pytest.warns(fz.FuseWarning, match="folds"):
        s = fz.fuse_files(files / "t1.nii.gz", files / "t2.nii.gz", tmp_path / "c.nii.gz", "mri", model=Stub(flow_fn=fold))
    assert s["folding_percent"] > 50
    rc, out, err = run([files / "t1.nii.gz", files / "t2.nii.gz", "-o", tmp_path / "d.nii.gz", "--task", "ct",   # wrong task
                        "--checkpoint", files / "tiny.pt", "--device", "cpu", "--quiet"], capsys)
    assert rc == 0 and out == "" and all(l.startswith("unifuse-fuse: warning: ") for l in err)


def test_intensities_auto():
    hu = np.linspace(-1024, 2000, 1000).reshape(10, 10, 10)
    ct, note = fz.normalise_input(hu, "CT")
    assert "HU window" in note and ct.min() == 0 and ct.max() == 1
    np.testing.assert_allclose(fz.normalise_input(ct, "CT")[0], ct)        # a scaled CT is not windowed again
    from fakes import _hu_and_suv
    with pytest.warns(fz.FuseWarning, match="not Hounsfield units"): fz.normalise_input(_hu_and_suv(0, 32)["ct"] + 1024, "CT")
    with pytest.warns(fz.FuseWarning, match="looks like a CT"): fz.normalise_input(hu, "MRI-T2")
    with pytest.warns(fz.FuseWarning, match="clipped"): out, _ = fz.normalise_input(np.linspace(0, 3, 64).reshape(4, 4, 4), "PET", how="none")
    assert out.min() == 0 and out.max() == 1
    pet, note = fz.normalise_input(np.linspace(0, 12, 1000).reshape(10, 10, 10), "PET")
    assert "percentiles" in note and pet.min() == 0 and pet.max() == 1
    with pytest.raises(ValueError, match="how="): fz.normalise_input(hu, "CT", how="zscore")
    with pytest.raises(ValueError, match="NaN"): fz.normalise_input(np.full((4, 4, 4), np.nan), "CT")


def test_colour_pet(files, tmp_path, capsys):
    p = builtin_pair("pet", seed=4, size=16)
    save_nifti(tmp_path / "ct.nii.gz", p["ref"][0].numpy() * 1000 - 100, p["affine"])
    save_nifti(tmp_path / "pet.nii.gz", p["other"][0].numpy() * 14, p["affine"])
    torch.manual_seed(0)
    UniFuse(UniFuseConfig.tiny(colour=True)).save(tmp_path / "colour.pt")
    rc, out, err = run([tmp_path / "ct.nii.gz", tmp_path / "pet.nii.gz", "-o", tmp_path / "f.nii.gz", "--task", "pet",
                        "--colour", "inferno", "--aligned", "--checkpoint", tmp_path / "colour.pt", "--device", "cpu"], capsys)
    assert rc == 0, err
    for name in ("f.nii.gz", "f_aligned.nii.gz"):
        im = nib.load(tmp_path / name)
        assert im.shape == (16, 16, 16, 1, 3) and im.get_data_dtype() == np.float32 and im.header.get_intent()[0] == "vector"
        a = im.get_fdata()
        assert 0 <= a.min() and a.max() <= 1
    sitk = pytest.importorskip("SimpleITK")
    assert sitk.ReadImage(str(tmp_path / "f.nii.gz")).GetNumberOfComponentsPerPixel() == 3


def test_csv_batch_one_bad_row(files, tmp_path, capsys):
    csv_path = fake_tree(tmp_path / "data", "csv", n=2, size=16)
    save_nifti(tmp_path / "data" / "nan.nii.gz", np.full((16, 16, 16), np.nan, np.float32), np.eye(4), check_finite=False)
    with open(csv_path, "a") as f:
        f.write("missing,case0/t1.nii.gz,case0/nope.nii.gz,ct\n")
        f.write("nanrow,case1/t1.nii.gz,nan.nii.gz,ct\n")
    out = tmp_path / "out"
    rc, stdout, err = run(["--csv", csv_path, "--out-dir", out, "--checkpoint", files / "tiny.pt", "--device", "cpu",
                           "--flow", "--quiet"], capsys)
    assert rc == 1                                                          # some rows failed, the rest fused
    with open(out / "summary.csv") as f: rows = list(csv.DictReader(f))
    assert [(r["id"], r["status"]) for r in rows] == [("case0", "ok"), ("case1", "ok"), ("missing", "failed"), ("nanrow", "failed")]
    assert "does not exist" in rows[2]["error"] and "NaN" in rows[3]["error"]
    for i in ("case0", "case1"):
        assert nib.load(out / f"{i}_fused.nii.gz").shape == (16, 16, 16) and (out / f"{i}_flow.nii.gz").exists()
    assert not any(p.name.startswith(("missing", "nanrow")) for p in out.iterdir())
    assert sum("FAILED" in l for l in err) == 2


def test_read_pairs_excel_csv(tmp_path):
    (tmp_path / "a.nii.gz").write_bytes(b"x"); (tmp_path / "b.nii.gz").write_bytes(b"x")
    (tmp_path / "p.csv").write_bytes("\ufeffreference, other, task\na.nii.gz, b.nii.gz, mri\n".encode("utf-8"))
    (r,) = fz.read_pairs(tmp_path / "p.csv")
    assert r["error"] is None and r["task"] == "mri" and r["id"] == "row1"
    (tmp_path / "h.csv").write_text("reference,other\n")
    with pytest.raises(ValueError, match="no pairs"): fz.read_pairs(tmp_path / "h.csv")
    (tmp_path / "c.csv").write_text("t1,t2\na,b\n")
    with pytest.raises(ValueError, match="'reference'"): fz.read_pairs(tmp_path / "c.csv")


def test_python_api_summary(files, tmp_path):
    with pytest.warns(fz.FuseWarning, match="the model"):                   # random weights: not the class of the task
        s = fz.fuse_files(files / "t1.nii.gz", files / "t2.nii.gz", tmp_path / "f.nii.gz", "mri",
                          model=UniFuse.load(files / "tiny.pt"), aligned_path=tmp_path / "al.nii.gz")
    assert s["warnings"] and all("the model" in w for w in s["warnings"])
    for k in ("fused", "aligned", "predicted", "probability", "folding_percent", "spacing_mm", "notes", "warnings", "seconds"):
        assert k in s
    assert Path(s["aligned"]).exists() and s["flow"] == ""


# ---------------------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def bad(files):
    d = files / "bad"; d.mkdir(exist_ok=True)
    nib.save(nib.Nifti1Image(np.ones((S, S), np.float32), np.eye(4)), d / "flat.nii.gz")          # 2D
    nib.save(nib.Nifti1Image(np.ones((S, S, S, 3), np.float32), np.eye(4)), d / "series.nii.gz")  # 4D
    save_nifti(d / "nan.nii.gz", np.full((S, S, S), np.nan, np.float32), builtin_affine(S), check_finite=False)
    far = builtin_affine(S).copy(); far[:3, 3] += 5000
    save_nifti(d / "far.nii.gz", np.ones((S, S, S), np.float32), far)
    (d / "corrupt.pt").write_bytes(b"\x00garbage" * 10)
    (d / "truncated.pt").write_bytes((files / "tiny.pt").read_bytes()[:2000])
    (d / "not_nifti.nii.gz").write_bytes(b"plain text, not a NIfTI file")
    return d


CASES = [  # (id, REF, DEG, extra args, words the one line must hold)
    ("wrong path", "missing.nii.gz", "t2", [], ["missing.nii.gz", "no such file"]),
    ("2D image", "bad/flat.nii.gz", "t2", [], ["flat.nii.gz", "3D"]),
    ("4D image", "t1", "bad/series.nii.gz", [], ["series.nii.gz", "3D"]),
    ("NaN volume", "t1", "bad/nan.nii.gz", [], ["nan.nii.gz", "NaN"]),
    ("not a NIfTI", "t1", "bad/not_nifti.nii.gz", [], ["not_nifti.nii.gz", "NIfTI"]),
    ("no overlap", "t1", "bad/far.nii.gz", [], ["overlap", "far.nii.gz"]),
    ("missing checkpoint", "t1", "t2", ["--checkpoint", "nope.pt"], ["checkpoint", "nope.pt"]),
    ("corrupt checkpoint", "t1", "t2", ["--checkpoint", "bad/corrupt.pt"], ["corrupt.pt", "checkpoint"]),
    ("truncated checkpoint", "t1", "t2", ["--checkpoint", "bad/truncated.pt"], ["truncated.pt", "checkpoint"]),
    ("unknown task", "t1", "t2", ["--task", "xray"], ["--task", "xray", "mri"]),
    ("output not NIfTI", "t1", "t2", ["-o", "fused.txt"], ["fused.txt", ".nii.gz"]),
    ("output is REF", "t1", "t2", ["-o", "t1"], ["one of the inputs"]),
    ("bad window", "t1", "t2", ["--window", "-3"], ["--window", "voxels"]),
    ("bad overlap", "t1", "t2", ["--overlap", "1.5"], ["--overlap", "[0, 1)"]),
    ("colour for mri", "t1", "t2", ["--colour"], ["--colour", "pet"]),
    ("colour, grey model", "t1", "t2", ["--task", "pet", "--colour"], ["colour", "not trained for colour"]),
    ("bad device", "t1", "t2", ["--device", "gpu0"], ["gpu0", "cpu"]),
    ("no REF/DEG", None, None, [], ["REF and DEG"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_one_line_exit_2_nothing_written(case, files, bad, tmp_path, capsys):
    _, ref, deg, extra, words = case
    where = lambda x: files / ("t1.nii.gz" if x == "t1" else "t2.nii.gz" if x == "t2" else x)
    out = tmp_path / "fused.nii.gz"
    out.write_bytes(b"previous result")                                     # an existing -o must survive
    args = [] if ref is None else [where(ref), where(deg)]
    opts = {"-o": out, "--task": "mri", "--checkpoint": files / "tiny.pt", "--device": "cpu"}
    i = 0
    while i < len(extra):                                                   # extra args replace the defaults
        k = extra[i]
        if i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            v = extra[i + 1]; opts[k] = where(v) if k in ("-o", "--checkpoint") else v; i += 2
        else: opts[k] = None; i += 1
    argv = args + [x for k, v in opts.items() for x in ([k] if v is None else [k, v])]
    rc, stdout, err = run(argv, capsys)
    assert rc == 2, (stdout, err)
    assert len(err) == 1 and err[0].startswith("unifuse-fuse: error: "), err
    assert "Traceback" not in err[0]
    for w in words: assert w in err[0], (w, err[0])
    assert out.read_bytes() == b"previous result"
    assert not any(p.name.endswith(".tmp.nii.gz") or "_flow" in p.name for p in tmp_path.iterdir())


def test_no_shipped_weights_says_pass_checkpoint(files, tmp_path, capsys, monkeypatch):
    import unifuse.model
    monkeypatch.setattr(unifuse.model, "_weights_dir", lambda: tmp_path / "no-weights")
    rc, out, err = run([files / "t1.nii.gz", files / "t2.nii.gz", "-o", tmp_path / "f.nii.gz", "--task", "mri", "--device", "cpu"], capsys)
    assert rc == 2 and len(err) == 1 and "--checkpoint" in err[0] and not (tmp_path / "f.nii.gz").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda(files, tmp_path, capsys):
    rc, out, err = run([files / "t1.nii.gz", files / "t2.nii.gz", "-o", tmp_path / "f.nii.gz", "--task", "mri",
                        "--checkpoint", files / "tiny.pt", "--device", "cuda"], capsys)
    assert rc == 2 and len(err) == 1 and "CUDA is not available" in err[0]


def test_outputs_of_a_pair_appear_together_or_not_at_all(files, tmp_path, monkeypatch):
    out = tmp_path / "fused.nii.gz"
    out.write_bytes(b"previous result")
    calls, save = [], nib.save
    def failing_save(img, path):
        calls.append(path)
        if len(calls) == 2: raise OSError(28, "No space left on device")
        save(img, path)
    monkeypatch.setattr(fz.nib, "save", failing_save)
    with pytest.raises(OSError, match="(?i)no space left"):
        fz.fuse_files(files / "t1.nii.gz", files / "t2.nii.gz", out, "mri", model=Stub(), flow_path=True)
    assert out.read_bytes() == b"previous result" and sorted(p.name for p in tmp_path.iterdir()) == ["fused.nii.gz"]
    monkeypatch.setattr(fz.nib, "save", save)
    fz.fuse_files(files / "t1.nii.gz", files / "t2.nii.gz", out, "mri", model=Stub(), flow_path=True)
    assert nib.load(out).shape == (S, S, S) and (tmp_path / "fused_flow.nii.gz").exists()
    umask = os.umask(0); os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask                                # the umask's mode, not mkstemp's 0600


def test_real_process_exit_status(files, tmp_path):
    "The entry point as a process: one stderr line, exit status 2, no traceback."
    code = "import sys; from unifuse.fuse import main; sys.exit(main())"
    r = subprocess.run([sys.executable, "-c", code, str(files / "t1.nii.gz"), str(tmp_path / "nope.nii.gz"), "-o",
                        str(tmp_path / "f.nii.gz"), "--task", "mri", "--checkpoint", str(files / "tiny.pt")],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "nope.nii.gz" in r.stderr, r.stderr
    assert not (tmp_path / "f.nii.gz").exists()


def test_training_checkpoint_and_folding_in_slabs(files, tmp_path, capsys):
    "A training checkpoint (the save dict plus the trainer's keys) fuses like a UniFuse.save file; slabs = whole."
    m = UniFuse.load(files / "tiny.pt")
    opt = torch.optim.AdamW(m.parameters())
    torch.save({**m.checkpoint({"spacing_mm": 224 / S}), "step": 7, "optimizer": opt.state_dict()}, tmp_path / "train.pt")
    rc, out, err = run([files / "t1.nii.gz", files / "t2.nii.gz", "-o", tmp_path / "f.nii.gz", "--task", "mri",
                        "--checkpoint", tmp_path / "train.pt", "--device", "cpu"], capsys)
    assert rc == 0 and "matches the model's" in out
    from unifuse.metrics import folding_fraction
    u = torch.randn(2, 3, 9, 7, 5)
    assert abs(fz.folding(u, voxels=35) - float(folding_fraction(u).mean())) < 1e-12


def test_prealign_without_simpleitk_says_what_to_install(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "SimpleITK", None)                    # as if it were not installed
    rc, _, err = run([files / "t1.nii.gz", files / "t2.nii.gz", "-o", tmp_path / "f.nii.gz", "--task", "mri",
                      "--checkpoint", files / "tiny.pt", "--device", "cpu", "--prealign", "rigid", "--quiet"], capsys)
    assert rc == 2 and len(err) == 1 and "unifuse[data]" in err[0] and "SimpleITK" in err[0]
    assert not (tmp_path / "f.nii.gz").exists()


@pytest.mark.parametrize("units", ["HU + 1024", "0…8", "×1000"])
def test_ct_not_in_hounsfield_units_is_mapped_to_hu_not_windowed_as_hu(units):
    "A CT stored without its rescale intercept, or in another linear unit, ends where the same CT in HU ends (auto)."
    from fakes import _hu_and_suv
    hu = _hu_and_suv(0, 48)["ct"]                                         # air −1024, brain ≈ 30 HU, bone to 900
    stored = {"HU + 1024": hu + 1024, "0…8": (hu + 1024) / 240, "×1000": (hu + 1024) * 1000}[units]
    want, _ = fz.normalise_input(hu, "CT")
    with pytest.warns(fz.FuseWarning, match="not Hounsfield units"):
        got, note = fz.normalise_input(stored, "CT", name="DEG ct.nii.gz")
    assert "mapped linearly to HU" in note and fz.ct_units(stored)["kind"] == "calibrated"
    assert np.abs(got - want).mean() < 0.01                               # windowed as HU it would be all 0 or all 1
    windowed_as_hu, _ = fz.normalise_input(stored, "CT", "hu")
    assert np.abs(windowed_as_hu - want).mean() > 10 * np.abs(got - want).mean()


def test_ct_in_hu_stays_hu_with_air_or_cropped_without_it():
    from fakes import _hu_and_suv
    hu = _hu_and_suv(0, 48)["ct"]
    inside = hu[16:32, 16:32, 16:32]                                      # no air: soft tissue decides
    assert fz.ct_units(hu)["kind"] == fz.ct_units(inside)["kind"] == "hu"
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                     # and no warning
        assert "HU window" in fz.normalise_input(inside, "CT")[1]


def test_ct_of_unknown_units_without_air_falls_back_to_percentiles():
    from fakes import _hu_and_suv
    inside = _hu_and_suv(0, 48)["ct"][16:32, 16:32, 16:32] + 1024        # no air and not HU: nothing anchors a scale
    with pytest.warns(fz.FuseWarning, match="cannot be mapped"):
        out, note = fz.normalise_input(inside, "CT")
    assert "percentiles" in note and out.min() >= 0 and out.max() <= 1
