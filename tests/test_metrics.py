"Tests of unifuse.metrics against numpy, scikit-image and a transcription of the VIF/VIFF reference code."
import math
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.signal import correlate2d
from skimage.metrics import structural_similarity as sk_ssim, peak_signal_noise_ratio as sk_psnr

from unifuse import metrics as M


def smooth(shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 1, *shape, generator=g)
    k = tuple(3 if n > 1 else 1 for n in shape)
    for _ in range(3): x = F.avg_pool3d(x, k, 1, tuple(i // 2 for i in k), count_include_pad=False)
    return ((x - x.min()) / (x.max() - x.min()))[0, 0]


@pytest.fixture(scope="module")
def abf():
    a, b = smooth((24, 24, 24), 0), smooth((24, 24, 24), 1)
    f = (0.6 * a + 0.4 * b + 0.02 * torch.randn(a.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    return a, b, f


def np_corr(x, y): return np.corrcoef(np.ravel(x), np.ravel(y))[0, 1]


def test_mse_cc_psnr_match_numpy(abf):
    a, b, f = abf
    A, B, Fn = (t.double().numpy() for t in abf)
    mse = (((A - Fn) ** 2).mean() + ((B - Fn) ** 2).mean()) / 2
    assert math.isclose(M.q_mse(a, b, f), mse, rel_tol=1e-12)
    assert math.isclose(M.q_cc(a, b, f), (np_corr(A, Fn) + np_corr(B, Fn)) / 2, rel_tol=1e-12)
    assert math.isclose(M.q_psnr(a, b, f), 10 * np.log10(1 / mse), rel_tol=1e-12)
    assert math.isclose(M.q_psnr(a, a, f), sk_psnr(A, Fn, data_range=1), rel_tol=1e-10)
    assert M.q_psnr(a, a, a) == math.inf


def test_scd_worked_cases(abf):
    a, b, f = abf
    A, B, Fn = (t.double().numpy() for t in abf)
    assert math.isclose(M.q_scd(a, b, f), np_corr(Fn - B, A) + np_corr(Fn - A, B), rel_tol=1e-12)
    with pytest.warns(UserWarning, match="fused has values well outside"):   # a + b reaches 2: scored, with a warning
        assert math.isclose(M.q_scd(a, b, a + b), 2.0, rel_tol=1e-12)       # F - B = A and F - A = B
    assert math.isclose(M.q_scd(a, b, a), np_corr(A - B, A), rel_tol=1e-12)  # F - A constant: r = 0
    # signed, not absolute: F = b - a gives F - b = -a, a correlation of -1 (absolute values would give +1)
    with pytest.warns(UserWarning, match="outside"):
        assert math.isclose(M.q_scd(a, b, b - a), -1 + np_corr(B - 2 * A, B), rel_tol=1e-9)


def test_ssim_matches_skimage_3d_and_slicewise(abf):
    a, b, f = abf
    A, B, Fn = (t.double().numpy() for t in abf)
    kw = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)
    assert math.isclose(M.q_ssim(a, b, f), sk_ssim(A, Fn, **kw) + sk_ssim(B, Fn, **kw), rel_tol=1e-9)
    sl = lambda X: np.mean([sk_ssim(X[k], Fn[k], **kw) for k in range(X.shape[0])])
    assert math.isclose(M.q_ssim(a, b, f, slicewise=True), sl(A) + sl(B), rel_tol=1e-9)
    assert math.isclose(M.ssim(a, a), 1.0, rel_tol=1e-12)


# --- a direct transcription of vifp_mscale.m / VIFF_Public.m (2D, 0-255) -------------------------
def _ref_stats(ref, dist):
    out = []
    for scale in range(1, 5):
        N = 2 ** (4 - scale + 1) + 1; sd = N / 5
        x = np.arange(N) - (N - 1) / 2
        win = np.exp(-(x[:, None] ** 2 + x[None] ** 2) / (2 * sd * sd)); win /= win.sum()
        f2 = lambda im: correlate2d(im, win, mode="valid")
        if scale > 1: ref, dist = f2(ref)[::2, ::2], f2(dist)[::2, ::2]
        mu1, mu2 = f2(ref), f2(dist)
        s1 = np.maximum(f2(ref * ref) - mu1 ** 2, 0); s2 = np.maximum(f2(dist * dist) - mu2 ** 2, 0)
        out.append((s1, s2, f2(ref * dist) - mu1 * mu2))
    return out


def _ref_maps(s1, s2, s12, nsq):
    s1, s2 = s1.copy(), s2.copy()
    g = s12 / (s1 + 1e-10); sv = s2 - g * s12
    m = s1 < 1e-10; g[m] = 0; sv[m] = s2[m]; s1[m] = 0
    m = s2 < 1e-10; g[m] = 0; sv[m] = 0
    m = g < 0; sv[m] = s2[m]; g[m] = 0
    sv[sv <= 1e-10] = 1e-10
    return np.log10(1 + g ** 2 * s1 / (sv + nsq)), np.log10(1 + s1 / nsq), g


def ref_vifp(ref, dist):
    num = den = 0.
    for s in _ref_stats(ref, dist):
        n, d, _ = _ref_maps(*s, 2.0); num += n.sum(); den += d.sum()
    return num / den


def ref_viff(i1, i2, fu):
    p = np.array([1, 0, 0.15, 1]) / 2.15; out = []
    for s1, s2 in zip(_ref_stats(i1, fu), _ref_stats(i2, fu)):
        z1, m1, g1 = _ref_maps(*s1, 0.005 * 255 ** 2); z2, m2, g2 = _ref_maps(*s2, 0.005 * 255 ** 2)
        L = g1 < g2
        out.append((np.where(L, z1, z2) + 1e-7).sum() / (np.where(L, m1, m2) + 1e-7).sum())
    return float((np.array(out) * p).sum())


def test_vif_and_viff_match_reference_code():
    a, b = smooth((1, 80, 80), 3), smooth((1, 80, 80), 4)
    f = (0.5 * a + 0.5 * b ** 2 + 0.03 * torch.randn(a.shape, generator=torch.Generator().manual_seed(5))).clamp(0, 1)
    A, B, Fn = (t[0].double().numpy() * 255 for t in (a, b, f))
    assert math.isclose(M.q_vif(a, b, f, slicewise=True), ref_vifp(A, Fn) + ref_vifp(B, Fn), rel_tol=1e-9)
    assert math.isclose(M.q_viff(a, b, f, slicewise=True), ref_viff(A, B, Fn), rel_tol=1e-9)
    assert math.isclose(M.vif(a, a, slicewise=True), 1.0, rel_tol=1e-9)


def test_vif_3d_properties():
    a = smooth((44, 44, 44), 6)
    assert math.isclose(M.vif(a, a), 1.0, rel_tol=1e-9)
    noisy = (a + 0.05 * torch.randn(a.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert M.vif(a, noisy) < 0.9
    with pytest.warns(UserWarning, match="VIF scales"):
        M.q_vif(a[:32, :32, :32], a[:32, :32, :32], a[:32, :32, :32])
    with pytest.raises(ValueError, match="17 voxels"):
        M.q_vif(a[:10], a[:10], a[:10])


def test_batch_matches_single_and_types(abf):
    a, b, f = abf
    batch = [torch.stack([x, y])[:, None] for x, y in ((a, b), (b, a), (f, a))]
    for name, (fn, _) in M.METRICS.items():
        if name in ("Q_vif", "Q_viff"): continue  # too small a volume for them to be meaningful here
        r = fn(*batch)
        assert isinstance(r, torch.Tensor) and r.shape == (2,) and r.dtype == torch.float64, name
        single = fn(b, a, a)
        assert isinstance(single, float)
        assert math.isclose(float(r[1]), single, rel_tol=1e-9, abs_tol=1e-12), name
    assert isinstance(M.q_mse(a.numpy(), b.numpy(), f.numpy()), float)        # numpy in, float out
    assert isinstance(M.q_mse(a[None], b[None], f[None]), float)              # (1, D, H, W) is one volume


def test_fusion_metrics_agrees_with_each_function():
    a, b = smooth((44, 44, 44), 7), smooth((44, 44, 44), 8)
    f = (a + b) / 2
    fm = M.fusion_metrics(a, b, f)
    assert set(fm) == set(M.METRICS)
    for name, (fn, _) in M.METRICS.items():
        assert math.isclose(fm[name], fn(a, b, f), rel_tol=1e-12), name


def test_bad_inputs_are_refused(abf):
    a, b, f = abf
    with pytest.raises(ValueError, match="shapes differ"): M.q_mse(a, b, f[:-1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"): M.q_cc(a * 255, b, f)
    with pytest.raises(ValueError, match="NaN"): M.q_ssim(a, b, f * float("nan"))
    with pytest.raises(ValueError, match="shape"): M.q_mse(a[0], b[0], f[0])
    with pytest.raises(TypeError, match="torch.Tensor or numpy"): M.q_mse(a.tolist(), b, f)


def test_dice_folding_and_label_warping():
    lab = torch.zeros(20, 20, 20, dtype=torch.long); lab[2:12, 2:12, 2:12] = 1; lab[10:18, 5:15, 5:15] = 2
    d = M.dice(torch.roll(lab, 1, 0), lab)
    s, t = torch.roll(lab, 1, 0) == 1, lab == 1
    assert math.isclose(d[1], 2 * (s & t).sum().item() / (s.sum() + t.sum()).item(), rel_tol=1e-12)
    assert M.dice(lab, lab)["mean"] == 1.0
    assert math.isnan(M.dice(lab, lab, labels=[1, 5])[5])                     # absent label: NaN, not in mean
    assert M.dice(lab, lab, labels=[1, 5])["mean"] == 1.0
    z = torch.zeros(3, 20, 20, 20)
    assert torch.equal(M.warp_labels(lab, z), lab)
    shift = z.clone(); shift[0] = 1.0                                          # pull from one voxel further in D
    assert torch.equal(M.warp_labels(lab, shift)[:-1], lab[1:])
    grid = torch.stack(torch.meshgrid(*[torch.arange(20.)] * 3, indexing="ij"))
    assert M.folding_fraction(z) == 0.0 and M.folding_fraction(-2 * grid) == 1.0
    fb = M.folding_fraction(torch.stack([z, -2 * grid]))
    assert fb.shape == (2,) and fb.tolist() == [0.0, 1.0]


def test_invert_flow_round_trip():
    from unifuse.spatial import compose
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, 24)] * 3, indexing="ij"))
    u = 1.5 * torch.sin(torch.pi * grid[[1, 2, 0]])[None]
    assert compose(u, M.invert_flow(u)).abs().max() < 0.05
    assert compose(u, torch.zeros_like(u) - u).abs().max() > 0.1             # the naive negation is not the inverse


def test_alignment_metrics(abf):
    a, b, _ = abf
    am = M.alignment_metrics(a, a)
    assert am["mse"] == 0 and math.isclose(am["cc"], 1, rel_tol=1e-12) and math.isclose(am["ssim"], 1, rel_tol=1e-12)
    am2 = M.alignment_metrics(torch.roll(a, 2, 0), a)
    assert am2["mse"] > 0 and am2["cc"] < 1 and am2["ssim"] < 1


def test_flops_and_params():
    net = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 1, 1))
    x = torch.rand(1, 2, 8, 8, 8)
    assert M.count_flops(net, x) == 2 * 8 ** 3 * (4 * 2 * 27 + 4)
    assert M.count_params(net) == 4 * 2 * 27 + 4 + 4 + 1
    by = M.flops_by_module(net, x)
    assert by["Global"] == M.count_flops(net, x)


# ---------------------------------------------------------------- issue 14 and colour (issue 10)

def test_rgb_volumes_are_scored_on_luma(abf):
    from unifuse.colour import colourise, luma
    a, b, f = abf
    rgb = colourise(f[None, None].float())                                      # (1, 3, D, H, W) colour fused volume
    y = luma(rgb.double())                                                       # its Y channel
    for name, (fn, _) in M.METRICS.items():
        if name in ("Q_vif", "Q_viff"): continue                                 # too small for them here
        got, want = fn(a[None, None], b[None, None], rgb), fn(a[None, None], b[None, None], y)
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12), name
    assert not torch.allclose(M.q_mse(a[None, None], b[None, None], rgb), M.q_mse(a[None, None], b[None, None], rgb[:, :1]))
    with pytest.raises(ValueError, match=r"x\[None\]"): M.q_mse(a, b, rgb[0])     # (3, D, H, W): add the batch axis


def test_out_of_range_warns_once_per_place(abf):
    import warnings
    a, b, f = abf
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("default")
        for _ in range(3): M.q_psnr(a, b, f * 1.5)                               # one place in the code, three calls
    msgs = [str(x.message) for x in w if "outside [0, 1]" in str(x.message)]
    assert len(msgs) == 1 and msgs[0].startswith("fused ") and "Q_psnr" in msgs[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        M.q_psnr(a, b, f * 1.05)                                                 # slight excursions: no warning
    g = f.clone(); g[1, 2, 3] = float("nan"); g[3, 2, 1] = float("inf")
    with pytest.raises(ValueError, match="fused contains 1 NaN and 1 infinite"): M.q_mse(a, b, g)


def test_folding_fraction_of_a_diverged_flow_is_nan():
    z = torch.zeros(2, 3, 8, 8, 8)
    z[1, 0, 3, 3, 3] = float("nan")
    ff = M.folding_fraction(z)
    assert ff[0] == 0.0 and math.isnan(ff[1])
    assert math.isnan(M.folding_fraction(torch.full((3, 8, 8, 8), float("inf"))))
    with pytest.raises(ValueError, match="NaN or infinite"): M.warp_labels(torch.zeros(8, 8, 8, dtype=torch.long), z[1])


def test_warp_labels_memory_follows_the_labels_present(monkeypatch):
    lab = torch.zeros(20, 20, 20, dtype=torch.long); lab[2:12, 2:12, 2:12] = 1; lab[10:18, 5:15, 5:15] = 2
    flow = torch.zeros(3, 20, 20, 20); flow[1] = 0.6; flow[0] = -1.3
    small = M.warp_labels(lab, flow)
    seen = []
    real = M.warp
    monkeypatch.setattr(M, "warp", lambda x, u: seen.append(x.shape[1]) or real(x, u))
    big = M.warp_labels(torch.where(lab == 2, 2035, lab), flow)                 # FreeSurfer-sized values
    assert torch.equal(big, torch.where(small == 2, 2035, small))
    assert seen == [3]                                                           # three labels present: 3 channels, not 2036
    seen.clear()
    many = (torch.arange(20 ** 3) % 20).reshape(20, 20, 20)                     # 20 labels, in chunks of 8
    out = M.warp_labels(many, flow, chunk=8)
    assert seen == [8, 8, 4] and torch.equal(M.warp_labels(many, flow, chunk=20), out)
    # the result is the old one-hot argmax over every value up to the largest
    oh = F.one_hot(many, 20).movedim(-1, 0)[None].float()
    assert torch.equal(out, real(oh, flow[None]).argmax(1)[0])
