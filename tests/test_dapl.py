import pytest
import torch

from unifuse.config import UniFuseConfig
from unifuse.dapl import DAPL, PatchEmbed, token_orders, to_tokens, to_volume, l_ce


@pytest.fixture(scope="module")
def pair():
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 1, 16, 16, 16, generator=g), torch.rand(2, 1, 16, 16, 16, generator=g)


def test_token_orders_exact():
    o = token_orders(10)
    assert o["for"].tolist() == list(range(10))
    assert o["bac"].tolist() == list(range(9, -1, -1))
    # F_bid = [f^1 … f^(⌊N/2⌋-1), f^N … f^⌊N/2⌋] (1-based)
    assert o["bid"].tolist() == [0, 1, 2, 3, 9, 8, 7, 6, 5, 4]
    for n in (1, 2, 3, 7, 64):
        for v in token_orders(n).values():
            assert sorted(v.tolist()) == list(range(n))
    with pytest.raises(ValueError):
        token_orders(0)


def test_tokens_round_trip():
    v = torch.randn(2, 5, 2, 3, 4)
    t = to_tokens(v)
    assert t.shape == (2, 24, 5)
    assert torch.equal(t[:, 1], v[:, :, 0, 0, 1])
    assert torch.equal(to_volume(t, (2, 3, 4)), v)
    with pytest.raises(ValueError, match="N ="):
        to_volume(t, (2, 3, 3))
    with pytest.raises(ValueError, match="divisible"):
        PatchEmbed(1, 4, 4)(torch.rand(1, 1, 6, 8, 8))


def test_dapl_shapes_and_prompt(pair):
    torch.manual_seed(0)
    cfg = UniFuseConfig.tiny(n_classes=4)
    dapl = DAPL(cfg)
    deg, ref = pair
    out = dapl(deg, ref)
    C, M, L = cfg.enc_channels, cfg.embed_dim, cfg.prompt_len
    for k in ("feat_d", "feat_r", "feat_d_hat"):
        assert out[k].shape == (2, C, 16, 16, 16)
    assert len(out["states"]) == 3
    for h in out["states"]:
        assert h.shape == (2, cfg.d_inner, cfg.d_state)
    assert out["logits"].shape == (2, 4)
    assert torch.allclose(out["probs"].sum(-1), torch.ones(2))
    assert out["prompt"].shape == (2, 4, L, M)
    assert torch.allclose(out["prompt"], dapl.prompts * out["select"])  # Eq. 2
    assert ((out["select"] > 0) & (out["select"] < 1)).all()
    assert torch.allclose(out["feat_d"], dapl.encoder(deg))  # one shared encoder
    assert torch.allclose(out["feat_r"], dapl.encoder(ref))
    assert torch.equal(out["feat_d_hat"], out["feat_d"])              # F̂'_D = F'_D: J_DR feeds the read-out only
    joint = DAPL(cfg.replace(dhat="joint")); joint.load_state_dict(dapl.state_dict())
    assert not torch.allclose(joint(deg, ref)["feat_d_hat"], out["feat_d"])   # the earlier wiring adds J_DR
    h1, h2, h3 = out["h"]
    assert not torch.allclose(h1, h2) and not torch.allclose(h2, h3)


def test_ce_gradient_reaches_encoder(pair):
    torch.manual_seed(0)
    dapl = DAPL(UniFuseConfig.tiny(n_classes=4))
    out = dapl(*pair)
    dapl.ce_loss(out, torch.tensor([1, 3])).backward()
    assert dapl.encoder.conv1.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in dapl.mamba1.parameters())
    with pytest.raises(ValueError, match="n_classes"):
        l_ce(out["logits"], torch.tensor([0, 4]))


def test_every_parameter_trained(pair):
    "L_ce reaches every DAPL parameter outside the prompt path (P and the selector of Eq. 2); the prompt reaches those."
    torch.manual_seed(0)
    dapl = DAPL(UniFuseConfig.tiny())
    out = dapl(*pair)
    dapl.ce_loss(out, torch.tensor([1, 2])).backward()
    prompt_path = lambda n: n == "prompts" or n.startswith("selector.")
    dead = [n for n, p in dapl.named_parameters() if not prompt_path(n) and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not dead, dead
    assert not hasattr(dapl.mamba2, "out_proj") and not hasattr(dapl.mamba2, "D")
    dapl.zero_grad(set_to_none=True)
    dapl(*pair)["prompt"].square().sum().backward()
    for n, p in dapl.named_parameters():
        if prompt_path(n): assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_bad_inputs(pair):
    dapl = DAPL(UniFuseConfig.tiny())
    deg, ref = pair
    with pytest.raises(ValueError, match="same shape"):
        dapl(deg, ref[..., :8])
    with pytest.raises(ValueError, match="divisible"):
        dapl(deg[..., :14], ref[..., :14])
    with pytest.raises(TypeError, match="deg"):
        dapl(deg.numpy(), ref)


@pytest.mark.parametrize("mode", ["A", "B", "C"])
def test_ablation_settings(pair, mode):
    torch.manual_seed(0)
    cfg = UniFuseConfig.tiny(dapl=mode)
    dapl = DAPL(cfg)
    out = dapl(*pair)
    n = cfg.n_classes
    assert out["prompt"].shape == (2, n, cfg.prompt_len, cfg.embed_dim)
    for h in out["states"]:
        assert h.shape == (2, cfg.d_inner, cfg.d_state)
    if mode in ("A", "C"):
        assert torch.equal(out["feat_d_hat"], out["feat_d"])
        assert all((h == 0).all() for h in out["states"])
    if mode in ("B", "C"):
        assert torch.allclose(out["probs"], torch.full((2, n), 1 / n))
        assert torch.equal(out["prompt"][0], dapl.prompts) and torch.equal(out["prompt"][1], dapl.prompts)
    if mode == "B":
        assert out["logits"] is not None and not hasattr(dapl, "selector")
    if mode == "C":
        assert out["logits"] is None and not hasattr(dapl, "mamba1")
        assert float(dapl.ce_loss(out, torch.tensor([0, 1]))) == 0.0
    if mode == "A":
        assert not torch.allclose(out["h"][0], torch.zeros_like(out["h"][0]))


def test_single_sample_batches():
    torch.manual_seed(0)
    dapl = DAPL(UniFuseConfig.tiny(n_classes=4))
    x = torch.rand(1, 1, 16, 16, 16)
    out = dapl(x, x)  # training mode with B = 1: running statistics standardise the states
    assert out["logits"].shape == (1, 4) and torch.isfinite(out["logits"]).all()
    dapl.eval()
    with torch.no_grad():
        assert torch.isfinite(dapl(x, x)["probs"]).all()


@pytest.mark.parametrize("train_mode", [True, False])
def test_probs_do_not_depend_on_the_batch(train_mode):
    "p drives the prompts and the LoRA mixing: the same input gives the same p whatever its batch-mates, in train and eval mode."
    import copy
    from unifuse.model import UniFuse, UniFuseConfig
    torch.manual_seed(0)
    model = UniFuse(UniFuseConfig.tiny())
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 1, 16, 16, 16, generator=g)
    with torch.no_grad(): model(torch.rand(4, 1, 16, 16, 16, generator=g), torch.rand(4, 1, 16, 16, 16, generator=g))
    norm = model.dapl.reader.norm
    assert bool(norm.initialised) and not torch.equal(norm.running_var, torch.ones_like(norm.running_var))
    model.train(train_mode)
    state = copy.deepcopy(model.state_dict())

    def probs(d, r):
        model.load_state_dict(state)                                         # every call starts from the same statistics
        with torch.no_grad(): return model(d, r)["probs"][:1]

    alone = probs(x[:1], x[1:2])                                             # B = 1: never moves the statistics
    for mates in (x[2:4], x[3:5], x[[4, 2, 3]]):
        both = probs(torch.cat([x[:1], mates]), torch.cat([x[1:2], mates.flip(0)]))
        torch.testing.assert_close(both, alone, atol=1e-5, rtol=0)
        assert torch.equal(norm.running_mean, state["dapl.reader.norm.running_mean"]) != train_mode   # training moves them


def test_running_norm_statistics():
    "The first batch sets μ, σ²; later batches move them by the momentum, after being normalised with the old ones."
    from unifuse.dapl import RunningNorm
    n = RunningNorm(3, momentum=0.25)
    z1 = torch.tensor([[0., 1, 2], [2, 3, 10]])
    out = n(z1)
    torch.testing.assert_close(n.running_mean, torch.tensor([1., 2, 6]))
    torch.testing.assert_close(n.running_var, torch.tensor([1., 1, 16]))
    torch.testing.assert_close(out, (z1 - n.running_mean) / torch.sqrt(n.running_var + n.eps))
    z2 = torch.tensor([[4., 2, 6], [6, 2, 6]])
    out2 = n(z2)                                                             # normalised with the first batch's statistics
    torch.testing.assert_close(out2, (z2 - torch.tensor([1., 2, 6])) / torch.sqrt(torch.tensor([1., 1, 16]) + n.eps))
    torch.testing.assert_close(n.running_mean, torch.tensor([1., 2, 6]) * 0.75 + torch.tensor([5., 2, 6]) * 0.25)
    torch.testing.assert_close(n.running_var, torch.tensor([1., 1, 16]) * 0.75 + torch.tensor([1., 0, 0]) * 0.25)
    before = n.running_mean.clone()
    n(torch.rand(1, 3)); n(torch.rand(4, 3), update=False); n.eval(); n(torch.rand(4, 3))   # B = 1, update off, eval
    assert torch.equal(n.running_mean, before)
    fresh = RunningNorm(3)
    fresh(torch.rand(1, 3))                                                  # one sample has no variance: no set-up
    assert not bool(fresh.initialised)


def test_loss_moves_statistics_with_the_training_pair_only():
    "A training step's second DAPL pass (the clean pair of L_moda) leaves the read-out's statistics alone."
    import copy
    from unifuse.model import UniFuse, UniFuseConfig
    from unifuse.degrade import make_batch
    torch.manual_seed(0)
    model = UniFuse(UniFuseConfig.tiny())
    x = torch.rand(4, 1, 16, 16, 16)
    with torch.no_grad(): model.loss(make_batch(x[:2], x[2:], "mri", generator=0))   # first training batch: set-up
    state = copy.deepcopy(model.state_dict())
    batch = make_batch(x[2:], x[:2], ["ct", "pet"], generator=1)
    with torch.no_grad(): model.loss(batch)
    after_loss = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model.load_state_dict(state)
    with torch.no_grad(): model(batch["ref"], batch["deg"])                  # the training pair alone
    after_pair = {k: v for k, v in model.state_dict().items() if "running" in k}
    assert after_loss.keys() == after_pair.keys() and len(after_loss) == 2
    for k in after_loss:
        assert not torch.equal(after_loss[k], state[k])
        torch.testing.assert_close(after_loss[k], after_pair[k], atol=1e-6, rtol=1e-5)
