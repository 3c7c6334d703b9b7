"""Tests of the spatial convention shared by the data pipeline and FA (unifuse.spatial)."""
import math

import pytest
import torch
import torch.nn.functional as F

from unifuse.spatial import (affine_flow, compose, identity_grid, integrate, jacobian_det, resize_flow,
                             rotation_matrix, warp)


def smooth_field(shape, amplitude, seed=0):
    B, C, *size = shape
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(B, C, *[4] * len(size), generator=g)
    f = F.interpolate(coarse, size=size, mode="trilinear", align_corners=True)
    return f * amplitude / f.abs().amax(dim=(1, 2, 3, 4), keepdim=True)


def blob(S, sigma=4.0):
    p = identity_grid((S, S, S))
    return torch.exp(-((p - (S - 1) / 2) ** 2).sum(1, keepdim=True) / (2 * sigma ** 2))


INNER = (slice(None), slice(None)) + (slice(5, -5),) * 3


def test_identity_grid_holds_voxel_indices():
    g = identity_grid((3, 4, 5))
    assert g.shape == (1, 3, 3, 4, 5)
    assert g[0, :, 2, 1, 4].tolist() == [2.0, 1.0, 4.0]
    g.zero_()                                                                   # the caller's copy, not the cache
    assert identity_grid((3, 4, 5))[0, :, 2, 1, 4].tolist() == [2.0, 1.0, 4.0]
    x = torch.rand(1, 1, 3, 4, 5)
    identity_grid((3, 4, 5)).add_(1.0)
    assert torch.equal(warp(x, torch.zeros(1, 3, 3, 4, 5)), x)                 # later warps are untouched


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("shift", [1, 3])
def test_known_shift_moves_volume_along_named_axis(axis, shift):
    x = torch.rand(2, 2, 7, 8, 9)
    flow = torch.zeros(2, 3, 7, 8, 9)
    flow[:, axis] = shift
    y = warp(x, flow)
    n = x.shape[2 + axis]
    # pull: y(p) = x(p + shift e_axis), i.e. the content moves by -shift along that axis only
    torch.testing.assert_close(y.narrow(2 + axis, 0, n - shift), x.narrow(2 + axis, shift, n - shift))
    # border padding: past the end the last slice repeats
    last = x.narrow(2 + axis, n - 1, 1)
    torch.testing.assert_close(y.narrow(2 + axis, n - 1, 1), last)


def test_fractional_shift_interpolates_linearly():
    x = torch.rand(1, 1, 5, 6, 7, dtype=torch.float64)
    flow = torch.zeros(1, 3, 5, 6, 7, dtype=torch.float64)
    flow[:, 1] = 0.25
    y = warp(x, flow)
    torch.testing.assert_close(y[:, :, :, :-1], 0.75 * x[:, :, :, :-1] + 0.25 * x[:, :, :, 1:])


def test_nearest_mode_keeps_labels_and_dtype():
    lab = torch.randint(0, 5, (1, 1, 6, 6, 6))
    flow = torch.full((1, 3, 6, 6, 6), 0.4)
    out = warp(lab, flow, mode="nearest")
    assert out.dtype == lab.dtype
    assert set(out.unique().tolist()) <= set(lab.unique().tolist())


def test_flow_batch_broadcasts():
    x = torch.rand(3, 1, 5, 5, 5)
    flow = torch.zeros(1, 3, 5, 5, 5)
    flow[:, 0] = 1
    assert warp(x, flow).shape == (3, 1, 5, 5, 5)
    torch.testing.assert_close(warp(x, flow)[:, :, :-1], x[:, :, 1:])


def test_integrate_constant_velocity_is_the_same_shift():
    v = torch.zeros(1, 3, 6, 6, 6)
    v[:, 2] = -1.5
    torch.testing.assert_close(integrate(v), v, atol=1e-5, rtol=0)


def test_integrate_then_minus_v_returns_the_volume_in_the_interior():
    S = 24
    v = smooth_field((1, 3, S, S, S), 2.0)
    x = blob(S)
    back = warp(warp(x, integrate(v)), integrate(-v))
    # exp(-v) ∘ exp(v) is the identity up to 0.1 voxel (scaling and squaring with trilinear resampling)
    assert compose(integrate(v), integrate(-v))[INNER].abs().max() < 0.1
    # two trilinear resamplings of a σ=4 Gaussian lose ≤ ~0.047 at the peak; the inverse must not add more
    assert (back - x)[INNER].abs().max() < 0.03
    # and it really moved in between
    assert (warp(x, integrate(v)) - x)[INNER].abs().max() > 0.1


def test_compose_agrees_with_two_warps():
    S = 24
    a, b = smooth_field((2, 3, S, S, S), 2.0, 1), smooth_field((2, 3, S, S, S), 2.0, 2)
    x = blob(S).expand(2, 1, S, S, S)
    twice = warp(warp(x, a), b)
    once = warp(x, compose(a, b))
    assert (twice - once)[INNER].abs().max() < 0.02
    # compose of constant shifts adds them exactly
    s1, s2 = torch.zeros(1, 3, 6, 6, 6), torch.zeros(1, 3, 6, 6, 6)
    s1[:, 0], s2[:, 1] = 1.0, 2.0
    torch.testing.assert_close(compose(s1, s2), s1 + s2)


def test_resize_flow_scales_values_with_the_grid():
    coarse = torch.zeros(1, 3, 4, 5, 6)
    coarse[:, 0], coarse[:, 2] = 1.0, -0.5
    fine = resize_flow(coarse, (16, 10, 12))
    assert fine.shape == (1, 3, 16, 10, 12)
    torch.testing.assert_close(fine[:, 0], torch.full((1, 16, 10, 12), 4.0))
    torch.testing.assert_close(fine[:, 2], torch.full((1, 16, 10, 12), -1.0))
    torch.testing.assert_close(resize_flow(fine, (4, 5, 6)), coarse)


def test_resize_flow_matches_warp_on_patch_grids():
    # a coarse shift of 1 voxel = a fine shift of Q voxels: block-averaging the fine warp is the coarse warp
    Q = 4
    x = torch.rand(1, 1, 4, 4, 4).repeat_interleave(Q, 2).repeat_interleave(Q, 3).repeat_interleave(Q, 4)
    coarse = torch.zeros(1, 3, 4, 4, 4)
    coarse[:, 1] = 1.0
    fine_warped = warp(x, resize_flow(coarse, (16, 16, 16)))
    coarse_x = F.avg_pool3d(x, Q)
    torch.testing.assert_close(F.avg_pool3d(fine_warped, Q)[:, :, :, :-1], warp(coarse_x, coarse)[:, :, :, :-1])


def test_rotation_quarter_turn_is_rot90():
    x = torch.rand(1, 1, 7, 5, 7)
    R = rotation_matrix(torch.tensor([[0.0, math.pi / 2, 0.0]]))  # about H: the (W, D) plane
    y = warp(x, affine_flow(R, torch.zeros(1, 3), (7, 5, 7)))
    torch.testing.assert_close(y, torch.rot90(x, -1, dims=(4, 2)), atol=1e-5, rtol=0)


def test_affine_inverse_and_orthogonality():
    R = rotation_matrix(torch.tensor([[0.2, -0.1, 0.3], [0.0, 0.05, -0.4]]))
    torch.testing.assert_close(R @ R.transpose(1, 2), torch.eye(3).expand(2, 3, 3), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(2))
    t = torch.tensor([[1.0, 2.0, -3.0], [0.5, 0.0, 0.0]])
    size = (20, 20, 20)
    fwd = affine_flow(R, t, size)
    Ri = R.transpose(1, 2)
    inv = affine_flow(Ri, -(Ri @ t[..., None])[..., 0], size)
    assert compose(inv, fwd)[INNER].abs().max() < 1e-4


def test_jacobian_det():
    torch.testing.assert_close(jacobian_det(torch.zeros(1, 3, 4, 4, 4)), torch.ones(1, 4, 4, 4))
    flow = affine_flow(torch.diag(torch.tensor([1.1, 0.9, 1.3]))[None], torch.zeros(1, 3), (5, 6, 7))
    torch.testing.assert_close(jacobian_det(flow), torch.full((1, 5, 6, 7), 1.1 * 0.9 * 1.3), atol=1e-5, rtol=0)
    fold = affine_flow(torch.diag(torch.tensor([-1.0, 1.0, 1.0]))[None], torch.zeros(1, 3), (5, 5, 5))
    assert (jacobian_det(fold) <= 0).all()


def test_2d_warp():
    x = torch.rand(1, 1, 6, 7)
    flow = torch.zeros(1, 2, 6, 7)
    flow[:, 1] = 2
    torch.testing.assert_close(warp(x, flow)[..., :-2], x[..., 2:])


def test_bad_input_messages():
    with pytest.raises(ValueError, match=r"\(B, 3, D, H, W\)"):
        warp(torch.rand(1, 1, 4, 4, 4), torch.zeros(1, 2, 4, 4, 4))
    with pytest.raises(ValueError, match="spatial size"):
        warp(torch.rand(1, 1, 4, 4, 5), torch.zeros(1, 3, 4, 4, 4))
    with pytest.raises(ValueError, match="batch sizes"):
        warp(torch.rand(2, 1, 4, 4, 4), torch.zeros(3, 3, 4, 4, 4))
    with pytest.raises(TypeError, match="torch.Tensor"):
        warp(torch.rand(1, 1, 4, 4, 4), None)
    with pytest.raises(ValueError, match="steps"):
        integrate(torch.zeros(1, 3, 4, 4, 4), steps=-2)
    with pytest.raises(ValueError, match="size"):
        identity_grid((4, 0, 4))


def test_integer_volumes_are_warped_by_nearest_neighbour():
    lab = torch.ones(1, 1, 6, 7, 8, dtype=torch.long); lab[..., 4:] = 3
    half = torch.zeros(1, 3, 6, 7, 8); half[:, 2] = 0.5
    assert warp(lab.float(), half).round(decimals=4).unique().tolist() == [1.0, 2.0, 3.0]   # trilinear invents a 2
    out = warp(lab, half)                                                        # the default for integers: nearest
    assert out.dtype == torch.long and out.unique().tolist() == [1, 3]
    with pytest.raises(ValueError, match="mode='nearest'"): warp(lab, half, mode="bilinear")
    big = torch.full((1, 1, 4, 4, 4), 2 ** 30 + 1, dtype=torch.int64)           # beyond float32's exact integers
    assert torch.equal(warp(big, torch.full((1, 3, 4, 4, 4), 0.3)), big)
    mask = torch.zeros(1, 1, 4, 4, 4, dtype=torch.bool); mask[..., 2:] = True
    assert warp(mask, torch.zeros(1, 3, 4, 4, 4)).dtype == torch.bool
    with pytest.raises(ValueError, match="padding_mode"): warp(lab.float(), half, padding_mode="edge")


@pytest.mark.parametrize("padding_mode", ["border", "zeros"])
def test_non_finite_flow_gives_nan_not_a_border_value(padding_mode):
    x = torch.rand(2, 2, 6, 6, 6)
    flow = torch.zeros(2, 3, 6, 6, 6); flow[1, 0, 2, 3, 4] = float("nan"); flow[1, 2, 0, 0, 0] = float("inf")
    y = warp(x, flow, padding_mode=padding_mode)
    bad = torch.isnan(y)
    assert bad[1, :, 2, 3, 4].all() and bad[1, :, 0, 0, 0].all() and int(bad.sum()) == 4   # both channels, nowhere else
    torch.testing.assert_close(y[0], x[0])
    with pytest.raises(ValueError, match="NaN or infinite"): warp(torch.zeros(2, 1, 6, 6, 6, dtype=torch.long), flow)


def test_warp_runs_on_meta_tensors_and_empty_batches():
    x, flow = torch.empty(2, 1, 8, 8, 8, device="meta"), torch.empty(2, 3, 8, 8, 8, device="meta")
    assert warp(x, flow).shape == (2, 1, 8, 8, 8) and warp(x, flow).device.type == "meta"
    assert warp(x.long(), flow).shape == (2, 1, 8, 8, 8)                          # no value checks on meta
    assert warp(torch.rand(0, 1, 4, 4, 4), torch.zeros(0, 3, 4, 4, 4)).shape == (0, 1, 4, 4, 4)
