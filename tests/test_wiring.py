"""How `UniFuse.forward` and `UniFuse.loss` connect the parts.

The parts are tested one by one elsewhere; these tests fail on one-line wiring mistakes that every
per-module test passes: L_moda pairing the misaligned features, the fusion target built from the
degraded volume, L_reg against −φ_gt, `warped` warped by −φ, UFR&F fed unwarped features, L_grad against
the mean of the source gradients. FA's head starts at zero (φ = 0), which hides most such mistakes, so
a known non-zero φ is forced through FA's output here.
"""
import math
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import unifuse.model as model_mod
from unifuse.model import UniFuse, UniFuseConfig
from unifuse.dapl import to_volume
from unifuse.degrade import make_batch
from unifuse.oufr import l_cont
from unifuse.spatial import warp, resize_flow
from unifuse.ufrf import fusion_losses, ssim3d

S = 16                                                                       # a multiple of tiny's `multiple`: no padding


def _volumes(B, size=S, seed=0):
    "Smooth random volumes in [0, 1]."
    g = torch.Generator().manual_seed(seed)
    x = F.avg_pool3d(torch.rand(2 * B, 1, size, size, size, generator=g), 5, stride=1, padding=2, count_include_pad=False)
    x = (x - x.amin()) / (x.amax() - x.amin())
    return x[:B], x[B:]


def _batch(B=2, seed=0, **kw):
    ref, other = _volumes(B, seed=seed)
    return make_batch(ref, other, (["mri", "ct", "pet"] * B)[:B], generator=seed, **kw)


def _force_flow(model, flow):
    "Make FA return `flow` (and its 1/Q version) whatever its input: a known, non-zero φ."
    q = model.cfg.patch
    coarse = resize_flow(flow, tuple(s // q for s in flow.shape[2:]))
    return model.fa.register_forward_hook(lambda mod, args, out: (flow, coarse) if isinstance(out, tuple) else flow)


def test_forced_flow_is_nonzero_and_used(tiny):
    b = _batch()
    assert tiny.multiple and S % tiny.multiple == 0
    assert float(b["flow"].abs().mean()) > 0.3                              # a real misalignment, in voxels
    h = _force_flow(tiny, b["flow"])
    try: out = tiny(b["ref"], b["deg"])
    finally: h.remove()
    assert torch.equal(out["flow"], b["flow"])


def test_reg_loss_is_zero_at_the_true_flow(tiny):
    "L_reg compares φ with +φ_gt: zero when FA predicts φ_gt, large when it predicts −φ_gt."
    b = _batch()
    for flow, zero in ((b["flow"], True), (-b["flow"], False)):
        h = _force_flow(tiny, flow)
        try: L = tiny.loss(b, generator=torch.Generator().manual_seed(0))
        finally: h.remove()
        assert (float(L["reg"]) < 1e-10) == zero, (float(L["reg"]), zero)


def test_warped_is_deg_warped_by_the_flow(tiny):
    b = _batch()
    h = _force_flow(tiny, b["flow"])
    try: out = tiny(b["ref"], b["deg"])
    finally: h.remove()
    torch.testing.assert_close(out["warped"], warp(b["deg"], b["flow"]))
    assert not torch.allclose(out["warped"], warp(b["deg"], -b["flow"]), atol=1e-3)


def test_fusion_target_is_the_clean_label_warped(tiny, monkeypatch):
    "Eq. 11–12 compare I_fuse with W(I'_fine, φ) (not W(I'_D, φ), not I'_fine) and with I_R."
    b = _batch()
    seen = {}
    def spy(fused, target_d, ref):
        seen.update(fused=fused, target_d=target_d, ref=ref)
        return fusion_losses(fused, target_d, ref)
    monkeypatch.setattr(model_mod, "fusion_losses", spy)
    h = _force_flow(tiny, b["flow"])
    try: tiny.loss(b)
    finally: h.remove()
    torch.testing.assert_close(seen["target_d"], warp(b["deg_fine"], b["flow"]))
    assert not torch.allclose(seen["target_d"], warp(b["deg"], b["flow"]), atol=1e-3)
    torch.testing.assert_close(seen["ref"], b["ref"])


def test_ufrf_receives_warped_features(tiny):
    "UFR&F gets W(F'_D, φ), F_R at full resolution and W(F̄'_D, φ↓), F̄_R at 1/Q (Fig. 2)."
    b = _batch()
    got = {}
    hooks = [tiny.dapl.register_forward_hook(lambda m, a, o: got.update(dapl=o)),
             tiny.oufr.register_forward_hook(lambda m, a, o: got.update(oufr=o)),
             tiny.ufrf.register_forward_pre_hook(lambda m, a: got.update(ufrf=a)),
             _force_flow(tiny, b["flow"])]
    try:
        with torch.no_grad(): tiny(b["ref"], b["deg"])
    finally:
        for h in hooks: h.remove()
    q = tiny.cfg.patch
    grid = (S // q,) * 3
    flow_c = resize_flow(b["flow"], grid)
    full_d, full_r, coarse_d, coarse_r = got["ufrf"][:4]
    torch.testing.assert_close(full_d, warp(got["dapl"]["feat_d"], b["flow"]))
    torch.testing.assert_close(full_r, got["dapl"]["feat_r"])
    torch.testing.assert_close(coarse_d, warp(to_volume(got["oufr"][0], grid), flow_c))
    torch.testing.assert_close(coarse_r, to_volume(got["oufr"][1], grid))
    assert not torch.allclose(full_d, got["dapl"]["feat_d"], atol=1e-4)     # the warp did something


def test_moda_pairs_the_aligned_features(monkeypatch):
    "Literal reading (moda_pairs='grid'): L_moda = L_cont(F̄_D, F̄_R) + L_cont(F̄'_D, F̄'_R) from mutually aligned volumes."
    torch.manual_seed(0)
    tiny = UniFuse(UniFuseConfig.tiny(moda_pairs="grid")).eval()
    b = _batch()
    seen = {}
    real = model_mod.moda_loss
    monkeypatch.setattr(model_mod, "moda_loss", lambda *a, **k: (seen.update(args=a), real(*a, **k))[1])
    with torch.no_grad():
        tiny.loss(b)
        d1 = tiny.dapl(b["deg"], b["ref"]); fdp, fr = tiny.oufr(d1["feat_d_hat"], d1["feat_r"], d1["states"])   # F̄'_D, F̄_R
        d2 = tiny.dapl(b["deg_label"], b["ref_moved"]); fd, frp = tiny.oufr(d2["feat_d_hat"], d2["feat_r"], d2["states"])  # F̄_D, F̄'_R
    for got, want in zip(seen["args"], (fdp, fr, fd, frp)): torch.testing.assert_close(got, want)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    torch.testing.assert_close(real(fdp, fr, fd, frp, K=32, generator=g1),
                               l_cont(fd, fr, 32, generator=g2) + l_cont(fdp, frp, 32, generator=g2))


def test_shifted_moda_pairs_the_same_anatomy(monkeypatch):
    "Default reading: two aligned pairs, cut into crops; with no shift and no border it is the literal L_moda on the crops."
    torch.manual_seed(0)
    m = UniFuse(UniFuseConfig.tiny(moda_shift=0, moda_border=0)).eval()
    b = _batch()
    with torch.no_grad():
        got = m.moda_shifted(b, torch.Generator().manual_seed(5))
        d = m.dapl(torch.cat([b["deg_label"], b["deg"]]), torch.cat([b["ref"], b["ref_moved"]]), update=False)
        fd, fr = m.oufr(d["feat_d_hat"], d["feat_r"], d["states"])         # [F̄_D; F̄'_D], [F̄_R; F̄'_R]
        g = torch.Generator().manual_seed(5); torch.randint(2 ** 62, (1,), generator=g)   # the seed moda_shifted draws first
        B = b["ref"].shape[0]
        want = l_cont(fd[:B], fr[:B], m.cfg.moda_negatives, m.cfg.moda_tau, g) + l_cont(fd[B:], fr[B:], m.cfg.moda_negatives, m.cfg.moda_tau, g)
    torch.testing.assert_close(got, want)
    # with shifts, the positives are the same anatomical point: a code of the grid cell no longer scores
    m2 = UniFuse(UniFuseConfig.tiny(moda_shift=2)).eval()
    from unifuse.data import builtin_pair
    ps = [builtin_pair(t, seed=0, size=32) for t in ("mri", "ct")]           # 8³ tokens: 6³ per crop, 4³ anchors
    b = make_batch(torch.stack([p["ref"] for p in ps]), torch.stack([p["other"] for p in ps]), ["mri", "ct"], generator=0)
    seen = {}
    real = model_mod.l_cont
    monkeypatch.setattr(model_mod, "l_cont", lambda *a, **k: (seen.setdefault("calls", []).append(a), real(*a, **k))[1])
    with torch.no_grad(): m2.moda_shifted(b, torch.Generator().manual_seed(1))
    F1, F2, K, tau, g, pos, mask, hard = seen["calls"][0]
    assert not torch.equal(pos[mask], hard[mask]) and bool(mask.any())


def test_moda_is_lower_for_the_aligned_pairing():
    """Trained briefly on its own L_moda, the model makes aligned pairs agree far better than swapped, misaligned ones.

    Setting A of Table 4 (no DAPL support to OUFR) keeps each token set a function of its own volume; in the
    full model F̂'_D = F'_D + J_DR also carries the reference of its pair, so a swapped pairing shares it too."""
    from unifuse.data import builtin_pair
    from unifuse.degrade import DEFAULT_RANGES
    torch.manual_seed(0)
    weights = {k: 0.0 for k in ("ce", "reg", "ssim", "inten", "grad", "crcb")}
    model = UniFuse(UniFuseConfig.tiny(dapl="A", moda_pairs="grid", loss_weights=weights))   # literal L_moda alone
    ps = [builtin_pair("mri", seed=s, size=24) for s in (0, 1)]             # T1 / T2 of two heads
    b = make_batch(torch.stack([p["ref"] for p in ps]), torch.stack([p["other"] for p in ps]), "mri", generator=4,
                   strength=0.0, ranges=DEFAULT_RANGES.replace(translation=0.15, rotation_deg=20.0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for i in range(10):
        L = model.loss(b, generator=torch.Generator().manual_seed(i))
        opt.zero_grad(); L["total"].backward(); opt.step()
    model.eval()
    with torch.no_grad():
        d1 = model.dapl(b["deg"], b["ref"]); fdp, fr = model.oufr(d1["feat_d_hat"], d1["feat_r"], d1["states"])
        d2 = model.dapl(b["deg_label"], b["ref_moved"]); fd, frp = model.oufr(d2["feat_d_hat"], d2["feat_r"], d2["states"])
    g = lambda: torch.Generator().manual_seed(0)
    aligned = float(l_cont(fd, fr, 64, generator=g()) + l_cont(fdp, frp, 64, generator=g()))
    swapped = float(l_cont(fdp, fr, 64, generator=g()) + l_cont(fd, frp, 64, generator=g()))
    assert aligned < 0.7 * swapped, (aligned, swapped)


def test_grad_and_intensity_losses_take_known_values():
    "Ramps with known gradients: L_grad uses the voxel-wise max of the source gradients (Eq. 12), not their mean."
    D = H = W = 12
    d = torch.arange(D, dtype=torch.float64).view(1, 1, D, 1, 1).expand(1, 1, D, H, W)
    w = torch.arange(W, dtype=torch.float64).view(1, 1, 1, 1, W).expand(1, 1, D, H, W)
    target, ref = 0.2 + 0.02 * w, 0.1 + 0.03 * d                            # |∇| = 0.02 along W, 0.03 along D
    fused = torch.zeros(1, 1, D, H, W, dtype=torch.float64)
    L = fusion_losses(fused, target, ref)
    assert math.isclose(float(L["grad"]), (0.03 + 0.0 + 0.02) / 3, rel_tol=1e-9)     # mean would give half of it
    assert math.isclose(float(L["inten"]), float(torch.maximum(target, ref).mean()), rel_tol=1e-9)
    assert float(L["crcb"]) == 0.0


def test_ssim_loss_takes_known_values():
    "L_ssim = (1 − SSIM(I_fuse, T_D)) + (1 − SSIM(I_fuse, I_R)): 0 when all agree, one term when only T_D agrees."
    a, b = _volumes(1, seed=1)
    assert float(fusion_losses(a, a, a)["ssim"]) < 1e-6
    L = fusion_losses(a, a, b)["ssim"]
    assert math.isclose(float(L), 1 - float(ssim3d(a, b)), rel_tol=1e-6, abs_tol=1e-7)
    assert 0.2 < float(L) < 2
    inv = fusion_losses(a, 1 - a, 1 - a)["ssim"]                            # an inverted image: SSIM ≈ −1 per window
    assert float(inv) > 2.5


@pytest.mark.slow
def test_a_few_steps_learn():
    "Tens of steps at 16³ on one batch: the total loss falls and FA beats the zero flow on L_reg."
    torch.manual_seed(0)
    model = UniFuse(UniFuseConfig.tiny())
    b = _batch(B=3, seed=2)
    zero_flow_reg = float(b["flow"].pow(2).sum(1).mean())                  # L_reg of φ = 0
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    hist = []
    for _ in range(40):
        L = model.loss(b, generator=torch.Generator().manual_seed(0))
        opt.zero_grad(); L["total"].backward(); opt.step()
        hist.append({k: float(v.detach()) for k, v in L.items()})
    first, last = hist[0]["total"], sum(h["total"] for h in hist[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert hist[-1]["reg"] < 0.7 * zero_flow_reg, (hist[-1]["reg"], zero_flow_reg)
