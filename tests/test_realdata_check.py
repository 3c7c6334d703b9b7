"""scripts/realdata_check.py: the scoring of fused files against the clean sources, and its stand-in pairs."""
import importlib.util, pathlib
import numpy as np, nibabel as nib, torch
from unifuse.model import UniFuse, UniFuseConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("realdata_check", ROOT / "scripts" / "realdata_check.py")
rc = importlib.util.module_from_spec(spec); spec.loader.exec_module(rc)


def test_scores_fit_intensities_linearly_and_count_wins():
    g = np.random.default_rng(0)
    a = g.random((12, 12, 12)).astype(np.float32); b = g.random((12, 12, 12)).astype(np.float32)
    same = rc.scores(3 * a + 1, [a, a])                                      # a linear map of the source: perfect after the fit
    assert same["mse"] < 1e-10 and same["cc"] > 0.9999 and same["ssim"] > 0.9999
    half = rc.scores((a + b) / 2, [a, b])
    assert 0 < half["mse"] and half["cc"] < 1 and half["ssim"] < 1
    assert rc.wins(same, half) == 3 and rc.wins(half, same) == 0 and rc.wins(half, half) == 0


def test_standins_and_one_check(tmp_path):
    pairs = rc.make_standins(tmp_path, sizes=(24, 16))
    assert [p[0] for p in pairs] == ["mri", "ct", "pet"]
    task, ref, deg, cr, co = pairs[0]
    r, d = nib.load(ref), nib.load(deg)
    assert r.shape == (24, 24, 24) and np.allclose(r.affine, d.affine) and abs(r.affine[0, 1]) > 0.1   # oblique, one grid
    assert np.abs(np.asarray(nib.load(pairs[1][3]).dataobj)).max() > 500                           # the CT in HU
    torch.manual_seed(0)
    UniFuse(UniFuseConfig.tiny()).save(tmp_path / "tiny.pt")
    res = rc.check_pair(ref, deg, cr, co, task, tmp_path / "fused", tmp_path / "tiny.pt", log=lambda *_: None)
    assert set(res["scores"]) == {"UniFuse", "TV + rigid + average", "average"} and res["rival"] == "TV + rigid + average"
    assert all(np.isfinite(v).all() for s in res["scores"].values() for v in s.values())
    assert res["passed"] == (res["wins"] >= 2)
