"""Architectures match the paper's Table 4; flat-vector views round-trip."""

import pytest
import torch
from torch import nn

from mpigls.nn import models


def _layers(model):
    return [type(m).__name__ for m in model]


def test_cnn3_table4():
    m = models.build("cnn3", (1, 28, 28), 10)
    convs = [l for l in m if isinstance(l, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [
        (8, (5, 5), (2, 2), (2, 2)),
        (8, (4, 4), (2, 2), (1, 1)),
    ]
    assert _layers(m) == ["Normalize", "Conv2d", "ReLU", "Conv2d", "ReLU", "Flatten", "Linear"]
    assert m[-1].in_features == 8 * 7 * 7 and m[-1].out_features == 10


def test_cnn5_table4():
    m = models.build("cnn5", (3, 32, 32), 10)
    convs = [l for l in m if isinstance(l, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0]) for c in convs] == [
        (16, 5, 2, 2),
        (16, 4, 2, 1),
        (32, 4, 2, 1),
    ]
    fcs = [l for l in m if isinstance(l, nn.Linear)]
    assert [(f.in_features, f.out_features) for f in fcs] == [(32 * 4 * 4, 512), (512, 10)]
    assert _layers(m)[-3:] == ["Linear", "ReLU", "Linear"]


def test_only_allowed_layers():
    for name in models.ARCHITECTURES:
        m = models.build(name, (3, 32, 32), 10)
        assert set(_layers(m)) <= {"Normalize", "Conv2d", "ReLU", "Flatten", "Linear"}
        assert isinstance(m[0], models.Normalize)


def test_affine_layer_without_bias_is_a_clear_error():
    from mpigls.nn.population import stack

    m = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3, bias=False))
    with pytest.raises(TypeError, match="bias"):
        models.unflatten(m, torch.zeros(models.num_params(m)))
    with pytest.raises(TypeError, match="bias"):
        stack(m, None, (1, 2, 2))


def test_unflatten_views_match_parameters():
    m = models.build("cnn3", (1, 8, 8), 10)
    flat = models.flat_params(m)
    assert flat.shape == (models.num_params(m),)
    stack = torch.stack([flat, 2 * flat])
    views = models.unflatten(m, stack)
    assert len(views) == len(m)
    for module, view in zip(m, views):
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            assert torch.equal(view[0][0], module.weight) and torch.equal(view[1][1], 2 * module.bias)
        else:
            assert view is None


def test_load_flat_roundtrip():
    m = models.build("mlp-tiny", (1, 4, 4), 3)
    v = torch.randn(models.num_params(m))
    models.load_flat_(m, v)
    assert torch.equal(models.flat_params(m), v)
    with pytest.raises(ValueError, match="shape"):
        models.load_flat_(m, v[:-1])


def test_normalize_layer_and_bad_input():
    m = models.build("cnn3", (3, 8, 8), 10, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x = torch.rand(2, 3, 8, 8)
    assert torch.allclose(m[0](x), (x - 0.5) / 0.25)
    with pytest.raises(ValueError, match="does not fit input shape"):
        models.build("cnn5", (1, 2, 2), 10)
    with pytest.raises(ValueError, match="model.name"):
        models.build("resnet", (1, 8, 8), 10)


def test_seeded_build_is_not_disturbed_by_other_threads_using_the_global_rng():
    """Ranks run as threads share torch's global generator: a thread restoring its saved state
    (fork_rng) in the middle of another's seeded initialisation used to change that model."""
    import threading

    with models.private_rng(3):
        ref = models.flat_params(models.build("cnn3", (1, 8, 8), 10, [0.5], [0.5]))
    stop, bad = threading.Event(), []

    def disturb():
        while not stop.is_set():
            with models.private_rng():
                torch.rand(1000)

    def build():
        for _ in range(30):
            with models.private_rng(3):
                theta = models.flat_params(models.build("cnn3", (1, 8, 8), 10, [0.5], [0.5]))
            bad.append(not torch.equal(theta, ref))

    threads = [threading.Thread(target=disturb), threading.Thread(target=build)]
    for t in threads:
        t.start()
    threads[1].join()
    stop.set()
    threads[0].join()
    assert len(bad) == 30 and not any(bad)


# ----------------------------------------------------------------------------- a network of one's own


@pytest.fixture
def user_nets(tmp_path, monkeypatch):
    """A package ``usernets_models`` with a few network functions, importable for this test."""
    pkg = tmp_path / "usernets_models"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(
        "from torch import nn\n"
        "def bn_cnn(in_shape, num_classes):\n"
        "    c, h, w = in_shape\n"
        "    return nn.Sequential(\n"
        "        nn.Conv2d(c, 4, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),\n"
        "        nn.Sequential(nn.Flatten(), nn.Linear(4 * ((h + 1) // 2) * ((w + 1) // 2), 6)),\n"
        "        nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, num_classes))\n"
        "def no_args():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 5), nn.ReLU(), nn.Linear(5, 3))\n"
        "def pooled(in_shape, num_classes):\n"
        "    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Sequential(nn.MaxPool2d(2)), nn.Flatten(),\n"
        "                         nn.Linear(18, num_classes))\n"
        "def two_linear(in_shape, num_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 5), nn.Linear(5, num_classes))\n"
        "def relu_last(in_shape, num_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes), nn.ReLU())\n"
        "def not_sequential(in_shape, num_classes):\n"
        "    return nn.Linear(64, num_classes)\n"
        "def wrong_classes(in_shape, num_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes + 1))\n"
        "INSTANCE = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "usernets_models.nets"
    import sys

    for mod in [m for m in sys.modules if m.startswith("usernets_models")]:
        del sys.modules[mod]


def test_a_user_network_with_batchnorm_is_folded_exactly(user_nets):
    """The folded network computes the user's network in eval mode (running statistics)."""
    import importlib

    user = importlib.import_module(user_nets).bn_cnn((1, 8, 8), 3)
    gen = torch.Generator().manual_seed(0)
    for m in user.modules():  # statistics and affine parameters far from the identity
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen))
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=gen))
            m.bias.data.copy_(torch.randn(n, generator=gen))
    layers = models.prepare_custom(user, "x:y")
    assert [type(m).__name__ for m in layers] == ["Conv2d", "ReLU", "Flatten", "Linear", "ReLU", "Linear"]
    assert layers[0].bias is not None  # the bias-free conv got one from its BatchNorm
    x = torch.rand(5, 1, 8, 8, generator=gen)
    with torch.no_grad():
        want = user.eval()(x)
        got = torch.nn.Sequential(*layers)(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_user_network_builds_under_the_seed_and_certifies(user_nets):
    name = f"{user_nets}:bn_cnn"
    with models.private_rng(3):
        a = models.build(name, (1, 8, 8), 3, [0.5], [0.25])
    with models.private_rng(3):
        b = models.build(name, (1, 8, 8), 3, [0.5], [0.25])
    assert torch.equal(models.flat_params(a), models.flat_params(b))  # every rank builds the same
    assert isinstance(a[0], models.Normalize) and float(a[0].mean) == 0.5
    from mpigls import bounds

    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    for method in ("ibp", "deeppoly"):
        lb = bounds.margin_lower_bounds(a, x, y, 0.0, method)  # exact at eps 0: the true margins
        logits = a(x)
        true = torch.stack([logits[i, y[i]] - logits[i, [k for k in range(3) if k != y[i]]] for i in range(4)])
        torch.testing.assert_close(lb, true, rtol=1e-4, atol=1e-4)
    assert models.build(f"{user_nets}:no_args", (1, 8, 8), 3)[-1].out_features == 3
    arch = models.architecture_dict(name, (1, 8, 8), 3, None, None)
    assert arch["layers"][0].startswith("Conv2d(1, 4") and "BatchNorm" not in str(arch["layers"])


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        ("pooled", r"layer 2\.0 \(MaxPool2d"),
        ("two_linear", r"layer 2 \(Linear.*follows another affine layer"),
        ("relu_last", "must end with a Linear layer"),
        ("not_sequential", "returned a Linear, not a torch.nn.Sequential"),
        ("wrong_classes", "needs 3 outputs"),
        ("INSTANCE", "has a Sequential named 'INSTANCE'; name a function"),
        ("missing", "has no attribute 'missing'"),
    ],
)
def test_a_user_network_that_does_not_fit_is_refused_naming_the_layer(user_nets, fn, message):
    with pytest.raises(ValueError, match=message):
        models.build(f"{user_nets}:{fn}", (1, 8, 8), 3)


def test_the_config_takes_a_function_name_and_refuses_anything_else():
    from mpigls import config

    assert config.ModelConfig(name="mypkg.nets:cnn_small").name == "mypkg.nets:cnn_small"
    for bad in ("mypkg.nets", "mypkg.nets:", ":f", "my-pkg:f", "a:b:c", "resnet"):
        with pytest.raises(config.ConfigError, match="package.module:function"):
            config.ModelConfig(name=bad)
    with pytest.raises(ValueError, match="cannot import 'no_such_package_mpigls.nets'.*PYTHONPATH"):
        models.build("no_such_package_mpigls.nets:f", (1, 8, 8), 3)
