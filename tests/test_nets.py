"""Networks: shapes, configuration round trips, time conditioning, presets and gradient flow."""

import json
import math

import pytest
import torch

from ddpm.errors import ConfigError
from ddpm.nets import (
    MLP,
    UNET_PRESETS,
    UNet,
    build_unet,
    count_parameters,
    timestep_embedding,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These nets are tiny: one thread is faster, and immune to OpenMP stalls on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# A few-thousand-parameter UNet with the full structure: 2 levels, attention, skips, resampling.
TOY = dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,))


def toy_unet(**overrides) -> UNet:
    torch.manual_seed(0)
    return UNet(**{"in_channels": 1, "image_size": 8, **TOY, **overrides})


def unzero(net: torch.nn.Module) -> torch.nn.Module:
    """Give the zero-initialised layers random weights, so that the output is not identically 0."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    return net


@pytest.mark.parametrize(
    "in_channels, image_size, channel_mult, attention",
    [
        (1, 8, (1, 2), (4,)),
        (3, 8, (1, 2), (4,)),
        (1, 28, (1, 2, 2), (7,)),
        (3, 32, (1, 2, 2), (8,)),
    ],
)
def test_unet_forward_and_backward_keep_the_input_shape(
    in_channels, image_size, channel_mult, attention
):
    torch.manual_seed(0)
    net = UNet(
        in_channels=in_channels,
        image_size=image_size,
        base_channels=8,
        channel_mult=channel_mult,
        num_res_blocks=1,
        attention_resolutions=attention,
    )
    x = torch.randn(2, in_channels, image_size, image_size, requires_grad=True)
    out = net(x, torch.tensor([0, 999]))
    assert out.shape == x.shape
    out.square().sum().backward()
    assert x.grad.shape == x.shape


def test_learn_sigma_doubles_the_output_channels():
    net = toy_unet(in_channels=3, learn_sigma=True)
    assert net(torch.randn(2, 3, 8, 8), torch.tensor([1, 2])).shape == (2, 6, 8, 8)


def test_out_channels_overrides_the_default():
    net = toy_unet(in_channels=3, out_channels=5)
    assert net(torch.randn(2, 3, 8, 8), torch.tensor([1, 2])).shape == (2, 5, 8, 8)


def test_float_timesteps_are_accepted_and_match_integer_ones():
    net = unzero(toy_unet())
    x = torch.randn(2, 1, 8, 8)
    assert torch.allclose(net(x, torch.tensor([3, 7])), net(x, torch.tensor([3.0, 7.0])))


def test_image_size_not_divisible_by_the_downsampling_factor_raises_config_error():
    with pytest.raises(ConfigError, match="image size 30 is not divisible by 4"):
        UNet(image_size=30, channel_mult=(1, 2, 2))


def test_forward_rejects_wrong_channel_count_and_size():
    net = toy_unet()
    with pytest.raises(ValueError, match="expects input"):
        net(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="built for 8x8 images"):
        net(torch.randn(2, 1, 7, 7), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="timesteps"):
        net(torch.randn(2, 1, 8, 8), torch.tensor([1, 2, 3]))


def test_config_is_json_and_rebuilds_the_same_parameter_shapes():
    net = build_unet("small", in_channels=3, image_size=28, learn_sigma=True)
    config = json.loads(json.dumps(net.config))
    rebuilt = UNet(**config)
    shapes = {k: v.shape for k, v in net.state_dict().items()}
    assert shapes == {k: v.shape for k, v in rebuilt.state_dict().items()}
    rebuilt.load_state_dict(net.state_dict())  # strict: same names too


def test_timestep_embedding_shape_range_and_first_columns():
    t = torch.tensor([0, 1, 500, 999])
    emb = timestep_embedding(t, 32)
    assert emb.shape == (4, 32)
    assert emb.abs().max() <= 1.0
    # Frequency w_0 = 1: columns 0 and 16 are cos(t) and sin(t).
    assert torch.allclose(emb[:, 0], torch.cos(t.double()).float(), atol=1e-5)
    assert torch.allclose(emb[:, 16], torch.sin(t.double()).float(), atol=1e-5)


def test_timestep_embedding_follows_the_formula_at_the_lowest_frequency():
    t = torch.tensor([123.0])
    emb = timestep_embedding(t, 8, max_period=10000)
    w = 10000 ** (-3 / 4)  # i = half - 1 = 3
    assert emb[0, 3].item() == pytest.approx(math.cos(123 * w), abs=1e-5)
    assert emb[0, 7].item() == pytest.approx(math.sin(123 * w), abs=1e-5)


def test_timestep_embedding_gives_distinct_timesteps_distinct_embeddings():
    emb = timestep_embedding(torch.arange(1000), 64)
    distances = torch.cdist(emb, emb)
    distances.fill_diagonal_(float("inf"))
    assert distances.min() > 1e-2


def test_timestep_embedding_pads_an_odd_dimension_with_zeros():
    emb = timestep_embedding(torch.tensor([5, 6]), 7)
    assert emb.shape == (2, 7)
    assert torch.equal(emb[:, 6], torch.zeros(2))


def test_unet_output_depends_on_t():
    net = unzero(toy_unet())
    x = torch.randn(1, 1, 8, 8).expand(2, 1, 8, 8)
    out = net(x, torch.tensor([10, 900]))
    assert (out[0] - out[1]).abs().max() > 1e-3


def test_unet_starts_at_zero_output_as_ho_et_al():
    net = toy_unet()
    assert torch.equal(net(torch.randn(2, 1, 8, 8), torch.tensor([1, 2])), torch.zeros(2, 1, 8, 8))


def test_gradients_reach_every_parameter_after_the_zero_init_has_moved():
    net = toy_unet(dropout=0.1)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    x, t, eps = torch.randn(4, 1, 8, 8), torch.randint(0, 1000, (4,)), torch.randn(4, 1, 8, 8)
    # Zeroed layers block the gradient to everything before them; each step opens one more layer.
    for _ in range(3):
        optimizer.zero_grad()
        (net(x, t) - eps).square().mean().backward()
        optimizer.step()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []


def test_unknown_preset_raises_config_error_naming_the_known_ones():
    with pytest.raises(ConfigError, match="cifar10.*small.*tiny"):
        build_unet("huge", in_channels=1, image_size=32)


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_preset_builds_and_runs(name):
    size = 8 if name == "tiny" else 28
    net = build_unet(name, in_channels=1, image_size=size)
    assert net(torch.randn(2, 1, size, size), torch.tensor([0, 1])).shape == (2, 1, size, size)


def test_preset_overrides_win():
    net = build_unet("small", in_channels=1, image_size=32, dropout=0.3, num_heads=2)
    assert net.config["dropout"] == 0.3 and net.config["num_heads"] == 2


def test_cifar10_preset_has_the_papers_35_7m_parameters():
    net = build_unet("cifar10", in_channels=3, image_size=32)
    assert count_parameters(net) == pytest.approx(35.7e6, abs=0.1e6)
    assert net.config["attention_resolutions"] == [16] and net.config["dropout"] == 0.1


def test_small_preset_has_diffusers_peers_2_7m_parameters_within_10_percent():
    for in_channels in (1, 3):
        n = count_parameters(build_unet("small", in_channels=in_channels, image_size=32))
        assert n == pytest.approx(2.73e6, rel=0.1)


def test_presets_are_plain_data():
    assert set(UNET_PRESETS) == {"tiny", "small", "cifar10", "ho2020"}
    json.dumps(UNET_PRESETS)


def test_mlp_shapes_and_learn_sigma():
    torch.manual_seed(0)
    x, t = torch.randn(5, 3), torch.randint(0, 1000, (5,))
    assert MLP(dim=3)(x, t).shape == (5, 3)
    assert MLP(dim=3, learn_sigma=True)(x, t).shape == (5, 6)


def test_mlp_config_rebuilds_it_and_output_depends_on_t():
    torch.manual_seed(0)
    net = MLP(dim=2, hidden=32, num_layers=2, time_embed_dim=16)
    rebuilt = MLP(**json.loads(json.dumps(net.config)))
    rebuilt.load_state_dict(net.state_dict())
    x = torch.randn(1, 2).expand(2, 2)
    out = rebuilt(x, torch.tensor([0, 500]))
    assert (out[0] - out[1]).abs().max() > 1e-4


def test_mlp_rejects_the_wrong_dimension():
    with pytest.raises(ValueError, match="expects input"):
        MLP(dim=2)(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))


def test_count_parameters_counts_trainable_scalars():
    layer = torch.nn.Linear(3, 4)
    assert count_parameters(layer) == 16
    layer.bias.requires_grad_(False)
    assert count_parameters(layer) == 12


# --------------------------------------------------------------------------------------------------
# the optional class input: an embedding of num_classes + 1 entries (the last = null) added to e(t)
# --------------------------------------------------------------------------------------------------


def conditional_pair(kind: str, num_classes: int = 3):
    """(unconditional, conditional) nets of one architecture, built from the same seed."""
    if kind == "unet":
        return unzero(toy_unet()), unzero(toy_unet(num_classes=num_classes))
    torch.manual_seed(0)
    plain = MLP(dim=2, hidden=32, num_layers=2, time_embed_dim=16)
    torch.manual_seed(0)
    return plain, MLP(dim=2, hidden=32, num_layers=2, time_embed_dim=16, num_classes=num_classes)


def inputs(kind: str, batch: int = 4):
    torch.manual_seed(2)
    x = torch.randn(batch, 1, 8, 8) if kind == "unet" else torch.randn(batch, 2)
    return x, torch.randint(0, 1000, (batch,))


@pytest.mark.parametrize("kind", ["unet", "mlp"])
def test_the_class_embedding_adds_only_its_table_and_is_added_to_the_time_embedding(kind):
    plain, cond = conditional_pair(kind)
    assert plain.class_embed is None and "num_classes" not in plain.config
    assert plain.null_label is None and cond.null_label == 3
    emb_dim = 4 * TOY["base_channels"] if kind == "unet" else 32
    assert count_parameters(cond) == count_parameters(plain) + 4 * emb_dim
    # Every other weight is the unconditional net's (the table is built last) ...
    shared = {k: v for k, v in cond.state_dict().items() if not k.startswith("class_embed")}
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in shared.items())
    # ... so with a zero table the conditional net is the unconditional one, bit for bit.
    with torch.no_grad():
        cond.class_embed.weight.zero_()
    x, t = inputs(kind)
    assert torch.equal(cond(x, t, torch.tensor([0, 1, 2, 3])), plain(x, t))


@pytest.mark.parametrize("kind", ["unet", "mlp"])
def test_conditional_net_responds_to_labels_and_none_means_null(kind):
    _, net = conditional_pair(kind)
    x, t = inputs(kind)
    x, t = x[:1].expand(4, *x.shape[1:]), t[:1].expand(4)
    out = net(x, t, torch.tensor([0, 1, 2, 3]))
    for i in range(3):
        assert (out[i] - out[i + 1]).abs().max() > 1e-4
    assert torch.equal(net(x, t), net(x, t, torch.full((4,), net.null_label)))


@pytest.mark.parametrize("kind", ["unet", "mlp"])
def test_conditional_config_rebuilds_the_same_net(kind):
    _, net = conditional_pair(kind)
    config = json.loads(json.dumps(net.config))
    assert config["num_classes"] == 3
    rebuilt = type(net)(**config)
    rebuilt.load_state_dict(net.state_dict())
    x, t = inputs(kind)
    labels = torch.tensor([2, 0, 3, 1])
    assert torch.equal(rebuilt(x, t, labels), net(x, t, labels))


@pytest.mark.parametrize("kind", ["unet", "mlp"])
def test_bad_class_input_raises_config_error(kind):
    plain, net = conditional_pair(kind)
    x, t = inputs(kind)
    with pytest.raises(ConfigError, match="unconditional"):
        plain(x, t, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ConfigError, match=r"\[0, 3\] \(3 = null\)"):
        net(x, t, torch.tensor([0, 1, 2, 4]))
    with pytest.raises(ConfigError, match="shape"):
        net(x, t, torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match="integer"):
        net(x, t, torch.zeros(4))
    with pytest.raises(ConfigError, match="num_classes"):
        type(net)(**{**net.config, "num_classes": 0})


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx.float() - exact).norm() / exact.norm())


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_bf16_autocast_output_and_gradients_agree_with_fp32(name):
    """bf16 keeps 8 significant bits (relative rounding 2^-9 per value); through a few dozen layers
    the errors add up (here ~2% in the output, ~3% in the gradients). Stated tolerance: relative L2
    error below 5% for the output, below 10% for all parameter gradients taken together."""
    net = unzero(build_unet(name, in_channels=1, image_size=16))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 16, 16, generator=g)
    t = torch.randint(0, 1000, (4,), generator=g)
    target = torch.randn(4, 1, 16, 16, generator=g)
    results = {}
    for dtype in (None, torch.bfloat16):
        net.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            out = net(x, t)
        ((out.float() - target) ** 2).mean().backward()
        grads = torch.cat([p.grad.flatten() for p in net.parameters()])
        results[dtype] = (out.detach().float(), grads)
    (out32, grad32), (out16, grad16) = results[None], results[torch.bfloat16]
    assert relative_error(out16, out32) < 0.05
    assert relative_error(grad16, grad32) < 0.10


CL = torch.channels_last


@pytest.mark.parametrize("size", [8, 32])  # below and at layers.CHANNELS_LAST_NORM_MIN_POSITIONS
def test_group_norm_of_a_channels_last_map_is_the_nchw_norm_in_channels_last(size):
    from ddpm.nets.layers import group_norm

    norm = group_norm(48)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = 3 + 2 * torch.randn(4, 48, size, size, generator=torch.Generator().manual_seed(0))
    y = norm(x.contiguous(memory_format=CL))
    assert y.is_contiguous(memory_format=CL) and not y.is_contiguous()
    expected = torch.nn.functional.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def _channels_last_inputs(net: torch.nn.Module) -> list[bool]:
    """Record, for every GroupNorm call of ``net``, whether its input was channels_last (NHWC)."""
    seen = []
    for module in net.modules():
        if isinstance(module, torch.nn.GroupNorm):
            module.register_forward_hook(
                lambda m, i, o: seen.append(
                    i[0].is_contiguous(memory_format=CL) and not i[0].is_contiguous()
                )
            )
    return seen


@pytest.mark.parametrize("channels", [1, 3])
def test_the_channels_last_copy_computes_what_the_net_computes_in_nhwc(channels):
    net = unzero(build_unet("tiny", in_channels=channels, image_size=16))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    clone = net.channels_last_copy()
    seen = _channels_last_inputs(clone)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, channels, 16, 16, generator=g)
    t = torch.randint(0, 1000, (4,), generator=g)
    with torch.no_grad():
        expected, out = net(x, t), clone(x, t)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert out.is_contiguous()  # handed back in NCHW
    assert seen and all(seen)  # with one input channel too, whose NCHW and NHWC strides coincide
    # the original is untouched: same values, NCHW weights, still trainable
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]) and value.is_contiguous()
    assert all(p.requires_grad for p in net.parameters())
    assert not any(p.requires_grad for p in clone.parameters())


def test_the_channels_last_copy_agrees_with_the_net_in_bf16_to_bf16_accuracy():
    """Stated tolerance as for bf16 against fp32 above: relative L2 error below 5%."""
    net = unzero(build_unet("small", in_channels=3, image_size=32))
    clone = net.channels_last_copy()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 32, 32, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    with torch.no_grad():
        exact = net(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = clone(x, t)
    assert relative_error(out, exact) < 0.05
