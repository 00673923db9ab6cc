"""ONNX export with preprocessing inside, parity against torch on real images, MACs, checkpoints."""


import onnx
import pytest
import torch
from torch import nn

from littlebig.data import load_fashion_mnist, resize_images
from littlebig.export.macs import count_macs, macs_saved
from littlebig.export.models import (
    Preprocessed,
    create_classifier,
    data_config,
    load_classifier,
    save_checkpoint,
)
from littlebig.export.onnx_export import PARITY_MAX_ABS, ParityError, check_parity, export_onnx


@pytest.fixture(scope="module")
def real_images():
    return load_fashion_mnist("val").images[:64]


# Two architectures other than the default pair's, at other resolutions; one is a ViT.
ARCHS = [
    ("deit_tiny_patch16_224", None, (28, 28, 1)),  # timm's own cfg: 224, bicubic, crop 0.875, 3 channels
    (
        "efficientnet_b0",
        {
            "input_size": (3, 96, 96),
            "interpolation": "bilinear",
            "mean": (0.5, 0.5, 0.5),
            "std": (0.25, 0.25, 0.25),
            "crop_pct": 0.875,
            "crop_mode": "center",
        },
        (40, 32, 3),
    ),
]


@pytest.mark.parametrize("name,cfg,service", ARCHS, ids=[a[0] for a in ARCHS])
def test_parity_on_other_architectures(tmp_path, real_images, name, cfg, service):
    torch.manual_seed(0)
    model = create_classifier(name, num_classes=10, in_chans=3, pretrained_cfg=cfg).eval()
    net = Preprocessed(model, service)
    path = export_onnx(net, tmp_path / f"{name}.onnx")
    graph = onnx.load(str(path)).graph
    inp, out = graph.input[0], graph.output[0]
    assert inp.name == "IMAGE" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim][1:] == list(service)
    assert inp.type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    assert out.name == "LOGITS" and out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    parity = check_parity(net, path, resize_images(real_images, service), batch_sizes=(1, 16))
    assert parity.max_abs <= PARITY_MAX_ABS and parity.argmax_agreement == 1.0


def test_preprocessing_follows_the_data_config():
    model = create_classifier("efficientnet_b0", num_classes=10, pretrained_cfg=ARCHS[1][1])
    net = Preprocessed(model, (40, 32, 3))
    # shorter side 32 -> floor(96 / 0.875) = 109, aspect kept; centre crop 96 x 96
    assert net.resize_to == (136, 109) and net.crop == (20, 6, 96, 96) and net.mode == "bilinear"
    assert data_config(model)["input_size"] == [3, 96, 96]


def test_parity_failure_is_loud(tmp_path, real_images):
    model = create_classifier(
        "resnet10t",
        num_classes=10,
        in_chans=1,
        pretrained_cfg={
            "input_size": (1, 32, 32),
            "interpolation": "bilinear",
            "mean": (0.5,),
            "std": (0.5,),
            "crop_pct": 1.0,
            "crop_mode": "center",
        },
    ).eval()
    net = Preprocessed(model, (28, 28, 1))
    path = export_onnx(net, tmp_path / "m.onnx")
    with torch.no_grad():
        model.fc.weight.add_(1.0)  # torch now differs from the exported file
    with pytest.raises(ParityError, match="ONNX differs from torch"):
        check_parity(net, path, real_images)


def test_macs_of_a_hand_computable_net():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    # conv: 8*8 outputs * 4 channels * (1*3*3) = 2304; linear: 256 * 10 = 2560
    assert count_macs(net, (1, 8, 8)) == 2304 + 2560
    assert macs_saved(1.0, 100.0, 0.2) == pytest.approx(1 - 21 / 100)


def test_checkpoint_roundtrip_keeps_cfg_and_weights(tmp_path):
    cfg = {
        "input_size": (1, 32, 32),
        "interpolation": "bicubic",
        "mean": (0.3,),
        "std": (0.4,),
        "crop_pct": 1.0,
        "crop_mode": "center",
    }
    model = create_classifier("mobilenetv3_small_050", num_classes=3, in_chans=1, pretrained_cfg=cfg).eval()
    path = tmp_path / "m.safetensors"
    save_checkpoint(model, path, name="mobilenetv3_small_050", class_names=["a", "b", "c"], extra={"epochs": 1})
    loaded, names = load_classifier(str(path))
    assert names == ["a", "b", "c"]
    assert data_config(loaded) == data_config(model)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model.half().float()(x), atol=1e-5)  # fp16 storage
    with pytest.raises(ValueError, match="holds a mobilenetv3_small_050, not a resnet18"):
        load_classifier(str(path), "resnet18")


def test_committed_checkpoints_describe_themselves():
    from littlebig.export.models import RECIPES, checkpoint_metadata, default_checkpoint
    from littlebig.export.pipeline import ROLES

    for role in (*ROLES, "middle"):
        recipe, meta = RECIPES[role], checkpoint_metadata(default_checkpoint(role))
        assert meta["model"] == recipe.model and meta["num_classes"] == 10
        assert meta["pretrained_cfg"]["input_size"] == list(recipe.input_size)
        # The training summary the checkpoints' README quotes: a finished run, with its accuracies.
        extra = meta["extra"]
        assert extra["epochs_done"] == extra["epochs"] and len(extra["history"]) == extra["epochs"]
        assert 0.8 < extra["val_acc"] <= 1 and 0.8 < extra["test_acc"] <= 1
    total = sum(default_checkpoint(r).stat().st_size for r in ROLES)
    assert total <= 25 * 10**6  # "25 MB together at most" for the pair, decimal (the middle is extra: its README)
