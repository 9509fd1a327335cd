"""The sensing models, each a StagedModel that can be cut at every stage boundary.

Audio (FSDD, log-mel 1x40x101): a DeepEar-scale CNN (about 1.8 M parameters, 86 M MACs per
window). Its early convolutions produce activations larger than the input (cutting there costs
bandwidth), the pooled convolutions shrink them, and the fully connected stages are tiny on the
wire but hold most of the parameters, which is where DeepX-style SVD compression pays.

Inertial (UCI HAR raw windows 9x128 at 50 Hz): a 1-D CNN of the "From Smart to Deep" kind
(about 1.6 M parameters, 25 M MACs per window) with the same shape of trade-off.

Split-aware models (what is served and run on devices): the teacher above, with its head (the
first two or three stages, 95% of the audio model's compute) replaced by a bottleneck ``encoder``
(two small convolutions ending in a quantiser: 1-4% of the teacher's MACs) and a ``decoder`` that
rebuilds the teacher's activation after conv3, trained by head network distillation (see
:mod:`pipelines.bottleneck` and ``pipelines.training.train_student``). Cut 1 sends the quantised
code; the teacher's later cuts stay. The two FSDD models share one encoder (trained jointly on both
tasks), so one upload of a window's code serves speaker and digit.

Cut k means the device runs stages [0, k); see pipelines/stages.py. What each model is (its dataset,
classes, training schedule: `ModelSpec`, `MODEL_SPECS`, `get_spec`) lives in pipelines/specs.py,
which a device without torch reads; it is re-exported here.
"""

from __future__ import annotations

from torch import nn

from pipelines import features
from pipelines.bottleneck import Encoder, Quantizer

# What each model is (no torch there): re-exported, so `from pipelines.models import get_spec` works.
from pipelines.specs import FSDD_DIGITS, FSDD_SPEAKERS, MODEL_SPECS, UCI_HAR_ACTIVITIES, ModelSpec, get_spec
from pipelines.stages import StagedModel

__all__ = [
    "AUDIO_CODE_CHANNELS",
    "CODE_MAX_SYMBOL",
    "FSDD_DIGITS",
    "FSDD_SPEAKERS",
    "HND_TARGET_STAGE",
    "IMU_CODE_CHANNELS",
    "MODEL_SPECS",
    "UCI_HAR_ACTIVITIES",
    "ModelSpec",
    "build_audio_cnn",
    "build_audio_encoder",
    "build_audio_student",
    "build_imu_cnn",
    "build_imu_student",
    "get_spec",
]


def _conv2d(cin: int, cout: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def _conv1d(cin: int, cout: int, kernel: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv1d(cin, cout, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm1d(cout),
        nn.ReLU(),
    ]
    if pool:
        layers.append(nn.MaxPool1d(2))
    return nn.Sequential(*layers)


def _fc(cin: int, cout: int, flatten: bool = False, dropout: float = 0.3) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()] if flatten else []
    layers += [nn.Linear(cin, cout), nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


def build_audio_cnn(name: str, class_names: tuple[str, ...]) -> StagedModel:
    # 40x101 -> conv1 32x40x101 -> conv2 (pool) 48x20x50 -> conv3 (pool) 64x10x25 -> conv4 (pool) 96x5x12
    stages = [
        ("conv1", _conv2d(1, 24, pool=False)),
        ("conv2", _conv2d(24, 48, pool=True)),
        ("conv3", _conv2d(48, 64, pool=True)),
        ("conv4", _conv2d(64, 96, pool=True)),
        ("fc1", _fc(96 * 5 * 12, 256, flatten=True)),
        ("fc2", _fc(256, 256)),
        ("classifier", nn.Linear(256, len(class_names))),
    ]
    return StagedModel(name, stages, (1, features.N_MELS, features.AUDIO_FRAMES), class_names)


def build_imu_cnn(name: str, class_names: tuple[str, ...], channels: int = 9, length: int = 128) -> StagedModel:
    # 9x128 -> conv1 64x128 -> conv2 (pool) 128x64 -> conv3 (pool) 256x32 -> conv4 (pool) 256x16
    stages = [
        ("conv1", _conv1d(channels, 64, 5, pool=False)),
        ("conv2", _conv1d(64, 128, 7, pool=True)),
        ("conv3", _conv1d(128, 256, 5, pool=True)),
        ("conv4", _conv1d(256, 256, 3, pool=True)),
        ("fc1", _fc(256 * (length // 8), 256, flatten=True)),
        ("fc2", _fc(256, 128)),
        ("classifier", nn.Linear(128, len(class_names))),
    ]
    return StagedModel(name, stages, (channels, length), class_names)


AUDIO_CODE_CHANNELS = 8  # code 8 x 10 x 25 = 2000 symbols per window (the input is 40 x 101)
IMU_CODE_CHANNELS = 8  # code 8 x 32 = 256 symbols per window (the input is 9 x 128)
CODE_MAX_SYMBOL = 15  # symbols in -15..15


def build_audio_encoder() -> Encoder:
    # 1x40x101 -(3x3 stride 2)-> 16x20x51 -(pool)-> 16x10x25 -(3x3)-> 8x10x25: 0.15 M + 0.29 M MACs, 1.3 k
    # parameters, a 127.5 KiB fp32 peak layer by layer: small enough for a Cortex-M4 sensor node
    # (pipelines/devices.py).
    body = nn.Sequential(
        nn.Conv2d(1, 16, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, AUDIO_CODE_CHANNELS, 3, padding=1),
    )
    return Encoder(body, Quantizer(AUDIO_CODE_CHANNELS, CODE_MAX_SYMBOL))


def build_audio_student(name: str, class_names: tuple[str, ...]) -> StagedModel:
    teacher = build_audio_cnn(name, class_names)
    t = dict(zip(teacher.stage_names, teacher.stages, strict=True))
    decoder = nn.Sequential(  # code 8x10x25 -> 64x10x25, what the teacher has after conv3
        nn.Conv2d(AUDIO_CODE_CHANNELS, 64, 3, padding=1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
    )
    stages = [("encoder", build_audio_encoder()), ("decoder", decoder)]
    stages += [(s, t[s]) for s in ("conv4", "fc1", "fc2", "classifier")]
    return StagedModel(name, stages, teacher.input_shape, class_names)


def build_imu_student(name: str, class_names: tuple[str, ...], channels: int = 9, length: int = 128) -> StagedModel:
    teacher = build_imu_cnn(name, class_names, channels, length)
    t = dict(zip(teacher.stage_names, teacher.stages, strict=True))
    body = nn.Sequential(  # 9x128 -> 64x64 -> 8x32: 0.37 M + 0.16 M MACs (the teacher's conv1, pooled)
        nn.Conv1d(channels, 64, 5, padding=2, bias=False),
        nn.BatchNorm1d(64),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Conv1d(64, IMU_CODE_CHANNELS, 5, padding=2),
        nn.MaxPool1d(2),
    )
    decoder = nn.Sequential(  # code 8x32 -> 256x32, what the teacher has after conv3
        nn.Conv1d(IMU_CODE_CHANNELS, 128, 5, padding=2, bias=False),
        nn.BatchNorm1d(128),
        nn.ReLU(),
        nn.Conv1d(128, 256, 5, padding=2, bias=False),
        nn.BatchNorm1d(256),
        nn.ReLU(),
    )
    stages = [("encoder", Encoder(body, Quantizer(IMU_CODE_CHANNELS, CODE_MAX_SYMBOL))), ("decoder", decoder)]
    stages += [(s, t[s]) for s in ("conv4", "fc1", "fc2", "classifier")]
    return StagedModel(name, stages, teacher.input_shape, class_names)


# The teacher stage whose output the decoder rebuilds (head network distillation's target), per builder.
HND_TARGET_STAGE = "conv3"
