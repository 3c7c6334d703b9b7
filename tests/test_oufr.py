import math

import pytest
import torch
import torch.nn.functional as F

from unifuse.config import UniFuseConfig
from unifuse.dapl import DAPL
from unifuse.oufr import OUFR, SpatialMambaLayer, l_cont, moda_loss, spatial_ssm


def test_spatial_ssm_is_eq3():
    g = torch.Generator().manual_seed(0)
    b, L, d, n = 2, 6, 4, 3
    x, delta = torch.randn(b, L, d, generator=g), F.softplus(torch.randn(b, L, d, generator=g))
    A = -torch.rand(d, n, generator=g) - 0.1
    B, C = torch.randn(b, L, n, generator=g), torch.randn(b, L, n, generator=g)
    H, D = torch.randn(b, d, n, generator=g), torch.randn(d, generator=g)
    y = spatial_ssm(x, delta, A, B, C, H, D)
    for i in range(L):  # s_i = exp(Δ_i A) ⊙ H + Δ_i B_i x_i ; y_i = C_i s_i + D x_i
        s = torch.exp(delta[:, i, :, None] * A) * H + delta[:, i, :, None] * B[:, i, None] * x[:, i, :, None]
        assert torch.allclose(y[:, i], (s * C[:, i, None]).sum(-1) + D * x[:, i], atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(spatial_ssm(x, delta, A, B, C, H, D, chunk=4), y, atol=1e-6)


def test_layer_state_injection():
    torch.manual_seed(0)
    lay = SpatialMambaLayer(8, 4, expand=1, d_h=16)
    f, h = torch.randn(1, 2 * 8, 8), torch.randn(1, 16, 4)
    assert lay.inject(h).shape == (1, 8, 4)
    y, y0 = lay(f, h, (2, 2, 2)), lay(f, None, (2, 2, 2))
    assert y.shape == f.shape and not torch.allclose(y, y0)
    f2 = f.clone()
    f2[:, :8] += 1.0  # the D grid's tokens do not reach the R grid's tokens except through h
    assert torch.allclose(lay(f2, h, (2, 2, 2))[:, 8:], y[:, 8:])
    with pytest.raises(ValueError):
        lay.inject(torch.randn(1, 16, 5))


@pytest.mark.parametrize("mode", ["spatial_mamba", "mamba", "transformer", "none"])
def test_oufr_shapes(mode):
    torch.manual_seed(0)
    cfg = UniFuseConfig.tiny(oufr=mode)
    dapl, oufr = DAPL(cfg), OUFR(cfg)
    out = dapl(torch.rand(2, 1, 16, 16, 16), torch.rand(2, 1, 16, 16, 16))
    fd, fr = oufr(out["feat_d_hat"], out["feat_r"], out["states"])
    n = (16 // cfg.patch) ** 3
    assert fd.shape == (2, n, cfg.embed_dim) and fr.shape == (2, n, cfg.embed_dim)
    fd0, _ = oufr(out["feat_d_hat"], out["feat_r"], None)
    assert torch.allclose(fd0, fd) == (mode != "spatial_mamba")
    with pytest.raises(ValueError, match="same shape"):
        oufr(out["feat_d_hat"], out["feat_r"][..., :8], out["states"])


def test_l_cont_exact_small_case():
    g = torch.Generator().manual_seed(1)
    F1, F2 = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    s = F.cosine_similarity(F1[:, :, None], F2[:, None], dim=-1) / 0.1  # (B, N, N)
    want = (s.logsumexp(-1) - s.diagonal(dim1=1, dim2=2)).mean()  # all N-1 others as negatives
    assert torch.allclose(l_cont(F1, F2, K=2), want, atol=1e-5)
    assert torch.allclose(l_cont(F1, F2, K=100), want, atol=1e-5)
    with pytest.raises(ValueError, match="same shape"):
        l_cont(F1, F2[:, :2])


def test_l_cont_exactly_k_negatives():
    # with identical orthogonal features every negative has similarity 0: loss = log(1 + K e^0 / e^(1/τ))
    F1 = torch.eye(16)[None].repeat(2, 1, 1)
    for K in (1, 4, 15):
        want = math.log(1 + K * math.exp(-10.0))
        assert abs(float(l_cont(F1, F1, K=K, tau=0.1)) - want) < 1e-6


def test_l_cont_rises_with_shuffling():
    g = torch.Generator().manual_seed(0)
    Fa = torch.randn(1, 256, 16, generator=g)
    vals = []
    for frac in (0.0, 0.3, 0.7, 1.0):
        k = int(frac * 256)
        idx = torch.randperm(256, generator=g)[:k]
        Fb = Fa.clone()
        Fb[:, idx] = Fa[:, idx.roll(1)] if k else Fb[:, idx]
        vals.append(float(l_cont(Fa, Fb, K=32, generator=torch.Generator().manual_seed(0))))
    assert vals == sorted(vals) and vals[0] < vals[1]


def test_moda_gradient_reaches_encoder_and_spatial_mamba():
    torch.manual_seed(0)
    cfg = UniFuseConfig.tiny()
    dapl, oufr = DAPL(cfg), OUFR(cfg)
    v = [torch.rand(1, 1, 16, 16, 16) for _ in range(4)]
    o1, o2 = dapl(v[0], v[1]), dapl(v[2], v[3])
    fdp, fr = oufr(o1["feat_d_hat"], o1["feat_r"], o1["states"])
    fd, frp = oufr(o2["feat_d_hat"], o2["feat_r"], o2["states"])
    loss = moda_loss(fdp, fr, fd, frp, K=cfg.moda_negatives, tau=cfg.moda_tau)
    assert torch.isfinite(loss)
    loss.backward()
    assert dapl.encoder.conv1.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in dapl.mamba2.parameters())
    for lay in oufr.layers:
        assert lay.x_proj.weight.grad.abs().sum() > 0
        assert lay.A_log.grad.abs().sum() > 0
        assert lay.h_map.weight.grad.abs().sum() > 0


def test_neighbours_are_the_face_neighbours_inside_the_grid():
    from unifuse.oufr import neighbours
    pos = torch.tensor([[0, 13, 26]])                                     # a corner, the centre, the far corner of 3³
    nb = neighbours(pos, (3, 3, 3), 1)
    assert nb.shape == (1, 3, 6)
    assert sorted(nb[0, 1].tolist()) == [4, 10, 12, 14, 16, 22]          # the centre's six face neighbours
    assert sorted(nb[0, 0].tolist()) == [0, 0, 0, 1, 3, 9]               # outside the grid: the token itself (ignored)
    assert neighbours(pos, (3, 3, 3), 2).shape == (1, 3, 12)


def test_l_cont_with_several_hard_negatives():
    "Hard negatives that are the positive are ignored; a hard negative as similar as the positive raises the loss."
    g = lambda: torch.Generator().manual_seed(0)
    f1 = F.normalize(torch.randn(1, 8, 4), dim=-1); f2 = f1.clone()
    none = l_cont(f1, f2, 3, 0.1, g())
    self_only = torch.arange(8)[None, :, None].expand(1, 8, 2)            # both "hard" negatives are the positive itself
    assert torch.allclose(l_cont(f1, f2, 3, 0.1, g(), hard=self_only), none)
    twin = torch.cat([f2, f2], 1)                                         # token i + 8 is a copy of the positive i
    hard = torch.stack([torch.arange(8), torch.arange(8) + 8], -1)[None]
    pos = torch.arange(8)[None]
    assert l_cont(f1, twin, 3, 0.1, g(), pos=pos, hard=hard) > l_cont(f1, twin, 3, 0.1, g(), pos=pos) + 0.3


def test_random_contrast_spreads_a_flat_volume_and_leaves_the_unpicked_alone():
    from unifuse.oufr import random_contrast
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(3, 1, 8, 8, 8); x[:, :, 2:6, 2:6, 2:6] = 0.10 + 0.04 * torch.rand(3, 1, 4, 4, 4, generator=g)   # a flat "brain"
    y = random_contrast(x, 1.0, torch.Generator().manual_seed(1))
    assert y.shape == x.shape and 0 <= float(y.min()) and float(y.max()) <= 1
    inside = lambda v: v[:, :, 2:6, 2:6, 2:6]
    assert float(inside(y).std()) > 2 * float(inside(x).std())          # ranks spread the narrow band of values
    assert torch.equal(random_contrast(x, 0.0, torch.Generator().manual_seed(1)), x)
    same = x.clone(); same[:, :, 0, 0, 0] = 0                              # ties (the background) share one value
    assert torch.unique(random_contrast(same, 1.0, torch.Generator().manual_seed(2))[0, 0][x[0, 0] == 0]).numel() == 1
