"""ArcFace face embeddings: insightface's IResNet backbone loaded from a local state_dict.

The paper measures stability on faces by the cosine of ArcFace embeddings of same-seed pairs
(briqr/explo-r-it-ing_lfm_stability src/evaluate/evaluate_arcface_similarity.py: insightface's
antelopev2 glintr100 ONNX model, 112x112 inputs in [-1, 1], L2-normalised embeddings). This
module builds the same family in torch, with the parameter names of insightface's
arcface_torch `backbones/iresnet.py`, so its released `backbone.pth` files (e.g. the Glint360K
r100 one) load as they are: a `.safetensors` file or a `torch.load(weights_only=True)` state
dict. The architecture (blocks per stage, base width, embedding size) is read off the file.
Inputs are RGB, as arcface_torch trains them (the paper's script passed BGR to the ONNX model).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lfm_core.errors import ConfigError
from lfm_core.features import FeatureExtractor, to_unit_rgb

ARCFACE_RESOLUTION = 112
BN_EPS = 1e-5
STAGES = 4


class IBasicBlock(nn.Module):
    """BN -> conv3x3 -> BN -> PReLU -> conv3x3 (stride) -> BN, plus the (projected) input."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in, eps=BN_EPS)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out, eps=BN_EPS)
        self.prelu = nn.PReLU(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out, eps=BN_EPS)
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                nn.BatchNorm2d(c_out, eps=BN_EPS),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """insightface IResNet (iresnet18: blocks (2, 2, 2, 2), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3)).

    Images (B, 3, 112, 112) in [-1, 1] -> embeddings (B, num_features); widths base * 1, 2, 4, 8
    (base 64 in insightface), each stage halving the side, so the last map is 7x7.
    """

    def __init__(self, blocks: tuple[int, ...], base_width: int = 64, num_features: int = 512):
        super().__init__()
        widths = [base_width * 2**i for i in range(STAGES)]
        self.conv1 = nn.Conv2d(3, base_width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width, eps=BN_EPS)
        self.prelu = nn.PReLU(base_width)
        c_in = base_width
        for i, (width, count) in enumerate(zip(widths, blocks, strict=True), start=1):
            layer = [
                IBasicBlock(c_in if j == 0 else width, width, 2 if j == 0 else 1)
                for j in range(count)
            ]
            setattr(self, f"layer{i}", nn.Sequential(*layer))
            c_in = width
        self.bn2 = nn.BatchNorm2d(widths[-1], eps=BN_EPS)
        side = ARCFACE_RESOLUTION // 2**STAGES
        self.dropout = nn.Dropout(0.0)
        self.fc = nn.Linear(widths[-1] * side * side, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=BN_EPS)

    def forward(self, x: Tensor) -> Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        for i in range(1, STAGES + 1):
            x = getattr(self, f"layer{i}")(x)
        return self.features(self.fc(self.dropout(self.bn2(x).flatten(1))))


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise ConfigError(f"arcface: weights file {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file is one line for the user
        raise ConfigError(f"arcface: cannot read {str(path)!r} ({type(err).__name__})") from None


def load_iresnet(path: str | Path) -> IResNet:
    """An IResNet with the weights of a state_dict file, its architecture read from the keys.

    Raises:
        ConfigError: a missing or unreadable file, or one that is not an IResNet state dict.
    """
    state = _read_state_dict(Path(path).expanduser())
    state = {k.removeprefix("module."): v for k, v in state.items()}  # DDP-saved files
    try:
        blocks = tuple(
            1 + max(int(m.group(1)) for k in state if (m := re.match(rf"layer{i}\.(\d+)\.", k)))
            for i in range(1, STAGES + 1)
        )
        model = IResNet(blocks, state["conv1.weight"].shape[0], state["fc.weight"].shape[0])
        model.load_state_dict(state)
    except (KeyError, ValueError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"arcface: {str(path)!r} is not an IResNet state dict ({reason})"
        ) from None
    return model.eval().requires_grad_(False)


class ArcFaceFeatures(FeatureExtractor):
    """L2-normalised ArcFace embeddings (D = the backbone's num_features, 512 in insightface)."""

    def __init__(self, weights_path: str | Path | None):
        if weights_path is None:
            raise ConfigError(
                "arcface: needs path= a local IResNet state dict (.pth or .safetensors), e.g. "
                "insightface arcface_torch's glint360k r100 backbone.pth"
            )
        backbone = load_iresnet(weights_path)
        super().__init__("arcface", backbone.fc.out_features)
        self.backbone = backbone

    def embed(self, images: Tensor) -> Tensor:
        pixels = to_unit_rgb(images, ARCFACE_RESOLUTION) * 2 - 1
        return F.normalize(self.backbone(pixels), dim=1)
