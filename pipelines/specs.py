"""What each sensing model is, without building it: `ModelSpec`, `MODEL_SPECS`, `get_spec`.

No torch here (a device without torch reads these: its replay source, group names, the CLI). The
`build` and `build_teacher` callables import the PyTorch builders of :mod:`pipelines.models` only
when called; :mod:`pipelines.models` re-exports everything in this module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pipelines.numpy_features import SAMPLE_RATE_HZ, WINDOW_SAMPLES
from splitsense.errors import ModelError

if TYPE_CHECKING:
    from pipelines.stages import StagedModel

__all__ = [
    "FSDD_DIGITS",
    "FSDD_SPEAKERS",
    "MODEL_SPECS",
    "UCI_HAR_ACTIVITIES",
    "ModelSpec",
    "get_spec",
]

FSDD_SPEAKERS = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")
FSDD_DIGITS = tuple(str(d) for d in range(10))
UCI_HAR_ACTIVITIES = (
    "walking",
    "walking_upstairs",
    "walking_downstairs",
    "sitting",
    "standing",
    "laying",
)


@dataclass(frozen=True)
class ModelSpec:
    """What a model is trained on and how; `build` makes an untrained StagedModel."""

    name: str
    modality: Literal["audio", "inertial"]
    dataset: str
    task: str
    class_names: tuple[str, ...]
    build: Callable[[], StagedModel]  # the split-aware (student) model: what is served and run
    build_teacher: Callable[[], StagedModel]  # the plain model it is distilled from
    epochs: int  # chosen so that training takes a few minutes on 2 CPU cores
    lr: float
    window_s: float  # how much sensor time one window covers (audio: one clip; IMU: 128 samples at 50 Hz)
    student_epochs: int  # head network distillation + fine-tuning (each a share of these)
    rate_weight: float  # loss weight per kbit of the code (the rate-accuracy trade-off)
    # Models whose encoder is trained jointly with this one's and shipped identical: one upload of the
    # code at cut 1 serves all of them (the FSDD speaker and digit tasks share the microphone).
    encoder_group: tuple[str, ...] = ()


# The builders live in pipelines/models.py (torch): imported when a model is built, not before.


def _audio_student(name: str, class_names: tuple[str, ...]) -> Callable[[], StagedModel]:
    def build() -> StagedModel:
        from pipelines.models import build_audio_student

        return build_audio_student(name, class_names)

    return build


def _audio_teacher(name: str, class_names: tuple[str, ...]) -> Callable[[], StagedModel]:
    def build() -> StagedModel:
        from pipelines.models import build_audio_cnn

        return build_audio_cnn(name, class_names)

    return build


def _imu_student(name: str, class_names: tuple[str, ...]) -> Callable[[], StagedModel]:
    def build() -> StagedModel:
        from pipelines.models import build_imu_student

        return build_imu_student(name, class_names)

    return build


def _imu_teacher(name: str, class_names: tuple[str, ...]) -> Callable[[], StagedModel]:
    def build() -> StagedModel:
        from pipelines.models import build_imu_cnn

        return build_imu_cnn(name, class_names)

    return build


MODEL_SPECS: dict[str, ModelSpec] = {
    "fsdd_speaker": ModelSpec(
        name="fsdd_speaker",
        modality="audio",
        dataset="fsdd",
        task="speaker identification (6 speakers)",
        class_names=FSDD_SPEAKERS,
        build=_audio_student("fsdd_speaker", FSDD_SPEAKERS),
        build_teacher=_audio_teacher("fsdd_speaker", FSDD_SPEAKERS),
        epochs=12,
        lr=2e-3,
        window_s=WINDOW_SAMPLES / SAMPLE_RATE_HZ,
        student_epochs=16,
        rate_weight=0.02,
        encoder_group=("fsdd_speaker", "fsdd_digit"),
    ),
    "fsdd_digit": ModelSpec(
        name="fsdd_digit",
        modality="audio",
        dataset="fsdd",
        task="spoken digit / keyword (10 digits)",
        class_names=FSDD_DIGITS,
        build=_audio_student("fsdd_digit", FSDD_DIGITS),
        build_teacher=_audio_teacher("fsdd_digit", FSDD_DIGITS),
        epochs=16,
        lr=2e-3,
        window_s=WINDOW_SAMPLES / SAMPLE_RATE_HZ,
        student_epochs=16,
        rate_weight=0.02,
        encoder_group=("fsdd_speaker", "fsdd_digit"),
    ),
    "uci_har": ModelSpec(
        name="uci_har",
        modality="inertial",
        dataset="uci_har",
        task="activity recognition (6 activities)",
        class_names=UCI_HAR_ACTIVITIES,
        build=_imu_student("uci_har", UCI_HAR_ACTIVITIES),
        build_teacher=_imu_teacher("uci_har", UCI_HAR_ACTIVITIES),
        epochs=30,
        lr=1e-3,
        window_s=128 / 50.0,
        student_epochs=40,
        rate_weight=0.005,
    ),
}


def get_spec(name: str) -> ModelSpec:
    try:
        return MODEL_SPECS[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(MODEL_SPECS)}") from None
