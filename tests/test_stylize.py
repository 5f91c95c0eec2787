"""Neural style transfer: losses as the course writes them, the image as the only parameter."""

import argparse

import pytest
import torch
from PIL import Image

from divekit.errors import DivekitError
from divekit.models.style import StyleFeatures, resolve_vgg19, vgg19_features
from divekit.tasks.stylize import gram, stylize, tv_loss

SIZE = (40, 56)


def test_gram_matches_the_hand_written_formula():
    torch.manual_seed(0)
    Y = torch.randn(1, 4, 3, 5, dtype=torch.float64)
    c, n = 4, 15
    want = torch.zeros(c, c, dtype=torch.float64)
    for i in range(c):
        for j in range(c):
            want[i, j] = sum(Y[0, i].flatten()[k] * Y[0, j].flatten()[k] for k in range(n)) / (c * n)
    torch.testing.assert_close(gram(Y)[0], want)


def test_tv_loss_matches_the_hand_written_formula():
    torch.manual_seed(1)
    X = torch.randn(1, 2, 4, 5, dtype=torch.float64)
    down = [abs(X[0, c, i + 1, j] - X[0, c, i, j]) for c in range(2) for i in range(3) for j in range(5)]
    right = [abs(X[0, c, i, j + 1] - X[0, c, i, j]) for c in range(2) for i in range(4) for j in range(4)]
    want = 0.5 * (sum(down) / len(down) + sum(right) / len(right))
    torch.testing.assert_close(tv_loss(X), torch.as_tensor(want, dtype=torch.float64))


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return StyleFeatures(vgg19_features(), (25,), (0, 5, 10, 19, 28))


def test_twenty_steps_lower_the_loss_and_leave_the_network_untouched(net, tmp_path):
    before = {k: v.clone() for k, v in net.state_dict().items()}
    result = stylize("astronaut", "chelsea", size=SIZE, steps=20, net=net, device="cpu",
                     out=tmp_path / "out.png", save_every=10)
    total = result.history["total"]
    assert len(total) == 20 and total[-1] < total[0]
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical
    assert all(p.grad is None and not p.requires_grad for p in net.parameters())
    assert result.image.shape == (3, *SIZE)
    with Image.open(tmp_path / "out.png") as img:
        assert img.size == (SIZE[1], SIZE[0])
    for name in ("out.losses.png", "out.panel.png", "out.step0010.png"):
        assert (tmp_path / name).is_file()


def test_targets_are_detached_and_the_image_is_the_only_parameter(net):
    content = torch.rand(3, 30, 30, requires_grad=True)
    result = stylize(content, torch.rand(3, 30, 30), size=24, steps=2, net=net, device="cpu")
    assert content.grad is None and not result.image.requires_grad


def test_weights_file_loads_with_weights_only(tmp_path):
    torch.manual_seed(3)
    source = vgg19_features()
    state = {f"features.{k}": v for k, v in source.state_dict().items()}  # torchvision's names
    state["classifier.0.weight"] = torch.zeros(2, 2)
    torch.save(state, tmp_path / "vgg19.pth")
    features, described = resolve_vgg19(tmp_path / "vgg19.pth")
    assert "vgg19.pth" in described
    assert all(torch.equal(a, b) for a, b in zip(features.state_dict().values(), source.state_dict().values()))
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "small.pth")
    with pytest.raises(DivekitError, match="not a VGG-19 weight file"):
        resolve_vgg19(tmp_path / "small.pth")
    torch.save({"net": argparse.Namespace(x=1)}, tmp_path / "pickled.pth")  # code, not weights
    with pytest.raises(DivekitError, match="weights_only=True"):
        resolve_vgg19(tmp_path / "pickled.pth")


def test_no_weights_offline_is_one_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # no cached file there
    _, described = resolve_vgg19(None)
    assert described.startswith("random")
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(lines) == 1 and "random weights" in lines[0] and "\n" not in lines[0]


def test_bad_input_is_one_clear_line(net, tmp_path):
    with pytest.raises(DivekitError, match="cannot read image .*missing.png.*no such file"):
        stylize(tmp_path / "missing.png", "chelsea", size=SIZE, steps=1, net=net)
    (tmp_path / "junk.jpg").write_text("not a picture")
    with pytest.raises(DivekitError, match="cannot read image"):
        stylize("astronaut", tmp_path / "junk.jpg", size=SIZE, steps=1, net=net)
    with pytest.raises(DivekitError, match="--style-layers: layer 37 is past the network's end"):
        stylize("astronaut", "chelsea", size=SIZE, steps=1, style_layers="0,37")
    with pytest.raises(DivekitError, match="--content-layers: layer 99 is past"):
        StyleFeatures(vgg19_features(), (99,), (0,))
    with pytest.raises(DivekitError, match="--size"):
        stylize("astronaut", "chelsea", size="tiny", steps=1, net=net)
    Image.new("RGB", (8, 8)).save(tmp_path / "in.png")
    with pytest.raises(DivekitError, match="refusing to overwrite the input file"):
        stylize(tmp_path / "in.png", "chelsea", size=SIZE, steps=1, net=net, out=tmp_path / "in.png")


def test_cli_stylize_runs_and_prints(tmp_path, capsys, monkeypatch):
    from divekit.cli import dense

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    parser = argparse.ArgumentParser()
    dense.add_commands(parser.add_subparsers(), argparse.ArgumentParser(add_help=False))
    args = parser.parse_args(["stylize", "coffee", "rocket", "-o", str(tmp_path / "o.png"),
                              "--size", "32x48", "--steps", "3", "--style-layers", "0,5",
                              "--content-layers", "7", "--device", "cpu"])
    args.handler(args)
    out = capsys.readouterr().out
    assert "3 steps" in out and "random VGG-19 weights" in out
    with Image.open(tmp_path / "o.png") as img:
        assert img.size == (48, 32)
