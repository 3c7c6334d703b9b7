"Tests of unifuse.fa: windowed cross-attention, RegBLK, FA, L_reg."
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from unifuse.config import UniFuseConfig
from unifuse.fa import (FA, RegBLK, window_cross_attention, neighbourhood_attention, reg_loss, max_level, mind, mind_prior,
                        token_patches, cost_volume, offsets, affine_fit, mind_affine_prior, match_score, prior_confidence)
from unifuse.spatial import warp, affine_flow, rotation_matrix, resize_flow


def _inputs(cfg, grid=(8, 8, 8), B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    M = cfg.embed_dim
    fd, fr = torch.randn(B, M, *grid, generator=g), torch.randn(B, M, *grid, generator=g)
    prompt = torch.randn(B, cfg.n_classes, cfg.prompt_len, M, generator=g)
    return fd, fr, prompt


def _images(cfg, grid=(8, 8, 8), B=2, seed=1):
    "I_R, I'_D on the grid the features of `_inputs` stand for (×Q), for FA's prior."
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.rand(B, 1, *(s * cfg.patch for s in grid), generator=g) for _ in range(2))


@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("dim,shift", [(2, 1), (3, -1), (4, 1)])
def test_attention_measures_a_known_shift(dim, shift, cosine):
    g = torch.Generator().manual_seed(1)
    fr = torch.randn(1, 64, 8, 8, 8, generator=g)          # 64 random channels: distinctive tokens
    fd = torch.roll(fr, shifts=shift, dims=dim)            # D content found `shift` voxels further along `dim`
    _, disp = window_cross_attention(fr, fd, fd, heads=1, window=4, scale=torch.tensor([30.0]) if cosine else None)
    d = disp[0, 0]                                          # (3, d, h, w)
    # a token whose match stays inside its window sees the exact displacement
    idx = torch.arange(8) % 4
    ok = (idx + shift >= 0) & (idx + shift < 4)
    sl = [slice(None)] * 3
    sl[dim - 2] = ok
    axis = dim - 2
    assert torch.allclose(d[axis][tuple(sl)].median(), torch.tensor(float(shift)), atol=0.1)
    others = [a for a in range(3) if a != axis]
    assert d[others][(slice(None), *sl)].abs().median() < 0.1


def test_attention_any_grid_and_mask():
    q, k, v = torch.randn(3, 2, 12, 5, 7, 9).unbind(0)
    out, disp = window_cross_attention(q, k, v, heads=2, window=4, shift=True)
    assert out.shape == q.shape and disp.shape == (2, 2, 3, 5, 7, 9)
    assert torch.isfinite(out).all() and torch.isfinite(disp).all()
    # the expected position of a match never leaves the window (masked padding is never attended)
    assert disp.abs().max() <= 3 + 1e-4


@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("shift", [(0, 1, -2), (1, 0, 0), (-2, 1, 1)])
def test_neighbourhood_attention_measures_a_known_shift(shift, cosine):
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(2, 1, 32, 9, 10, 11, generator=g).unbind(0)
    q = torch.roll(k, shifts=tuple(-s for s in shift), dims=(2, 3, 4))   # R(p) = D(p + shift): the match sits at +shift
    _, disp = neighbourhood_attention(q * (1 if cosine else 8), k, v, heads=2, radius=2,
                                      scale=torch.tensor([30.0, 30.0]) if cosine else None)
    inner = tuple(slice(2, -2) for _ in range(3))                        # away from the rolled-over faces
    d = disp[(0, slice(None), slice(None), *inner)]                      # (heads, 3, ...)
    assert torch.allclose(d.median(-1).values.median(-1).values.median(-1).values, torch.tensor([shift] * 2).float(), atol=0.05)


def test_neighbourhood_attention_uniform_is_zero_and_slabs_agree():
    q, k, v = torch.randn(3, 2, 8, 7, 6, 5).unbind(0)
    _, d0 = neighbourhood_attention(torch.zeros_like(q), k, v, heads=2, radius=2)
    assert d0.abs().max() < 1e-6                                         # uniform attention: no displacement, borders too
    o1, d1 = neighbourhood_attention(q, k, v, heads=2, radius=1)
    with torch.no_grad(): o2, d2 = neighbourhood_attention(q, k, v, heads=2, radius=1, slab=2 * 8 * 6 * 5 * 27)
    assert torch.allclose(o1, o2, atol=1e-6) and torch.allclose(d1, d2, atol=1e-6)


@pytest.mark.parametrize("J", [0, 1, 2, 3, 4, 5])
def test_fa_shapes_and_identity_at_start(J):
    cfg = UniFuseConfig.tiny(n_regblk=J, fa_head_init=0.0, fa_direct=False, fa_prior="none")   # the earlier start: exactly φ = 0
    fa = FA(cfg)
    fd, fr, P = _inputs(cfg, grid=(8, 6, 10))
    flow, flow_c = fa(fd, fr, P, (32, 24, 40), return_coarse=True)
    assert flow.shape == (2, 3, 32, 24, 40) and flow_c.shape == (2, 3, 8, 6, 10)
    assert torch.count_nonzero(flow) == 0                      # zero-initialised head: φ = 0
    flow_default = FA(UniFuseConfig.tiny(n_regblk=J))(fd, fr, P, (32, 24, 40), images=_images(cfg, (8, 6, 10)))
    assert flow_default.shape == flow.shape and torch.isfinite(flow_default).all()
    assert len(fa.blocks) == J
    x = torch.rand(2, 1, 32, 24, 40)
    assert torch.allclose(warp(x, flow), x, atol=1e-5)         # zero flow warps to the identity (float rounding)


def test_flow_upsampled_in_voxels():
    cfg = UniFuseConfig.tiny(n_regblk=1, fa_direct=False, fa_prior="none")
    fa = FA(cfg)
    nn.init.zeros_(fa.head[-1].weight)
    with torch.no_grad(): fa.head[-1].bias.copy_(torch.tensor([0.5, -1.0, 0.25]))   # constant φ at 1/Q
    fd, fr, P = _inputs(cfg)
    flow, flow_c = fa(fd, fr, P, (32, 32, 32), return_coarse=True)
    q = cfg.patch
    assert torch.allclose(flow_c.mean((0, 2, 3, 4)), torch.tensor([0.5, -1.0, 0.25]), atol=1e-6)
    assert torch.allclose(flow.mean((0, 2, 3, 4)), q * torch.tensor([0.5, -1.0, 0.25]), atol=1e-5)


def test_gradient_reaches_every_fa_parameter():
    cfg = UniFuseConfig.tiny()
    fa = FA(cfg)
    nn.init.normal_(fa.head[-1].weight, std=0.1)                # a trained head is not zero
    fd, fr, P = _inputs(cfg)
    P.requires_grad_(True)
    flow = fa(fd, fr, P, (32, 32, 32), images=_images(cfg))
    reg_loss(flow, torch.randn_like(flow)).backward()
    for name, p in fa.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert P.grad.abs().sum() > 0                               # the prompt steers FA


def test_prompt_changes_the_flow():
    cfg = UniFuseConfig.tiny()
    fa = FA(cfg)
    nn.init.normal_(fa.head[-1].weight, std=0.1)
    fd, fr, P = _inputs(cfg)
    im = _images(cfg)
    assert not torch.allclose(fa(fd, fr, P, (32,) * 3, images=im), fa(fd, fr, 2 * P + 1, (32,) * 3, images=im))


def test_reg_loss():
    a = torch.zeros(2, 3, 4, 5, 6)
    b = a.clone(); b[:, 0] = 1; b[:, 1] = 2; b[:, 2] = 2         # |Δ| = 3 everywhere
    assert float(reg_loss(a, b)) == pytest.approx(9.0)
    assert float(reg_loss(b, b)) == 0.0
    with pytest.raises(ValueError, match="flow_gt"):
        reg_loss(a, b[:, :2])


def test_bad_inputs():
    cfg = UniFuseConfig.tiny()
    fa = FA(cfg)
    fd, fr, P = _inputs(cfg)
    with pytest.raises(ValueError, match="fbar_d and fbar_r"):
        fa(fd, fr[:, :, :4], P, (32,) * 3)
    with pytest.raises(ValueError, match="fbar_d and fbar_r"):
        fa(fd[:, :3], fr[:, :3], P, (32,) * 3)
    with pytest.raises(ValueError, match="size"):
        fa(fd, fr, P, (32, 32))
    with pytest.raises(ValueError, match="divisible"):
        RegBLK(10, heads=3, window=4, level=0, shift=False, guide=4)
    with pytest.raises(ValueError, match="needs images"):
        fa(fd, fr, P, (32,) * 3)
    with pytest.raises(ValueError, match="features' grid"):
        fa(fd, fr, P, (32,) * 3, images=_images(cfg, grid=(8, 8, 4)))


def test_max_level():
    assert max_level((8, 8, 8)) == 2 and max_level((40, 40, 40)) == 4 and max_level((3, 64, 64)) == 0


def test_cosine_attention_matches_its_definition_and_learns_its_temperature():
    "fa_attention='cosine': unit-length q, k times a learned per-head scale (10 at the start); 'dot' (default) keeps q·k/√e."
    import math
    import torch.nn.functional as F
    cfg = UniFuseConfig.tiny(fa_attention="cosine", fa_prior="none")
    fa_c, fa_d = FA(cfg), FA(UniFuseConfig.tiny())
    assert UniFuseConfig.tiny().fa_attention == "dot" and UniFuseConfig().fa_attention == "dot"   # the plain form by default
    assert all(torch.allclose(b.logit_scale, torch.full((cfg.fa_heads,), math.log(10.0))) for b in fa_c.blocks)
    assert all(b.logit_scale is None for b in fa_d.blocks)
    # one window of 2³ tokens, two heads: the attended values by hand
    q, k, v = torch.randn(3, 1, 4, 2, 2, 2).unbind(0)
    s = torch.tensor([3.0, 7.0])
    out, _ = window_cross_attention(q, k, v, heads=2, window=2, scale=s)
    qh, kh, vh = (t.reshape(2, 2, 8).transpose(1, 2) for t in (q[0], k[0], v[0]))   # (heads, T, e)
    w = torch.softmax(s[:, None, None] * F.normalize(qh, dim=-1) @ F.normalize(kh, dim=-1).transpose(1, 2), -1)
    assert torch.allclose(out[0], (w @ vh).transpose(1, 2).reshape(4, 2, 2, 2), atol=1e-5)
    # the temperature is trained by whatever reads FA's output
    fd, fr, prompt = _inputs(cfg, grid=(6, 6, 6), B=1)
    fa_c.head[-1].weight.data.normal_(0, 0.1)                                # a head that reads the features
    fa_c(fd, fr, prompt, (24, 24, 24)).pow(2).mean().backward()
    assert all(b.logit_scale.grad is not None and b.logit_scale.grad.abs().sum() > 0 for b in fa_c.blocks)


def test_direct_path_is_the_attention_displacement():
    "With the head silenced, φ at 1/Q is the finest block's attention displacement (mean over heads)."
    cfg = UniFuseConfig.tiny(n_regblk=2, fa_prior="none")
    fa = FA(cfg)
    nn.init.zeros_(fa.head[-1].weight)
    fd, fr, P = _inputs(cfg)
    seen = {}
    blk = fa.blocks[-1]
    orig = blk.forward
    def spy(*a, **kw):
        out = orig(*a, **kw); seen["u"] = out[2]; return out
    blk.forward = spy
    _, flow_c = fa(fd, fr, P, (32, 32, 32), return_coarse=True)
    assert torch.allclose(flow_c, seen["u"], atol=1e-6)
    assert fa.direct.tolist() == [0.0, 1.0]


def test_mind_is_contrast_independent():
    "MIND describes local structure: an inverted or rescaled contrast gives the same descriptor; a flat volume gives all ones."
    x = torch.rand(2, 1, 12, 10, 8, generator=torch.Generator().manual_seed(0))
    m = mind(x)
    assert m.shape == (2, 6, 12, 10, 8) and float(m.max()) <= 1 and float(m.min()) > 0
    assert torch.allclose(m.amax(1), torch.ones(2, 12, 10, 8))
    assert torch.allclose(mind(1 - x), m, atol=1e-5) and torch.allclose(mind(0.5 * x + 0.2), mind(0.5 * (1 - x)), atol=1e-5)
    assert torch.allclose(mind(torch.full((1, 1, 6, 6, 6), 0.3)), torch.ones(1, 6, 6, 6, 6))
    with pytest.raises(ValueError, match="expected"):
        mind(x[:, 0])


def test_cost_volume_and_offsets():
    a = torch.randn(1, 5, 4, 4, 4)
    c = cost_volume(a, a, 1)
    assert c.shape == (1, 27, 4, 4, 4)
    assert torch.allclose(c[:, 13], torch.ones(1, 4, 4, 4), atol=1e-5)           # offset (0, 0, 0) is the centre row
    assert offsets(1)[13].tolist() == [0.0, 0.0, 0.0]
    p = token_patches(torch.arange(512.).view(1, 1, 8, 8, 8), 4)
    assert p.shape == (1, 64, 2, 2, 2) and torch.allclose(p.mean(1), torch.zeros(1, 2, 2, 2))


@pytest.mark.parametrize("shift", [(1, 0, 0), (0, -1, 1), (-2, 1, 0)])
def test_mind_prior_finds_a_shift_across_contrasts(shift):
    "I'_D = I_R moved by whole tokens and contrast-inverted: the prior reads the move off where the content is."
    g = torch.Generator().manual_seed(3)
    ref = F.avg_pool3d(torch.rand(1, 1, 40, 40, 40, generator=g), 3, 1, 1)   # smooth texture
    q = 4
    deg = 1 - torch.roll(ref, [s * q for s in shift], dims=(2, 3, 4))        # I_R(p) is found at p + shift: φ(p) = shift tokens
    phi = mind_prior(ref, deg, q, radius=2, cube=3)
    assert phi.shape == (1, 3, 10, 10, 10)
    inner = phi[0, :, 3:7, 3:7, 3:7].reshape(3, -1).mean(1)                  # away from the rolled edges
    assert torch.allclose(inner, torch.tensor(shift, dtype=torch.float32), atol=0.25), inner


def test_prior_is_the_start_and_the_head_reads_it():
    cfg = UniFuseConfig.tiny(n_regblk=1, fa_head_init=0.0, fa_frame="input")    # the additive frame: φ = prior_weight·φ_prior + the rest
    fa = FA(cfg)
    nn.init.zeros_(fa.blocks[0].out_r.weight); nn.init.zeros_(fa.blocks[0].out_r.bias)
    assert fa.head[0].in_channels == 2 * cfg.fa_channels + 3 + 1 and float(fa.prior_weight.detach()) == 1.0   # φ_prior, its match
    fd, fr, P = _inputs(cfg, B=1)
    im = _images(cfg, B=1)
    _, flow_c = fa(fd, fr, P, (32,) * 3, images=im, return_coarse=True)
    prior = fa.prior_flow(im, fd.shape[2:])                                  # the configured prior (default mind_affine)
    assert torch.allclose(prior, mind_affine_prior(*im, cfg.patch, cfg.fa_radius, cfg.fa_prior_cube))
    disp = flow_c - prior                                                    # what the attention adds (head at 0)
    with torch.no_grad(): fa.prior_weight.fill_(0.0)
    _, flow_0 = fa(fd, fr, P, (32,) * 3, images=im, return_coarse=True)
    assert torch.allclose(flow_0, disp, atol=1e-5)                           # φ = prior_weight·φ_prior + the rest
    assert FA(UniFuseConfig.tiny(fa_prior="none")).head[0].in_channels == 2 * cfg.fa_channels


def test_affine_fit_recovers_an_affine_field_and_ignores_what_has_no_weight():
    size = (6, 5, 4)
    lin = affine_flow(rotation_matrix(torch.tensor([[0.2, 0.1, -0.3]])), torch.tensor([[1.0, 2.0, 3.0]]), size)
    w = torch.ones(1, 1, *size)
    noisy = lin.clone(); noisy[..., 0, 0, 0] += 50; w[..., 0, 0, 0] = 0       # an outlier with no weight
    assert torch.allclose(affine_fit(noisy, w), lin, atol=0.01)
    assert float(affine_fit(noisy, 0 * w).abs().max()) == 0.0                # no weight anywhere: φ = 0, not NaN
    two = affine_fit(torch.cat([lin, -lin]), torch.cat([w, w]))             # one fit per batch item
    assert torch.allclose(two[1], -two[0], atol=1e-4)
    full = torch.ones_like(w)                                                # now the outlier has full weight:
    plain, robust = affine_fit(noisy, full), affine_fit(noisy, full, robust=3)
    assert float((plain - lin).abs().max()) > 1.0                            # least squares is pulled off by it,
    assert float((robust - lin).abs().max()) < 0.1                           # the reweighted fit is not


def test_mind_affine_prior_follows_a_rotation_across_contrasts():
    "I'_D: a textured ball rotated about all three axes, moved, and contrast-inverted. The affine step improves on block matching alone."
    g = torch.Generator().manual_seed(3)
    n, q = 48, 4
    tex = F.avg_pool3d(torch.rand(1, 1, n, n, n, generator=g), 5, 1, 2)
    tex = (tex - tex.min()) / (tex.max() - tex.min())
    r = torch.linspace(-1, 1, n)
    ball = ((r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2) < 0.8).float()[None, None]
    ref = 0.2 + 0.8 * tex * ball
    phi = affine_flow(rotation_matrix(torch.tensor([[0.10, -0.06, 0.08]])), torch.tensor([[3.0, -4.0, 2.0]]), (n,) * 3)
    deg = 1 - warp(ref, -phi)                                                # I'_D(p + φ(p)) ≈ 1 − I_R(p)
    gt = F.avg_pool3d(phi, q) / q                                            # φ at 1/Q, 1/Q voxels
    inside = F.avg_pool3d(ball, q)[0, 0] > 0.9
    def err(u): return float((u - gt).norm(dim=1)[0][inside].mean())
    zero, block, affine = err(0 * gt), err(mind_prior(ref, deg, q, 2, 5)), err(mind_affine_prior(ref, deg, q))
    assert mind_affine_prior(ref, deg, q).shape == (1, 3, 12, 12, 12)
    assert affine < block and affine < 0.35 * zero, (zero, block, affine)


def _textured_ball(n, centre, radius, seed):
    g = torch.Generator().manual_seed(seed)
    tex = F.avg_pool3d(torch.rand(1, 1, n, n, n, generator=g), 5, 1, 2)
    tex = (tex - tex.min()) / (tex.max() - tex.min())
    r = torch.arange(n, dtype=torch.float32)
    d2 = sum((x - c) ** 2 for x, c in zip(torch.meshgrid(r, r, r, indexing="ij"), centre))
    return (0.3 + 0.7 * tex) * (d2 < radius ** 2).float()[None, None]


def test_match_score_is_the_weighted_mean_cosine():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 8, 3, 3, 3, generator=g), torch.randn(2, 8, 3, 3, 3, generator=g)
    w = torch.rand(2, 1, 3, 3, 3, generator=g)
    assert torch.allclose(match_score(a, a, w), torch.ones(2))
    assert torch.allclose(match_score(a, -a, w), -torch.ones(2))
    cos = F.cosine_similarity(a, b, dim=1)[:, None]
    assert torch.allclose(match_score(a, b, w), (cos * w).sum((1, 2, 3, 4)) / w.sum((1, 2, 3, 4)), atol=1e-6)


def test_mind_affine_prior_guard_bounds_the_background_and_never_matches_worse():
    "A small textured ball in a corner of the volume: unguarded, the affine fit extrapolates into the empty rest; guarded, |φ| stays within its foreground's largest."
    n, q = 48, 4
    ref = _textured_ball(n, (12, 12, 12), 9, seed=4)
    phi = affine_flow(rotation_matrix(torch.tensor([[0.12, -0.08, 0.1]])), torch.tensor([[2.0, -3.0, 2.0]]), (n,) * 3)
    deg = 1 - warp(ref, -phi)                                                # moved and contrast-inverted (the ball's outside too)
    fg = F.avg_pool3d((ref > 0.05).float(), q) > 0
    guarded, free = mind_affine_prior(ref, deg, q), mind_affine_prior(ref, deg, q, guard=False)
    cap = float(guarded.norm(dim=1)[fg[:, 0]].max())
    assert float(guarded.norm(dim=1).max()) <= cap + 1e-4
    assert float(free.norm(dim=1).max()) > cap + 0.5                         # the case the guard is for
    other = _textured_ball(n, (30, 30, 30), 14, seed=5)                      # I'_D unrelated to I_R: no round may match worse
    u = mind_affine_prior(ref, other, q)
    a, b0 = token_patches(mind(ref), q), token_patches(mind(other), q)
    b1 = token_patches(mind(warp(other, resize_flow(u, (n,) * 3))), q)
    w = F.avg_pool3d((ref > 0.05).float(), q)
    assert float(match_score(a, b1, w)) >= float(match_score(a, b0, w)) - 1e-6


def test_cost_volume_is_the_direct_definition():
    "The blocked matrix-product cost volume against cos(a(p), b(p + o)) computed offset by offset, edges replicated."
    g = torch.Generator().manual_seed(0)
    for shape, r in (((2, 7, 5, 6, 9), 1), ((1, 5, 8, 8, 8), 2), ((1, 3, 3, 2, 5), 2)):
        a, b = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        an, bn = F.normalize(a, dim=1), F.normalize(b, dim=1)
        d, h, w = shape[2:]
        bp = F.pad(bn, (r,) * 6, mode="replicate")
        want = torch.stack([(an * bp[:, :, r + i:r + i + d, r + j:r + j + h, r + k:r + k + w]).sum(1)
                            for i, j, k in offsets(r).long().tolist()], 1)
        got = cost_volume(a, b, r)
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5), (shape, r)


def test_prior_confidence_says_where_the_prior_matches():
    "1 where I'_D moved by φ is I_R (any contrast), lower where φ is wrong; the head reads it only with fa_prior_confidence."
    n, q = 32, 4
    ref = _textured_ball(n, (16, 16, 16), 14, seed=6)
    shift = torch.zeros(1, 3, n // q, n // q, n // q); shift[:, 2] = 1.0       # one token along W
    deg = 1 - warp(ref, -resize_flow(shift, (n,) * 3))                        # I'_D(p + φ(p)) = 1 − I_R(p)
    fg = F.avg_pool3d((ref > 0.05).float(), q)[0, 0] > 0.5
    right, wrong = prior_confidence(ref, deg, shift, q), prior_confidence(ref, deg, 0 * shift, q)
    assert right.shape == (1, 1, 8, 8, 8) and float(right.max()) <= 1 + 1e-5
    assert float(right[0, 0][fg].mean()) > 0.9 > float(wrong[0, 0][fg].mean()) + 0.3
    c = UniFuseConfig.tiny()
    assert FA(c.replace(fa_prior_confidence=False)).head[0].in_channels == 2 * c.fa_channels + 3
    assert UniFuseConfig.from_dict({k: v for k, v in c.to_dict().items() if k != "fa_prior_confidence"}).fa_prior_confidence is False


def test_the_affine_prior_returns_its_own_confidence():
    "mind_affine_prior's last round already matched I_R against I'_D moved by φ: the map it returns is prior_confidence's."
    ref = _textured_ball(32, (16, 16, 16), 13, seed=7)
    deg = 1 - warp(ref, -affine_flow(rotation_matrix(torch.tensor([[0.1, 0.0, -0.05]])), torch.tensor([[1.0, -2.0, 0.5]]), (32,) * 3))
    phi, conf = mind_affine_prior(ref, deg, 4, return_confidence=True)
    assert torch.equal(phi, mind_affine_prior(ref, deg, 4))
    assert torch.allclose(conf, prior_confidence(ref, deg, phi, 4), atol=1e-5)


def test_mind_pools_the_six_differences_as_one_did_one_by_one():
    "`mind` box-averages its six squared differences in one call; the values are those of six calls, bit for bit."
    x, n = torch.rand(2, 1, 13, 14, 15, generator=torch.Generator().manual_seed(0)), 3
    xp, (D, H, W) = F.pad(x, (n,) * 6, mode="replicate"), x.shape[2:]
    shifts = [(n, 0, 0), (-n, 0, 0), (0, n, 0), (0, -n, 0), (0, 0, n), (0, 0, -n)]
    d = torch.cat([F.avg_pool3d((x - xp[:, :, n + i:n + i + D, n + j:n + j + H, n + k:n + k + W]) ** 2, 3, 1, 1,
                                count_include_pad=False) for i, j, k in shifts], 1)
    v = d.mean(1, keepdim=True).clamp_min(1e-4)
    assert torch.equal(mind(x), torch.exp(-(d - d.amin(1, keepdim=True)) / v))


def test_fa_in_the_priors_frame_starts_from_the_prior():
    "fa_frame='prior': D's features are pulled into R's frame by φ_prior; with the learned residual at 0, φ is φ_prior."
    cfg = UniFuseConfig.tiny(fa_frame="prior")
    fa = FA(cfg).eval()
    with torch.no_grad():
        nn.init.zeros_(fa.head[-1].weight); fa.direct.zero_()
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(1, 1, 32, 32, 32, generator=g)
    deg = warp(ref, affine_flow(rotation_matrix(torch.tensor([[0.0, 0.0, 0.1]])), torch.tensor([[2.0, 0.0, 0.0]]), (32, 32, 32)))
    fd, fr = torch.randn(2, 1, cfg.embed_dim, 8, 8, 8, generator=g)
    P = torch.randn(1, cfg.n_classes, cfg.prompt_len, cfg.embed_dim, generator=g)
    with torch.no_grad():
        phi, phi_c = fa(fd, fr, P, (32, 32, 32), return_coarse=True, images=(ref, deg))
        prior = fa.prior_flow((ref, deg), (8, 8, 8))
    assert phi.shape == (1, 3, 32, 32, 32) and torch.allclose(phi_c, prior, atol=1e-5)
    with pytest.raises(ValueError, match="fa_frame"): UniFuseConfig.tiny(fa_frame="residual")
    assert UniFuseConfig.from_dict({k: v for k, v in UniFuseConfig.tiny().to_dict().items() if k != "fa_frame"}).fa_frame == "input"
