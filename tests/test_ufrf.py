"Tests of unifuse.ufrf: BaseNet, LoRANet, ALSN, the U-Net and the fusion losses."
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from unifuse.config import UniFuseConfig
from unifuse.ufrf import UFRF, ALSN, BaseNet, fusion_losses, ssim3d, rgb_to_ycbcr, ycbcr_to_rgb


def _inputs(cfg, size=(16, 16, 16), B=2, seed=0, probs=None):
    g = torch.Generator().manual_seed(seed)
    C, M, N, Q = cfg.enc_channels, cfg.embed_dim, cfg.n_classes, cfg.patch
    small = tuple(s // Q for s in size)
    p = torch.softmax(torch.randn(B, N, generator=g), -1) if probs is None else probs
    return (torch.randn(B, C, *size, generator=g), torch.randn(B, C, *size, generator=g),
            torch.randn(B, M, *small, generator=g), torch.randn(B, M, *small, generator=g),
            torch.randn(B, N, cfg.prompt_len, M, generator=g), p)


def _randomise_zero_inits(net):
    for m in net.modules():
        if hasattr(m, "up") and isinstance(m.up, nn.Conv3d): nn.init.normal_(m.up.weight, std=0.3)


@pytest.mark.parametrize("mode", ["lora", "none", "experts"])
@pytest.mark.parametrize("chans", [(8, 16), (8, 16, 32), (8, 16, 32, 64)])
def test_shapes_range_and_modes(mode, chans):
    cfg = UniFuseConfig.tiny(alsn=mode, ufrf_channels=chans)
    net = UFRF(cfg)
    fused = net(*_inputs(cfg, size=(16, 16, 24)))
    assert fused.shape == (2, 1, 16, 16, 24)
    assert fused.min() >= 0 and fused.max() <= 1


def test_parameter_budget_and_mode_ordering():
    cfg = UniFuseConfig()
    n = {m: sum(p.numel() for p in UFRF(cfg.replace(alsn=m)).parameters()) for m in ("none", "lora", "experts")}
    assert abs(n["lora"] / 0.948e6 - 1) < 0.03                  # the paper's 0.948 M
    assert n["none"] < n["lora"] < n["experts"]


def test_one_hot_p_uses_exactly_that_branch():
    torch.manual_seed(0)
    cfg = UniFuseConfig.tiny()
    net = UFRF(cfg)
    _randomise_zero_inits(net)
    for j in range(cfg.n_classes):
        p = F.one_hot(torch.tensor([j, j]), cfg.n_classes).float()
        args = _inputs(cfg, probs=p)
        ref = net(*args)
        cols = lambda a, k: slice(k * a.lora.rank, (k + 1) * a.lora.rank)      # branch k's columns of A
        with torch.no_grad():                                   # scramble every other branch: nothing changes
            saved = [a.lora.up.weight.clone() for a in net.alsn]
            for a in net.alsn:
                for k in range(cfg.n_classes):
                    if k != j: a.lora.up.weight[:, cols(a, k)].mul_(-3.0).add_(0.5)
            assert torch.allclose(net(*args), ref, atol=1e-6)
            for a in net.alsn: a.lora.up.weight[:, cols(a, j)].mul_(-3.0)   # scramble branch j: the output changes
            assert not torch.allclose(net(*args), ref, atol=1e-4)
            for a, w in zip(net.alsn, saved): a.lora.up.weight.copy_(w)


def test_alsn_is_base_plus_weighted_branches():
    torch.manual_seed(1)
    alsn = ALSN(16, heads=1, n_classes=3, rank=4, guide=8)
    _randomise_zero_inits(alsn)
    f, g = torch.randn(2, 16, 4, 4, 4), torch.randn(2, 8)
    p = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]])
    x = alsn.norm(f)
    expect = f + alsn.base(x, g) + sum(p[:, j, None, None, None, None] * alsn.branch(j, x, g) for j in range(3))
    assert torch.allclose(alsn(f, g, p), expect, atol=1e-5)


def test_prompt_and_probs_steer_the_output():
    torch.manual_seed(2)
    cfg = UniFuseConfig.tiny()
    net = UFRF(cfg)
    _randomise_zero_inits(net)
    a = _inputs(cfg)
    out = net(*a)
    assert not torch.allclose(net(*a[:4], 3 * a[4], a[5]), out)
    assert not torch.allclose(net(*a[:5], a[5].flip(1)), out)


def test_gradient_reaches_every_parameter():
    cfg = UniFuseConfig.tiny()
    net = UFRF(cfg)
    _randomise_zero_inits(net)
    net(*_inputs(cfg)).square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bad_inputs():
    cfg = UniFuseConfig.tiny()
    net = UFRF(cfg)
    a = list(_inputs(cfg))
    with pytest.raises(ValueError, match="multiple"):
        net(a[0][..., :15], a[1][..., :15], *a[2:])
    with pytest.raises(ValueError, match="full_d_warped"):
        net(a[0][:, :2], a[1][:, :2], *a[2:])
    with pytest.raises(ValueError, match="coarse_d_warped"):
        net(a[0], a[1], a[2][:, :3], a[3][:, :3], *a[4:])


def test_fusion_losses_grey():
    g = torch.Generator().manual_seed(3)
    a, b = torch.rand(2, 1, 16, 16, 16, generator=g), torch.rand(2, 1, 16, 16, 16, generator=g)
    L = fusion_losses(torch.maximum(a, b), a, b)
    assert float(L["inten"]) == pytest.approx(0.0, abs=1e-7)
    assert float(L["crcb"]) == 0.0                              # grey volumes skip Eq. 13
    same = fusion_losses(a, a, a)
    assert float(same["ssim"]) < 1e-4 and float(same["grad"]) < 1e-7
    assert float(fusion_losses(a, a, b)["ssim"]) > 0.5
    # L_grad: a constant volume lacks every edge of the sources
    assert float(fusion_losses(torch.full_like(a, 0.5), a, b)["grad"]) > 0.2
    with pytest.raises(ValueError, match="share one shape"):
        fusion_losses(a, a[:, :, :8], b)


def test_fusion_losses_colour():
    g = torch.Generator().manual_seed(4)
    rgb = torch.rand(1, 3, 12, 12, 12, generator=g)
    assert torch.allclose(ycbcr_to_rgb(rgb_to_ycbcr(rgb)), rgb, atol=1e-5)
    assert float(fusion_losses(rgb, rgb, rgb)["crcb"]) < 1e-4
    grey = rgb.mean(1, keepdim=True).expand(-1, 3, -1, -1, -1)  # colour lost: CbCr differ
    assert float(fusion_losses(grey, rgb, rgb)["crcb"]) > 0.05


def test_colour_ufrf_returns_rgb_with_the_input_chroma_at_start():
    torch.manual_seed(0)                                                     # weights and inputs the same in any test order
    cfg = UniFuseConfig.tiny(colour=True)
    net = UFRF(cfg)
    chroma = torch.rand(2, 2, 16, 16, 16) * 0.4 + 0.3
    fused = net(*_inputs(cfg), chroma=chroma)
    assert fused.shape == (2, 3, 16, 16, 16) and fused.min() >= 0 and fused.max() <= 1
    grey = net(*_inputs(cfg))
    assert grey.shape == (2, 1, 16, 16, 16)                                  # no chroma given: Y only
    from unifuse.colour import rgb_to_ycbcr
    ycc = rgb_to_ycbcr(fused)
    inside = (fused > 1e-4).all(1, keepdim=True) & (fused < 1 - 1e-4).all(1, keepdim=True)   # not clamped
    assert float(inside.float().mean()) > 0.5                                # most voxels: the chroma fits inside RGB's cube
    assert torch.allclose(ycc[:, :1][inside], grey[inside], atol=1e-5)       # Y is the grey fusion (where RGB is not clamped)
    assert torch.allclose(ycc[:, 1:][inside.expand(-1, 2, -1, -1, -1)], chroma[inside.expand(-1, 2, -1, -1, -1)], atol=1e-4)
    with pytest.raises(ValueError, match="colour=True"):
        UFRF(UniFuseConfig.tiny())(*_inputs(UniFuseConfig.tiny()), chroma=chroma)


def test_ssim3d_small_volumes():
    a = torch.rand(1, 1, 5, 5, 5)
    assert float(ssim3d(a, a)) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="too small"):
        ssim3d(torch.rand(1, 1, 2, 8, 8), torch.rand(1, 1, 2, 8, 8))
