"""Tests of the degradations, the misalignment and the training-batch builder (unifuse.degrade)."""
import math

import numpy as np
import pytest
import torch

from unifuse.degrade import (CLASSES, DEFAULT_RANGES, TASKS, Ranges, degrade, fbp, lowdose, make_batch, metal,
                             misalignment, motion, radon)
from unifuse.spatial import affine_flow, compose, identity_grid, jacobian_det, rotation_matrix, warp

S = 24
INNER = (slice(None), slice(None)) + (slice(5, -5),) * 3


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def head(S=S, B=1):
    """A smooth stand-in head: an ellipsoid with a brighter core, in [0, 1]."""
    p = identity_grid((S, S, S))[0] - (S - 1) / 2
    r = ((p[0] / (0.42 * S)) ** 2 + (p[1] / (0.38 * S)) ** 2 + (p[2] / (0.4 * S)) ** 2).sqrt()
    x = 0.6 * torch.sigmoid((1 - r) * 12) + 0.3 * torch.exp(-(r / 0.4) ** 2)
    return x.clamp(0, 1)[None, None].expand(B, 1, S, S, S).clone()


def blob(S=S, sigma=5.0):
    p = identity_grid((S, S, S))
    return torch.exp(-((p - (S - 1) / 2) ** 2).sum(1, keepdim=True) / (2 * sigma ** 2))


# ---------------------------------------------------------------- projector and FBP against scikit-image
def _phantom(N):
    from skimage.data import shepp_logan_phantom
    from skimage.transform import resize
    img = resize(shepp_logan_phantom(), (N, N), anti_aliasing=True)
    rr, cc = np.mgrid[:N, :N] - N // 2
    return img * (rr ** 2 + cc ** 2 <= (N // 2) ** 2)  # zero outside the reconstruction circle


@pytest.mark.parametrize("N,V", [(64, 60), (49, 37)])
def test_radon_matches_skimage(N, V):
    from skimage.transform import radon as sk_radon
    img = _phantom(N)
    theta = np.arange(V) * 180 / V
    ref = sk_radon(img, theta=theta, circle=True)  # (N, V)
    ours = radon(torch.tensor(img, dtype=torch.float32)[None], V)[0].T.numpy()
    # same geometry and bilinear interpolation: equal up to float32 rounding of the ray sums
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-4 * max(1.0, ref.max()), rtol=0)


@pytest.mark.parametrize("flt", ["ramp", "hann"])
def test_fbp_matches_skimage_iradon(flt):
    from skimage.transform import iradon, radon as sk_radon
    N, V = 64, 90
    img = _phantom(N)
    theta = np.arange(V) * 180 / V
    sino = sk_radon(img, theta=theta, circle=True)
    ref = iradon(sino, theta=theta, circle=True, filter_name=flt, interpolation="linear")
    ours = fbp(torch.tensor(sino.T.copy(), dtype=torch.float32)[None], flt)[0].numpy()
    rr, cc = np.mgrid[:N, :N] - N // 2
    inside = rr ** 2 + cc ** 2 < (N // 2 - 1) ** 2  # skimage zeroes the outside of the circle
    # ramp: the same Ram-Lak filter, padding and linear interpolation, so float32 rounding only (1e-4).
    # hann: skimage samples np.hanning(P), whose frequency axis is stretched by P/(P-1) against the
    # continuous window 0.5 + 0.5 cos(2πf) used here; that moves values by < 2e-3 (image max ≈ 1).
    np.testing.assert_allclose(ours[inside], ref[inside], atol=1e-4 if flt == "ramp" else 2e-3, rtol=0)
    if flt == "ramp":  # and it reconstructs the phantom
        assert np.abs(ours - img)[inside].mean() < 0.03


def test_radon_is_batched_over_slices():
    imgs = torch.rand(5, 16, 16)
    full = radon(imgs, 12)
    assert full.shape == (5, 12, 16)
    torch.testing.assert_close(full[3], radon(imgs[3:4], 12)[0])


# ---------------------------------------------------------------- MRI motion
def test_motion_without_movement_is_identity():
    x = head()
    still = DEFAULT_RANGES.replace(motion_rotation_deg=(0.0, 0.0), motion_translation=(0.0, 0.0))
    torch.testing.assert_close(motion(x, 1.0, gen(), still), x, atol=1e-5, rtol=0)


def test_motion_grows_with_strength_and_is_seeded():
    x = head(B=2)
    errs = [(motion(x, s, gen(1)) - x).abs().mean().item() for s in (0.0, 0.5, 1.0)]
    assert errs[0] < errs[1] < errs[2]
    a, b, c = motion(x, 0.8, gen(5)), motion(x, 0.8, gen(5)), motion(x, 0.8, gen(6))
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1


def test_motion_keeps_the_reference_position():
    # the position that acquires the k-space centre is the identity: no global shift of the image
    x = head()
    y = motion(x, 1.0, gen(2))
    com = lambda v: (identity_grid((S, S, S)) * v).sum((2, 3, 4)) / v.sum()
    assert (com(y) - com(x)).abs().max() < 0.5


def test_motion_single_state_is_identity():
    x = head()
    torch.testing.assert_close(motion(x, 1.0, gen(), DEFAULT_RANGES.replace(motion_states=1)), x)


def test_motion_fixed_phase_axis():
    x = head()
    r = DEFAULT_RANGES.replace(motion_axis=1)
    assert motion(x, 1.0, gen(), r).shape == x.shape


# ---------------------------------------------------------------- CT metal artefacts
def test_metal_inserts_metal_and_streaks():
    x = head(32)
    y, mask = metal(x, 1.0, gen(3), return_mask=True)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert mask.sum() > 0
    core = mask > 0.99
    assert (y[core] > 0.9).float().mean() > 0.9  # metal shows bright
    assert (y - x)[mask == 0].abs().mean() > 0.003  # artefacts and noise outside the metal
    # metal lies inside the body
    assert (x[mask > 0.5] > 0.05).float().mean() > 0.9


def test_metal_noise_grows_with_strength():
    x = head(32)
    d = [(metal(x, s, gen(0)) - x).abs().mean().item() for s in (0.0, 1.0)]
    assert d[0] < d[1]


def test_metal_slices_along_the_axial_axis():
    x = head(16)[:, :, :, :, :12]  # non-cubic: slices (16 × 16) along W
    y = metal(x, 0.5, gen())
    assert y.shape == x.shape
    r = DEFAULT_RANGES.replace(axial_axis=0)
    assert metal(x, 0.5, gen(), r).shape == x.shape  # slices (16 × 12) padded to square


# ---------------------------------------------------------------- low-dose PET
@pytest.mark.parametrize("domain", ["image", "sinogram"])
def test_lowdose_is_unbiased_and_noisier_at_lower_dose(domain):
    x = torch.zeros(1, 1, 40, 40, 6)
    rr = (torch.arange(40) - 20.0)[:, None] ** 2 + (torch.arange(40) - 20.0)[None] ** 2
    x[0, 0] = ((rr < 18 ** 2).float() * 0.5)[..., None]
    r = DEFAULT_RANGES.replace(pet_domain=domain)
    core = (slice(None), slice(None), slice(12, 28), slice(12, 28))
    lo, hi = lowdose(x, 0.0, gen(1), r), lowdose(x, 1.0, gen(1), r)
    assert (lo - x)[core].std() < (hi - x)[core].std()
    assert abs((lo - x)[core].mean()) < 0.01  # count noise has zero mean
    assert (hi - x)[core].std() > 0.02


def test_lowdose_image_domain_variance_is_poisson():
    x = torch.full((1, 1, 16, 16, 16), 0.5)
    r = DEFAULT_RANGES.replace(pet_domain="image")
    d = DEFAULT_RANGES.pet_dose[1]
    y = lowdose(x, 1.0, gen(2), r)
    expected = math.sqrt(0.5 / (r.pet_counts * d))  # std of Poisson(λ)/k with λ = x k
    assert abs(y.std().item() - expected) / expected < 0.1


def test_degrade_dispatch():
    x = head()
    torch.testing.assert_close(degrade(x, "mri", 0.5, gen(1)), motion(x, 0.5, gen(1)))
    torch.testing.assert_close(degrade(x, "clean"), x)
    with pytest.raises(ValueError, match="kind"):
        degrade(x, "blur")


# ---------------------------------------------------------------- misalignment
def test_misalignment_inverse_round_trip():
    phi, phi_inv = misalignment(2, (S, S, S), gen(0))
    assert phi.shape == phi_inv.shape == (2, 3, S, S, S)
    assert compose(phi_inv, phi)[INNER].abs().max() < 0.2  # voxels
    x = blob()
    assert (warp(warp(x, phi_inv), phi) - x)[INNER].abs().max() < 0.035
    assert (jacobian_det(phi) > 0).all()
    assert phi.abs().max() > 0.5  # it does move


def test_misalignment_rigid_only_is_the_rigid_map():
    r = DEFAULT_RANGES.replace(deformation=0.0)
    phi, phi_inv = misalignment(1, (S, S, S), gen(4), r)
    # a rigid map has an orthogonal Jacobian: det 1 everywhere
    torch.testing.assert_close(jacobian_det(phi), torch.ones(1, S, S, S), atol=1e-4, rtol=0)
    none = DEFAULT_RANGES.replace(deformation=0.0, rotation_deg=0.0, translation=0.0)
    phi0, phi0_inv = misalignment(1, (S, S, S), gen(4), none)
    assert phi0.abs().max() < 1e-5 and phi0_inv.abs().max() < 1e-5


# ---------------------------------------------------------------- make_batch
KEYS = {"ref", "deg", "deg_label", "ref_moved", "deg_fine", "flow", "label", "task"}


def test_make_batch_mixed_tasks():
    ref, oth = head(B=3), head(B=3) * 0.8
    b = make_batch(ref, oth, ["pet", "mri", "ct"], generator=gen(0))
    assert set(b) == KEYS
    for k in ("ref", "deg", "deg_label", "ref_moved", "deg_fine"):
        assert b[k].shape == (3, 1, S, S, S) and b[k].dtype == torch.float32 and b[k].device == ref.device
    assert b["flow"].shape == (3, 3, S, S, S)
    assert b["label"].dtype == torch.long
    assert b["label"].tolist() == [CLASSES.index(TASKS[t]) for t in ["pet", "mri", "ct"]] == [2, 0, 1]
    assert b["task"] == ["pet", "mri", "ct"]
    torch.testing.assert_close(b["ref"], ref)
    torch.testing.assert_close(b["deg_label"], oth)
    # I'_fine, I'_R and I'_D are moved by the same φ⁻¹: warping back with φ realigns them
    assert (warp(b["deg_fine"], b["flow"]) - oth)[INNER].abs().max() < 0.05
    assert (warp(b["ref_moved"], b["flow"]) - ref)[INNER].abs().max() < 0.05
    # the degraded sample differs from the clean moved one
    assert (b["deg"] - b["deg_fine"]).abs().mean() > 1e-3


def test_make_batch_degrades_then_moves():
    ref, oth = head(B=2), head(B=2) * 0.7
    b = make_batch(ref, oth, "mri", generator=gen(3), strength=1.0)
    # the same random stream, by hand: degrade I_D first, then draw the misalignment and move
    g = gen(3)
    y = motion(oth, 1.0, g)
    phi, phi_inv = misalignment(2, (S, S, S), g)
    torch.testing.assert_close(b["flow"], phi)
    torch.testing.assert_close(b["deg"], warp(y, phi_inv), atol=1e-5, rtol=0)
    torch.testing.assert_close(b["deg_fine"], warp(oth, phi_inv), atol=1e-5, rtol=0)


def test_make_batch_clean_class():
    ref, oth = head(B=8), head(B=8) * 0.9
    r = DEFAULT_RANGES.replace(p_clean=0.5)
    b = make_batch(ref, oth, "ct", clean=True, generator=gen(1), ranges=r)
    lab = b["label"]
    assert set(lab.tolist()) <= {CLASSES.index("metal"), CLASSES.index("clean")}
    assert (lab == 3).any() and (lab == 1).any()  # with seed 1 both occur
    clean = lab == 3
    torch.testing.assert_close(b["deg"][clean], b["deg_fine"][clean])  # moved but not degraded
    assert (b["deg"][~clean] - b["deg_fine"][~clean]).abs().mean() > 1e-3


def test_make_batch_is_reproducible_and_ranges_apply():
    ref, oth = head(B=2), head(B=2)
    a = make_batch(ref, oth, "mri", generator=gen(9))
    b = make_batch(ref, oth, "mri", generator=gen(9))
    for k in ("deg", "flow", "ref_moved"):
        torch.testing.assert_close(a[k], b[k])
    still = Ranges(rotation_deg=0.0, translation=0.0, deformation=0.0)
    c = make_batch(ref, oth, "mri", generator=gen(9), ranges=still)
    assert c["flow"].abs().max() < 1e-5
    torch.testing.assert_close(c["ref_moved"], ref, atol=1e-5, rtol=0)


def test_make_batch_check_false_skips_value_checks():
    v = torch.rand(1, 1, 8, 8, 8)
    b = make_batch(v, v, "mri", check=False, generator=gen())
    assert b["deg"].shape == v.shape


def test_make_batch_bad_input():
    v = torch.rand(2, 1, 8, 8, 8)
    with pytest.raises(ValueError, match=r"\(B, 1, D, H, W\)"):
        make_batch(v[0], v[0], "mri")
    with pytest.raises(ValueError, match="same shape"):
        make_batch(v, v[:, :, :4], "mri")
    with pytest.raises(ValueError, match="unknown task"):
        make_batch(v, v, "xray")
    with pytest.raises(ValueError, match="list of 2"):
        make_batch(v, v, ["mri"])
    nan = v.clone()
    nan[1, 0, 2, 2, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        make_batch(v, nan, "ct")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        make_batch(v * 100, v, "pet")
    with pytest.raises(TypeError, match="torch.Tensor"):
        make_batch(v.numpy(), v, "mri")
    with pytest.raises(TypeError, match="floating"):
        make_batch((v * 10).long(), v, "mri")
    with pytest.raises(ValueError, match="strength"):
        motion(v, 2.0)
    with pytest.raises(ValueError, match="pet_domain"):
        lowdose(v, 0.5, ranges=DEFAULT_RANGES.replace(pet_domain="kspace"))
