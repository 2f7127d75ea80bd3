import torch

from common.model import (
    build_model,
    count_parameters,
    folded_for_inference,
    strip_wrapper_prefixes,
    top_level_names,
)


def test_parameter_count_and_module_names():
    model = build_model()
    assert count_parameters(model) == 11_173_962
    assert top_level_names(model) == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "linear"]
    names = dict(model.named_modules())
    for name in ("layer3.1.conv2", "layer4.0.shortcut", "layer1.1.shortcut", "linear"):
        assert name in names
    # Blocks that change shape carry a 1x1 conv shortcut; the others an identity.
    assert len(model.layer2[0].shortcut) == 2 and len(model.layer2[1].shortcut) == 0


def test_forward_shape_and_no_maxpool():
    model = build_model().eval()
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_wrapper_prefixes_are_stripped():
    model = build_model()
    compiled_ddp_keys = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    assert strip_wrapper_prefixes(compiled_ddp_keys).keys() == model.state_dict().keys()


def test_folded_model_predicts_as_the_trained_one():
    """Inference (evaluate.py, train.py's scoring, ROAD) folds each BatchNorm into its convolution."""
    torch.manual_seed(0)
    model = build_model()
    with torch.no_grad():  # statistics and scales far from their initial 0, 1 and 1
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.2, 2.0)
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.2, 0.2)
    folded = folded_for_inference(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert top_level_names(folded) == top_level_names(model) and not folded.training
    assert model.training and isinstance(model.layer2[0].shortcut[1], torch.nn.BatchNorm2d)  # untouched
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model.eval()(x), rtol=1e-4, atol=1e-5)
