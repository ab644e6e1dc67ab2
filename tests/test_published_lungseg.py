"""segmentation.method: pretrained, the lungs-segmentation package's ResNet34 U-Net, with random
weights saved in that package's file format (a plain state dict, torch.save)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from gl_lcm.cli import main
from gl_lcm.data.io import read_image, write_png
from gl_lcm.data.phantom import generate_phantom
from gl_lcm.models.published_lungseg import RESNET34_URL, PublishedLungsUNet, load_published_lungseg
from gl_lcm.segmentation import predict_published_lung_probability, segment_lungs


def published_layout() -> dict:
    """Key -> shape of the released resnet34.pth, written out from the package's model definition:
    Selim's EncoderDecoder with a torchvision-layout ResNet34 (filters 64, 64, 128, 256, 512;
    decoder filters 64, 128, 256, 256; last upsample 64; 2 classes)."""
    from torchvision.models import resnet34

    layout = {}
    stage = {"conv1": "encoder_stages.0.0", "bn1": "encoder_stages.0.1", "layer1": "encoder_stages.1.1",
             "layer2": "encoder_stages.2", "layer3": "encoder_stages.3", "layer4": "encoder_stages.4"}
    for key, value in resnet34(weights=None).state_dict().items():
        head, rest = key.split(".", 1)
        if head in stage:
            layout[f"{stage[head]}.{rest}"] = tuple(value.shape)
    for k, (cin, cout) in enumerate([(128, 64), (256, 128), (256, 256), (512, 256)]):
        layout[f"decoder_stages.{k}.layer.1.weight"] = (cout, cin, 3, 3)
        layout[f"decoder_stages.{k}.layer.1.bias"] = (cout,)
    for i, (cin, cout) in enumerate([(512, 256), (384, 256), (192, 128), (128, 64)]):
        layout[f"bottlenecks.{i}.seq.0.weight"] = (cout, cin, 3, 3)
        layout[f"bottlenecks.{i}.seq.0.bias"] = (cout,)
    layout["last_upsample.layer.1.weight"], layout["last_upsample.layer.1.bias"] = (64, 64, 3, 3), (64,)
    layout["final.0.weight"], layout["final.0.bias"] = (2, 64, 1, 1), (2,)
    return layout


def test_state_dict_has_the_published_layout():
    ours = {k: tuple(v.shape) for k, v in PublishedLungsUNet().state_dict().items()}
    assert ours == published_layout()


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    torch.manual_seed(0)
    model = PublishedLungsUNet()
    path = tmp_path_factory.mktemp("w") / "resnet34.pth"
    torch.save(model.state_dict(), path)  # the package's format: model_zoo.load_url -> load_state_dict
    return path, model


def test_random_weights_load_and_run_as_published(random_weights):
    path, reference = random_weights
    model = load_published_lungseg(path)
    image = generate_phantom(512, 1).cxr * 0.6 + 0.2  # not min-max scaled: the model must rescale it
    prob = predict_published_lung_probability(model, image)
    # the published preprocessing, written out: min-max, 3 channels, 512 x 512, sigmoid
    x = (image - image.min()) / (image.max() - image.min())
    x = cv2.resize(x.astype(np.float64), (512, 512), interpolation=cv2.INTER_LINEAR)
    batch = torch.from_numpy(np.repeat(x[None], 3, axis=0)[None]).float()
    reference.eval()
    with torch.no_grad():
        expected = torch.sigmoid(reference(batch))[0].amax(dim=0).numpy()
    np.testing.assert_allclose(prob, expected, atol=1e-5)


def test_module_prefix_and_state_dict_wrapper_are_accepted(random_weights, tmp_path):
    path, reference = random_weights
    state = torch.load(path, weights_only=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "wrapped.pth")
    model = load_published_lungseg(tmp_path / "wrapped.pth")
    for a, b in zip(model.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"other\.pth is not the lungs-segmentation resnet34 state dict"):
        load_published_lungseg(tmp_path / "other.pth")


def test_threshold_is_the_published_0_2(monkeypatch):
    import gl_lcm.segmentation.learned as learned
    from gl_lcm.segmentation import NoLungFoundError

    image = generate_phantom(128, 2).cxr
    for level, found in ((0.21, True), (0.19, False)):
        monkeypatch.setattr(learned, "predict_published_lung_probability",
                            lambda model, img, device="cpu": np.full(img.shape, level, np.float32))
        if found:
            assert segment_lungs(image, "pretrained", model=object(), min_area=0).all()
        else:
            with pytest.raises(NoLungFoundError):
                segment_lungs(image, "pretrained", model=object(), min_area=0)


def test_segment_command_with_pretrained_method(random_weights, tmp_path):
    path, _ = random_weights
    torch.manual_seed(2)
    model = PublishedLungsUNet()
    with torch.no_grad():
        model.final[0].weight.zero_()
        model.final[0].bias.fill_(3.0)
    torch.save(model.state_dict(), tmp_path / "resnet34.pth")
    write_png(tmp_path / "in" / "film.png", generate_phantom(256, 3).cxr)
    assert main(["segment", str(tmp_path / "in"), "device=cpu", "segmentation.method=pretrained",
                 f"checkpoints.lungs_segmentation={tmp_path / 'resnet34.pth'}", "-o", str(tmp_path / "seg")]) == 0
    mask, _ = read_image(tmp_path / "seg" / "masks" / "film.png", allow_constant=True)
    assert mask.shape == (256, 256) and mask.min() == 1.0


def test_missing_weights_file_names_it_and_the_release(tmp_path, capsys):
    write_png(tmp_path / "in" / "film.png", generate_phantom(128, 3).cxr)
    missing = tmp_path / "nope" / "resnet34.pth"
    assert main(["segment", str(tmp_path / "in"), "device=cpu", "segmentation.method=pretrained",
                 f"checkpoints.lungs_segmentation={missing}", "-o", str(tmp_path / "seg")]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and RESNET34_URL in err and "checkpoints.lungs_segmentation" in err
    assert main(["segment", str(tmp_path / "in"), "device=cpu", "segmentation.method=pretrained",
                 "-o", str(tmp_path / "seg")]) == 2
    assert "checkpoints.lungs_segmentation is empty" in capsys.readouterr().err
