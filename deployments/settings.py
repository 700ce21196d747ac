"""Typed application arguments: what a serve config's ``args`` may say, with defaults."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Tower = Literal["image", "text", "audio"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TowerSettings(_Strict):
    """Placement and batching of one tower deployment."""

    num_replicas: int = Field(1, ge=1)
    num_gpus: float = Field(0.0, ge=0.0)
    num_cpus: float = Field(1.0, ge=0.0)
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources (placement)")
    threads: int | None = Field(None, ge=1, description="torch threads; default: the replica's CPU share")
    dtype: Literal["fp32", "fp16", "bf16"] | None = None
    channels_last: bool | None = Field(
        None, description="NHWC conv weights; default: on for audio (1.16-1.26x on CPU), and for image on GPU"
    )
    fold_batchnorm: bool | None = Field(
        None,
        description="fold BatchNorm into the convs (audio 1.11x, image 1.06x on CPU); default: where the"
        " conv weights are copied anyway (NHWC), never for audio_norm per_clip",
    )
    max_batch_size: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0.0)
    max_ongoing_requests: int | None = Field(None, ge=1, description="default: 2 x max_batch_size")

    @property
    def torch_threads(self) -> int:
        return self.threads or max(1, int(self.num_cpus))

    @property
    def ongoing_limit(self) -> int:
        return max(self.max_ongoing_requests or 0, 2 * self.max_batch_size)


def conv_layout(
    tower: str, device: str, channels_last: bool | None, fold_batchnorm: bool | None, audio_norm: str
) -> tuple[bool, bool]:
    """(NHWC weights, BatchNorm folded) for a tower, from its settings or the measured defaults.

    NHWC: on for audio (1.16-1.26x on CPU) and on GPU; image on CPU gains only 1.08-1.09x at batch
    1-8, not worth a private 90 MiB copy of its conv weights per replica. Folding copies the conv
    weights too, so by default it is on exactly where NHWC is; never with per-clip audio statistics.
    Settings that cannot apply are refused earlier, when ``AppArgs`` validates the config.
    """
    if tower == "text":
        return False, False
    nhwc = channels_last if channels_last is not None else (tower == "audio" or device == "cuda")
    foldable = not (tower == "audio" and audio_norm != "running")
    fold = foldable and (nhwc if fold_batchnorm is None else fold_batchnorm)
    return nhwc, fold


class Limits(_Strict):
    """Request limits, enforced in the router before any decoding where possible."""

    max_items: int = Field(256, ge=1)
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    max_pixels: int = Field(50_000_000, ge=1)
    max_audio_seconds: float = Field(300.0, gt=0.0)
    max_text_chars: int = Field(20_000, ge=1)


class RouterSettings(_Strict):
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, ge=0.0)
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources (placement)")
    decode_threads: int = Field(2, ge=1, description="threads decoding images and audio")
    fast_decode: bool = Field(False, description="JPEG draft-mode decoding of large photos (not bit-exact)")
    max_ongoing_requests: int = Field(256, ge=1)
    max_inflight: int = Field(
        192, ge=1, description="embed requests in progress per router; over it: 503 JSON"
    )
    max_queued_requests: int = Field(1024, ge=-1, description="-1: unbounded; over it: 503 + Retry-After")
    retry_after_s: int = Field(1, ge=1)
    api_keys: list[str] = Field(
        default_factory=list, description="if any: /v1/* needs 'Authorization: Bearer'"
    )
    api_key_env: str | None = Field(None, description="name of an env var holding one more accepted key")


class AppArgs(_Strict):
    """The ``args`` of ``deployments.app:build_app``."""

    checkpoint: str = Field("synthetic:demo", description="a .pt/.safetensors path, or synthetic:NAME")
    model_name: str = "audioclip"
    towers: list[Tower] = Field(default_factory=lambda: ["image", "text", "audio"])
    audio_norm: Literal["running", "per_clip"] = "running"
    fixed_clip_seconds: float | None = Field(None, gt=0.0, description="pad/crop clips to this length")
    image: TowerSettings = Field(default_factory=TowerSettings)
    text: TowerSettings = Field(default_factory=TowerSettings)
    audio: TowerSettings = Field(default_factory=lambda: TowerSettings(max_batch_size=8))
    router: RouterSettings = Field(default_factory=RouterSettings)
    limits: Limits = Field(default_factory=Limits)

    @model_validator(mode="after")
    def _towers_unique(self) -> AppArgs:
        if not self.towers or len(set(self.towers)) != len(self.towers):
            raise ValueError(f"towers must be a non-empty list without repeats, got {self.towers}")
        return self

    @model_validator(mode="after")
    def _layout_applies(self) -> AppArgs:
        """Refused when the config is read (``build_app``), not as replicas that fail to start."""
        if self.text.channels_last or self.text.fold_batchnorm:
            raise ValueError("channels_last and fold_batchnorm apply to the image and audio towers only")
        if self.audio.fold_batchnorm and self.audio_norm != "running":
            raise ValueError(
                "audio fold_batchnorm needs audio_norm 'running' (per_clip uses each clip's statistics)"
            )
        return self

    def tower(self, name: str) -> TowerSettings:
        return getattr(self, name)

    def tower_args(self, name: str) -> dict[str, Any]:
        """What a tower's constructor takes: only settings that need a restart (batching changes
        live through ``user_config``)."""
        tower = self.tower(name)
        return {
            "num_gpus": tower.num_gpus,
            "dtype": tower.dtype,
            "torch_threads": tower.torch_threads,
            "channels_last": tower.channels_last,
            "fold_batchnorm": tower.fold_batchnorm,
        }

    def model_options(self) -> dict[str, Any]:
        """Model-wide options every tower gets."""
        return {
            "audio_norm": self.audio_norm,
            "fixed_clip_seconds": self.fixed_clip_seconds,
            "max_audio_seconds": self.limits.max_audio_seconds,
        }
