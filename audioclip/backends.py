"""Inference runtimes for a tower's heavy part: eager PyTorch, ONNX Runtime or OpenVINO.

Each tower has one *hot part* that holds nearly all of its FLOPs and takes one float32 tensor:
the text transformer (``[B, L, 512]`` -> ``[B, L, 512]``), the whole image tower (``[B, 3, 224,
224]`` -> ``[B, 1024]``) and the audio tower from its windowed frames (``[B*C, T, 2048]`` -> FBSP
spectrogram -> convolution trunk -> ``[B*C, 2048]``). Everything around it (tokens, embeddings,
framing, the EOT gather, the last projections) stays in PyTorch, so a runtime changes how the FLOPs
run, never what is computed.

The graph of a hot part is exported from the model as built (batch and length dynamic), once per
checkpoint: graphs are cached under ``cache_dir / <weights sha256> /``, written atomically, and
never downloaded. ``int8`` quantizes the text transformer's MatMuls dynamically with ONNX
Runtime, and the image tower statically (QDQ, activation ranges calibrated on a fixed set of
generated smooth pictures, so the graph is the same on every node); per-channel weights, 7-bit
"reduced range" weights where the CPU has no VNNI instructions, against the u8 x s8 overflow of
AVX2's ``vpmaddubsw``.

Which runtime a tower can use (the conv trunk of the audio tower has adaptive max pools to
shape-dependent sizes, which the ONNX exporters refuse; OpenVINO converts it):

=============  ====================  ====================  =============
backend        fp32                  bf16                  int8
=============  ====================  ====================  =============
eager          text, image, audio    -                     -
onnxruntime    text, image           -                     text, image
openvino       text, image, audio    text, image           -
=============  ====================  ====================  =============

``bf16`` compiles the same OpenVINO graph with bf16 inference precision (weights and matmul/conv
inputs in bf16, accumulation in fp32). It runs bf16 only on CPUs with native bf16 instructions
(AVX512-BF16 or AMX), where it ran 1.6-3.4x OpenVINO fp32 for text and 3.8-5.7x for images (2-vCPU
Xeon with AMX, docs/BENCHMARKS.md); elsewhere emulating it would be slower than fp32, so the graph
runs fp32 and its label says so. (An eager tower's ``dtype`` is PyTorch's own dtype, a
GPU setting, not a graph precision.)
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
from torch import nn

from .image_input import CLIP_MEAN, CLIP_STD

Backend = Literal["eager", "onnxruntime", "openvino"]
BACKENDS: tuple[str, ...] = get_args(Backend)
FP32_TOWERS: dict[str, frozenset[str]] = {
    "eager": frozenset({"text", "image", "audio"}),
    "onnxruntime": frozenset({"text", "image"}),
    "openvino": frozenset({"text", "image", "audio"}),
}
INT8_TOWERS: dict[str, frozenset[str]] = {"onnxruntime": frozenset({"text", "image"})}
# Not audio: its spectrogram front end in bf16 left the golden clips at min cosine 0.993 (text
# 0.99997, image 0.99999), too near the 0.99 bar for weights it was not measured on.
BF16_TOWERS: dict[str, frozenset[str]] = {"openvino": frozenset({"text", "image"})}
_OFFERED: dict[str, dict[str, frozenset[str]]] = {
    "fp32": FP32_TOWERS,
    "bf16": BF16_TOWERS,
    "int8": INT8_TOWERS,
}
GRAPH_FORMAT = 2  # bump when the exported hot parts change, so stale cached graphs are not used
DEFAULT_CACHE_DIR = Path(os.environ.get("AUDIOCLIP_GRAPH_CACHE", "~/.cache/audioclip/graphs")).expanduser()

# Whether idle ONNX Runtime threads spin before sleeping, by tower, where the settings leave it open:
# measured served on 2 cores (docs/BENCHMARKS.md), text queries at c32 150 vs 123 items/s without
# spinning (a short forward's spinning takes the router's cores), photos 19.5 vs 22.7 with it.
SPIN_BY_TOWER = {"text": False, "image": True}
RunGraph = Callable[[np.ndarray], np.ndarray]
logger = logging.getLogger(__name__)


def check_backend(tower: str, backend: str, precision: str = "fp32") -> None:
    """Raise ``ValueError`` naming what is offered when ``backend`` cannot run ``tower`` in ``precision``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if precision in _OFFERED:
        offered = _OFFERED[precision].get(backend, frozenset())
        if tower not in offered:
            towers = ", ".join(sorted(offered)) or "no tower"
            raise ValueError(f"backend {backend} runs {precision} for {towers}, not the {tower} tower")
        return
    runs = [name for name, towers in _OFFERED.items() if tower in towers.get(backend, ())]
    raise ValueError(
        f"backend {backend} runs the {tower} tower in {' or '.join(runs) or 'no precision'}, not {precision}"
    )


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (/proc/cpuinfo; none where it cannot be read)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(word for line in info.splitlines() if line.startswith("flags") for word in line.split())


def cpu_has_vnni() -> bool:
    """Whether this x86 CPU has VNNI (AVX512-VNNI or AVX-VNNI): int8 dot products without overflow."""
    return bool({"avx512_vnni", "avx_vnni"} & cpu_flags())


def cpu_has_bf16() -> bool:
    """Whether this x86 CPU computes in bf16 natively (AVX512-BF16 or AMX-BF16)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


# ---------------------------------------------------------------------------- hot parts
class _AudioFrames(nn.Module):
    """The audio tower's ``embed_frames`` as a module of its own, for export (its weights are the tower's)."""

    def __init__(self, audio: nn.Module) -> None:
        super().__init__()
        self.audio = audio

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.audio.embed_frames(frames)


@dataclass(frozen=True)
class HotPart:
    """What a tower exports: the module, an example input, the dynamic axes of its input and output,
    and where the runtime goes."""

    module: nn.Module
    example: torch.Tensor
    dynamic_axes: dict[int, str]
    output_axes: dict[int, str]
    install: Callable[[nn.Module], None]
    calibration: Callable[[], np.ndarray] | None = None  # int8 inputs for static quantization, else dynamic


def hot_part(model: nn.Module, tower: str) -> HotPart:
    """The hot part of ``tower`` in an ``AudioCLIP`` model (see the module docstring)."""
    if tower == "text":
        text = model.text
        width = text.positional_embedding.shape[1]
        return HotPart(
            text.transformer,
            torch.randn(2, 8, width),
            {0: "batch", 1: "length"},
            {0: "batch", 1: "length"},
            lambda runtime: setattr(text, "transformer", runtime),
        )
    if tower == "image":
        size = model.config.image_resolution
        return HotPart(
            model.visual,
            torch.randn(2, 3, size, size),
            {0: "batch"},
            {0: "batch"},
            lambda runtime: setattr(model, "visual", runtime),
            lambda: calibration_pictures(size=size),
        )
    if tower == "audio":
        audio = model.audio
        with torch.inference_mode():
            frames = audio.waveform_frames(torch.randn(2, 1, 44100) * 3000.0).clone()
            audio.fbsp.cached_weights()  # the filter bank enters the graph as a constant, built once
        return HotPart(
            _AudioFrames(audio),
            frames.contiguous(),
            {0: "batch", 1: "frames"},
            {0: "batch"},
            lambda runtime: setattr(audio, "frames_runtime", runtime),
        )
    raise ValueError(f"unknown tower {tower!r}")


class RuntimeGraph(nn.Module):
    """A hot part run by another runtime: float32 tensor in, float32 tensor out (on the CPU)."""

    def __init__(self, run: RunGraph, label: str) -> None:
        super().__init__()
        self.run = run
        self.label = label

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.run(np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)))

    def extra_repr(self) -> str:
        return self.label


def runtime_label(model: nn.Module, tower: str) -> str:
    """What runs ``tower``'s hot part, as ``/v1/models`` and the benchmarks report it."""
    runtime = runtime_of(model, tower)
    return runtime.label if runtime is not None else "eager PyTorch"


def runtime_of(model: nn.Module, tower: str) -> RuntimeGraph | None:
    """The runtime running ``tower``'s hot part in ``model``, or None where eager PyTorch runs it."""
    part = {
        "text": lambda: model.text.transformer,
        "image": lambda: model.visual,
        "audio": lambda: model.audio.frames_runtime,
    }[tower]()
    return part if isinstance(part, RuntimeGraph) else None


# ---------------------------------------------------------------------------- graph files
def _atomic_write(target: Path, write: Callable[[Path], None]) -> Path:
    """Write through ``write(tmp_dir_path)`` then rename: concurrent replicas never read half a graph."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".tmp-") as tmp:
        staged = Path(tmp) / target.name
        write(staged)
        # OpenVINO writes .xml and .bin: the file that is looked for (``target``) goes in last
        for produced in sorted(Path(tmp).iterdir(), key=lambda path: path.name == target.name):
            os.replace(produced, target.parent / produced.name)
    return target


def _export_onnx(part: HotPart, path: Path) -> None:
    axes = {"x": part.dynamic_axes, "y": part.output_axes}
    torch.onnx.export(
        part.module,
        (part.example,),
        str(path),
        dynamo=False,
        input_names=["x"],
        output_names=["y"],
        dynamic_axes=axes,
        opset_version=18,
    )


def onnx_graph(part: HotPart, folder: Path, stem: str, int8: bool) -> Path:
    """The cached fp32 ONNX graph of a hot part, and its dynamic-int8 version when asked for."""
    fp32 = folder / f"{stem}.onnx"
    if not fp32.exists():
        _atomic_write(fp32, lambda staged: _export_onnx(part, staged))
    if not int8:
        return fp32
    reduce_range = not cpu_has_vnni()
    quantized = folder / f"{stem}.int8{'-rr' if reduce_range else ''}.onnx"
    if not quantized.exists():
        root = logging.getLogger()
        root.addFilter(_quantizer_advice)
        try:
            _atomic_write(quantized, lambda staged: _quantize(fp32, staged, part, reduce_range))
        finally:
            root.removeFilter(_quantizer_advice)
    return quantized


def _quantizer_advice(record: logging.LogRecord) -> bool:
    """Drop the quantizer's own root-logger notes ("consider pre-processing"): not the operator's
    business. Only records logged on the root logger pass here; everything else is untouched."""
    return "onnxruntime" not in Path(record.pathname).parts


def calibration_pictures(count: int = 32, size: int = 224, seed: int = 0) -> np.ndarray:
    """``count`` CLIP-normalised smooth pictures (bicubic 7x7 colour fields plus mild noise):
    deterministic, so every node calibrates the same int8 image graph."""
    rng = np.random.default_rng(seed)
    fields = torch.from_numpy(rng.uniform(0.0, 1.0, (count, 3, 7, 7)))
    pictures = nn.functional.interpolate(fields, size=size, mode="bicubic", align_corners=False).numpy()
    pictures = (pictures + rng.normal(0.0, 0.05, pictures.shape)).clip(0.0, 1.0)
    mean, std = (np.array(values)[:, None, None] for values in (CLIP_MEAN, CLIP_STD))
    return ((pictures - mean) / std).astype(np.float32)


def _quantize(fp32: Path, staged: Path, part: HotPart, reduce_range: bool) -> None:
    """Static QDQ where the hot part brings calibration inputs (the conv image tower: dynamic int8's
    ConvInteger is slower than fp32, docs/BENCHMARKS.md), dynamic MatMuls otherwise (the text
    transformer)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    common = {"weight_type": QuantType.QInt8, "per_channel": True, "reduce_range": reduce_range}
    if part.calibration is None:
        quantize_dynamic(fp32, staged, **common)
        return
    inputs = part.calibration()
    feeds = iter([{"x": inputs[i : i + 4]} for i in range(0, len(inputs), 4)])

    class Batches(CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(feeds, None)

    reader = Batches()
    quantize_static(
        fp32, staged, reader, quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, **common
    )


def openvino_graph(part: HotPart, folder: Path, stem: str) -> Path:
    """The cached OpenVINO IR (``.xml`` + ``.bin``) of a hot part, converted from the module itself."""
    import openvino as ov

    xml = folder / f"{stem}.xml"
    if not xml.exists():
        shape = [-1 if axis in part.dynamic_axes else size for axis, size in enumerate(part.example.shape)]
        with torch.no_grad():
            converted = ov.convert_model(
                part.module, example_input=part.example, input=[ov.PartialShape(shape)]
            )
        _atomic_write(xml, lambda staged: ov.save_model(converted, staged, compress_to_fp16=False))
    return xml


# ---------------------------------------------------------------------------- sessions
def onnxruntime_runner(path: Path, threads: int, spin: bool) -> RunGraph:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle intra-op threads spin for a while before sleeping (ORT's default): lower latency alone, but
    # on a small node that spinning takes the cores the router and proxy need between forwards.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"x": x})[0]


def openvino_runner(path: Path, threads: int, bf16: bool = False) -> tuple[RunGraph, str]:
    """The compiled graph and the precision it really runs in: ``bf16`` only where the CPU has it."""
    import openvino as ov

    # The precision is always explicit: on CPUs with AVX512-BF16 or AMX OpenVINO's default is bf16.
    asked = "bf16" if bf16 and cpu_has_bf16() else "f32"
    compiled = ov.Core().compile_model(
        str(path),
        "CPU",
        {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": asked, "PERFORMANCE_HINT": "LATENCY"},
    )
    request = compiled.create_infer_request()  # one forward at a time per tower (its executor)
    runs = "bf16" if compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.bf16 else "fp32"
    return (lambda x: np.array(request.infer([x])[0], copy=True)), runs


def use_backend(
    model: nn.Module,
    tower: str,
    backend: str,
    *,
    weights_sha256: str,
    threads: int,
    precision: str = "fp32",
    cache_dir: Path | None = None,
    spin: bool | None = None,
) -> str:
    """Swap ``tower``'s hot part in ``model`` for ``backend``'s graph; returns its path ('' for eager).

    ``spin``: ONNX Runtime's idle threads spin before sleeping (None: ``SPIN_BY_TOWER``).
    ``precision`` bf16 runs bf16 where the CPU has it and says in the runtime's label what runs.
    The model must be on the CPU in fp32 with ``running`` audio BatchNorm (the settings check this
    before any replica starts; here it is asserted again, since a wrong graph is a wrong answer).
    """
    check_backend(tower, backend, precision)
    if backend == "eager":
        return ""
    if model.device.type != "cpu":
        raise ValueError(f"backend {backend} runs on the CPU; this model is on {model.device}")
    if tower == "audio" and model.audio_norm != "running":
        raise ValueError("backends other than eager need audio_norm running (per_clip is data-dependent)")
    if getattr(model, "channels_last", False):
        model.use_channels_last(False)  # the runtime picks its own layout; the export wants NCHW
    part = hot_part(model, tower)
    folder = (cache_dir or DEFAULT_CACHE_DIR) / weights_sha256[:32]
    folded = "-folded" if getattr(model, "batchnorm_folded", False) else ""
    stem = f"{tower}{folded}-v{GRAPH_FORMAT}-torch{torch.__version__.split('+')[0]}"
    onnx = backend == "onnxruntime"
    int8 = precision == "int8"
    with warnings.catch_warnings():  # the exporters' deprecation notes are not the operator's business
        warnings.simplefilter("ignore")
        path = onnx_graph(part, folder, stem, int8) if onnx else openvino_graph(part, folder, stem)
    if onnx:
        spin = SPIN_BY_TOWER.get(tower, True) if spin is None else spin
        runner, runs = onnxruntime_runner(path, threads, spin), precision
    else:
        runner, runs = openvino_runner(path, threads, bf16=precision == "bf16")
    note = ""
    if runs != precision:
        why = "OpenVINO compiled fp32" if cpu_has_bf16() else "this CPU has no bf16 instructions"
        note = f" (bf16 asked; {why})"
        logger.warning("%s tower: %s runs fp32%s", tower, backend, note)
    part.install(RuntimeGraph(runner, f"{backend} {runs}{note}: {path.name}"))
    return str(path)
