"""Typed application arguments: what a serve config's ``args`` may say, with defaults.

The deployments receive typed objects built from these (``TowerArgs``, ``Limits``, ``AppArgs``),
never loose dicts; every default is stated once, here or in the library it comes from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from audioclip.backends import Backend, check_backend
from audioclip.factory import TowerBuild
from audioclip.pipeline import DEFAULT_LIMITS, Limits, Pipeline, pipelines

Tower = Literal["image", "text", "audio"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AutoscalingSettings(_Strict):
    """Serve's ``autoscaling_config`` for one deployment: replicas follow the requests in flight."""

    min_replicas: int = Field(
        1, ge=0, description="0: scale to zero when idle (the next request cold-starts)"
    )
    initial_replicas: int | None = Field(None, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0.0, description="requests in flight per replica")
    upscale_delay_s: float = Field(30.0, ge=0.0)
    downscale_delay_s: float = Field(600.0, ge=0.0)
    look_back_period_s: float = Field(30.0, gt=0.0)
    metrics_interval_s: float = Field(10.0, gt=0.0)

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingSettings:
        initial = self.min_replicas if self.initial_replicas is None else self.initial_replicas
        if not self.min_replicas <= initial <= self.max_replicas:
            raise ValueError(
                f"need min_replicas <= initial_replicas <= max_replicas, got "
                f"{self.min_replicas} <= {initial} <= {self.max_replicas}"
            )
        return self


class _Replicated(_Strict):
    """A fixed ``num_replicas``, or ``num_replicas: auto`` with an ``autoscaling`` section."""

    num_replicas: int | Literal["auto"] = Field(1, description="a count, or auto (see autoscaling)")
    autoscaling: AutoscalingSettings | None = None

    @model_validator(mode="after")
    def _one_way(self) -> _Replicated:
        if self.autoscaling is not None and self.num_replicas not in ("auto", 1):
            raise ValueError(
                "give num_replicas or autoscaling, not both (num_replicas: auto with autoscaling)"
            )
        if isinstance(self.num_replicas, int) and self.num_replicas < 1:
            raise ValueError("num_replicas must be at least 1 (scale to zero: autoscaling.min_replicas 0)")
        if self.num_replicas == "auto" and self.autoscaling is None:
            self.autoscaling = AutoscalingSettings()
        return self

    def replica_options(self) -> dict:
        """Serve's deployment options for the replica count."""
        if self.autoscaling is None:
            return {"num_replicas": self.num_replicas}
        return {"autoscaling_config": self.autoscaling.model_dump(exclude_none=True)}

    @property
    def min_replicas(self) -> int:
        return self.autoscaling.min_replicas if self.autoscaling else int(self.num_replicas)

    @property
    def max_replicas(self) -> int:
        return self.autoscaling.max_replicas if self.autoscaling else int(self.num_replicas)


class TowerSettings(_Replicated):
    """Placement, replicas and batching of one tower deployment."""

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
    backend: Backend = Field(
        "eager",
        description="runtime of the tower's heavy part (audioclip.backends): eager PyTorch, onnxruntime"
        " (text, image) or openvino (text, image, audio; with dtype bf16, text and image run bf16 where"
        " the CPU has it); CPU, graphs cached by checkpoint sha256",
    )
    int8: bool = Field(False, description="int8 on onnxruntime: dynamic for text, calibrated QDQ for image")
    graph_cache: str | None = Field(None, description="exported graphs' folder; default ~/.cache/audioclip")
    spin_wait: bool | None = Field(
        None,
        description="onnxruntime's idle threads spin before sleeping; default: off for text, on for image",
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

    def build(self, audio_norm: str) -> TowerBuild:
        """How the tower's model is built (on CUDA where it has GPUs and the replica finds one)."""
        return TowerBuild(
            device="cuda" if self.num_gpus > 0 else "cpu",
            dtype=self.dtype,
            channels_last=self.channels_last,
            fold_batchnorm=self.fold_batchnorm,
            audio_norm=audio_norm,
            backend=self.backend,
            int8=self.int8,
            threads=self.torch_threads,
            graph_cache=self.graph_cache,
            spin_wait=self.spin_wait,
        )


class LimitSettings(_Strict):
    """Request limits: the body's bytes, checked as it streams in, and the library's ``Limits``,
    checked while decoding (from the header where it tells), wherever decoding happens."""

    max_items: int = Field(DEFAULT_LIMITS.max_items, ge=1)
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    max_pixels: int = Field(DEFAULT_LIMITS.max_pixels, ge=1)
    max_audio_seconds: float = Field(DEFAULT_LIMITS.max_audio_seconds, gt=0.0)
    max_text_chars: int = Field(DEFAULT_LIMITS.max_text_chars, ge=1)
    max_windows: int = Field(DEFAULT_LIMITS.max_windows, ge=1, description="audio windows per request")
    max_windowed_audio_seconds: float = Field(
        DEFAULT_LIMITS.max_windowed_audio_seconds, gt=0.0, description="a clip's length when windowed"
    )

    @property
    def items(self) -> Limits:
        return Limits(
            self.max_items,
            self.max_pixels,
            self.max_audio_seconds,
            self.max_text_chars,
            self.max_windows,
            self.max_windowed_audio_seconds,
        )


class RouterSettings(_Replicated):
    graceful_shutdown_timeout_s: float = Field(
        120.0,
        gt=0.0,
        description="a router being replaced finishes its requests for this long; they may wait for a"
        " tower replica that a rollout is starting (Serve stops a one-replica deployment's old replica"
        " before its new one is up)",
    )
    num_cpus: float = Field(1.0, ge=0.0)
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources (placement)")
    decode_threads: int = Field(2, ge=1, description="threads decoding images and audio")
    chunks_in_flight: int = Field(
        8, ge=1, description="tower batches of one request sent at once (bounds a long clip's copies)"
    )
    coalesce_calls: int = Field(
        0,
        ge=0,
        description="router-side batching: calls in flight per tower before later requests share the next"
        " one (deployments/coalesce.py); 0: one call per request",
    )
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
    limits: LimitSettings = Field(default_factory=LimitSettings)

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

    @model_validator(mode="after")
    def _backends_apply(self) -> AppArgs:
        """A runtime other than eager runs on the CPU in fp32, or in bf16 / int8 where offered, audio
        with running norms."""
        for name in self.towers:
            tower = self.tower(name)
            if tower.backend == "eager":  # dtype is PyTorch's own (a GPU setting)
                check_backend(name, tower.backend, "int8" if tower.int8 else "fp32")
                continue
            check_backend(name, tower.backend, tower.build(self.audio_norm).precision)
            if tower.num_gpus > 0:
                raise ValueError(f"{name} backend {tower.backend} runs on the CPU: no num_gpus")
            if name == "audio" and self.audio_norm != "running":
                raise ValueError(f"audio backend {tower.backend} needs audio_norm 'running'")
        return self

    def tower(self, name: str) -> TowerSettings:
        return getattr(self, name)

    def pipelines(self) -> dict[str, Pipeline]:
        return pipelines(self.router.fast_decode, self.fixed_clip_seconds)

    def tower_args(self, name: Tower) -> TowerArgs:
        """What a tower's constructor takes: only what needs a restart to change (batching changes
        live through ``user_config``)."""
        tower = self.tower(name)
        return TowerArgs(
            tower=name,
            build=tower.build(self.audio_norm),
            threads=tower.torch_threads,
            limits=self.limits.items,
            pipeline=self.pipelines()[name],
        )


@dataclass(frozen=True)
class TowerArgs:
    """A tower replica's constructor arguments."""

    tower: Tower
    build: TowerBuild
    threads: int
    limits: Limits  # for items that reach the tower undecoded (a handle call straight to it)
    pipeline: Pipeline


@dataclass(frozen=True)
class Batching:
    """A tower's ``user_config``: changes apply to running replicas, without a restart."""

    max_batch_size: int
    batch_wait_timeout_s: float

    @classmethod
    def of(cls, tower: TowerSettings) -> Batching:
        return cls(tower.max_batch_size, tower.batch_wait_timeout_s)
