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
    assert not torch.allclose(out["feat_d_hat"], out["feat_d"])
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
    from unifuse.model import UniFuse, UniFuseConfig
    torch.manual_seed(0)
    model = UniFuse(UniFuseConfig.tiny())
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 1, 16, 16, 16, generator=g)
    with torch.no_grad(): model(torch.rand(4, 1, 16, 16, 16, generator=g), torch.rand(4, 1, 16, 16, 16, generator=g))
    assert bool(model.dapl.reader.norm.initialised)                          # the read-out's one-time set-up
    model.train(train_mode)
    with torch.no_grad():
        alone = model(x[:1], x[1:2])["probs"]
        for mates in (x[2:4], x[3:5], x[[4, 2, 3]]):
            both = model(torch.cat([x[:1], mates[:, :, :, :, :]]), torch.cat([x[1:2], mates.flip(0)]))["probs"][:1]
            torch.testing.assert_close(both, alone, atol=1e-5, rtol=0)


def test_loss_leaves_no_statistics_behind():
    "A training step's second DAPL pass (the clean pair of L_moda) must not change what evaluation sees."
    from unifuse.model import UniFuse, UniFuseConfig
    from unifuse.degrade import make_batch
    torch.manual_seed(0)
    model = UniFuse(UniFuseConfig.tiny())
    x = torch.rand(4, 1, 16, 16, 16)
    with torch.no_grad(): model.loss(make_batch(x[:2], x[2:], "mri", generator=0))   # first training batch: set-up
    model.eval()
    with torch.no_grad(): before = model(x[:1], x[2:3])["probs"]
    model.train()
    with torch.no_grad(): model.loss(make_batch(x[2:], x[:2], ["ct", "pet"], generator=1))
    model.eval()
    with torch.no_grad(): after = model(x[:1], x[2:3])["probs"]
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
    assert not [n for n, _ in model.named_buffers() if "running" in n], "batch statistics in the model"
