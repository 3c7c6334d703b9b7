"The configuration: the paper preset is the paper's model, and every combination either builds and runs or is refused."
import random
import pytest
import torch
from unifuse.model import UniFuse, UniFuseConfig

PAPER = dict(ufrf_lora=0.948e6, ufrf_experts=2.986e6)                       # §4.5: ALSN and Multi-Experts variants of UFR&F


def test_paper_preset_has_the_papers_parameter_counts():
    "UFR&F within 3% of 0.948 M with ALSN and within 5% of 2.986 M with multi-expert BaseNets (a 68.22% saving)."
    lora = UniFuse(UniFuseConfig()).num_params()["ufrf"]
    experts = UniFuse(UniFuseConfig(alsn="experts")).num_params()["ufrf"]
    assert abs(lora / PAPER["ufrf_lora"] - 1) < 0.03, lora
    assert abs(experts / PAPER["ufrf_experts"] - 1) < 0.05, experts
    assert abs((1 - lora / experts) - 0.6822) < 0.02                      # "reduces the parameter scale by 68.22%"


def test_tiny_preset_keeps_its_size():
    assert UniFuse(UniFuseConfig.tiny()).num_params()["total"] < 200_000


@pytest.mark.parametrize("bad, field", [(dict(fa_channels=44, fa_heads=3), "fa_heads"),
                                         (dict(ufrf_channels=(8, 16, 99), ufrf_head_dim=48), "ufrf_head_dim"),
                                         (dict(ufrf_channels=(8,)), "ufrf_channels"),
                                         (dict(colour="yes"), "colour"),
                                         (dict(ufrf_ffn_expand=0), "ufrf_ffn_expand"),
                                         (dict(loss_weights={"reg": -1}), "loss_weights"),
                                         (dict(loss_weights={"reg": float("nan")}), "loss_weights"),
                                         (dict(patch=0), "patch"), (dict(n_regblk=7), "n_regblk")])
def test_unbuildable_combinations_are_named(bad, field):
    with pytest.raises(ValueError, match=field):
        UniFuseConfig.tiny(**bad)


def test_random_configs_build_or_are_refused_up_front():
    "Random combinations of sizes and switches: each is refused by the config, or builds and runs one forward."
    rnd = random.Random(0)
    choices = dict(enc_channels=[1, 2, 4], patch=[1, 2, 3, 4], embed_dim=[8, 12, 16, 20], d_state=[2, 4, 8],
                   expand=[1, 2], n_classes=[2, 3, 4], prompt_len=[1, 3], oufr_layers=[1, 2, 4], oufr_expand=[1, 2],
                   n_regblk=list(range(6)), fa_channels=[6, 8, 12, 15], fa_heads=[1, 2, 3, 4], fa_window=[1, 2, 5],
                   ufrf_channels=[(4, 8), (6, 9, 12), (8, 12, 16, 24)], ufrf_head_dim=[4, 5, 8, 16],
                   ufrf_ffn_expand=[0.5, 1.0, 2.66], lora_rank=[1, 3], dapl=["full", "A", "B", "C"],
                   oufr=["spatial_mamba", "mamba", "transformer", "none"], alsn=["lora", "none", "experts"], colour=[False, True])
    built = refused = 0
    for i in range(24):
        kw = {k: rnd.choice(v) for k, v in choices.items()}
        try: cfg = UniFuseConfig(**kw)
        except ValueError:
            refused += 1; continue
        torch.manual_seed(i)
        model = UniFuse(cfg).eval()
        x = torch.rand(1, 1, 12, 12, 12)
        with torch.no_grad(): out = model(x, x)
        assert out["fused"].shape == (1, 1, 12, 12, 12) and torch.isfinite(out["fused"]).all(), kw
        built += 1
    assert built >= 8 and refused >= 2, (built, refused)


def test_paper_preset_costs_the_papers_flops():
    "The forward of one 256³ pair within 5% of the paper's 395 GFLOPs, counted exactly on `meta` (multiply-add = 2)."
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        model = UniFuse(UniFuseConfig()).eval()
        x = torch.empty(1, 1, 256, 256, 256)
    with torch.no_grad(), FlopCounterMode(display=False) as fc: model(x, x)
    assert abs(fc.get_total_flops() / 395e9 - 1) < 0.05, fc.get_total_flops() / 1e9
