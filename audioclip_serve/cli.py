"""``audioclip-embed``: embed a folder of images, a folder of audio files or a text file into an ``.npy``.

    audioclip-embed images DIR -o out.npy --checkpoint synthetic:demo
    audioclip-embed audio DIR -o out.npy --server http://127.0.0.1:8000
    audioclip-embed text FILE.txt -o out.npy            (one text per line; blank lines are skipped)

Writes ``OUT.npy`` (float32 ``[N, 1024]``) and ``OUT.txt``, whose line i names the source of row i
(a path relative to DIR, or ``FILE:LINE``), so rows stay traceable when items are skipped. Folders
are searched recursively in sorted order for known extensions; hidden files are ignored. An item
that cannot be used (undecodable file, text over 77 tokens without ``--truncate``) is reported on
stderr, listed in ``OUT.errors.txt`` and skipped; the exit status is then 1. Exit status 2 means
nothing was written (bad arguments, no inputs, checkpoint or server unusable).

With ``--server`` the running service does the work (through AudioCLIPClient); otherwise the
model runs here (``--checkpoint PATH`` or ``synthetic:NAME``; default ``$AUDIOCLIP_CHECKPOINT`` or
``.cache/AudioCLIP-Full-Training.pt``), building only the one tower it needs.

With ``--ray [ADDRESS]`` a Ray Data job on that cluster (or a local one) embeds images or audio
into a Parquet folder ``-o OUT/`` and resumes where an earlier run on OUT stopped; INPUT may also
be a ``.txt`` manifest of paths or URIs (see ``audioclip_serve.corpus``). ``--embedding-dtype``
writes compact vectors (``audioclip.quantize``) in every mode.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from tqdm.auto import tqdm

from .client import EMBED_DIM

if TYPE_CHECKING:
    from audioclip import AudioCLIP

    from .client import AudioCLIPClient

TOWER = {"images": "image", "audio": "audio", "text": "text"}
MODALITIES = tuple(TOWER)
DEFAULT_BATCH_SIZE = {"images": 16, "audio": 8, "text": 64}
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".heif", ".avif"}
)
# Recordings libsndfile reads, and the containers FFmpeg (PyAV) decodes: phones', browsers', video.
AUDIO_SUFFIXES = frozenset(
    {
        ".wav",
        ".flac",
        ".ogg",
        ".oga",
        ".opus",
        ".mp3",
        ".aif",
        ".aiff",
        ".caf",
        ".w64",
        ".m4a",
        ".aac",
        ".mp4",
        ".mov",
        ".webm",
        ".mkv",
    }
)
DEFAULT_CHECKPOINT = ".cache/AudioCLIP-Full-Training.pt"
_REQUEST_POSITION = re.compile(r"^item \d+: ")


class FatalError(Exception):
    """Nothing useful can be written: the inputs, the checkpoint or the server cannot be used."""


@dataclass(frozen=True)
class Source:
    """One input: ``label`` goes to the sidecar, ``item`` (a file or a text) to the model."""

    label: str
    item: Path | str


@dataclass
class BatchResult:
    """Rows for the ``kept`` positions of a batch (in order; a position repeats for each of its
    windows, whose ``(start_s, end_s)`` are ``spans``) and a message for each failed one."""

    rows: np.ndarray
    kept: list[int]
    failed: list[tuple[int, str]] = field(default_factory=list)
    spans: list[tuple[float, float]] | None = None

    def labels(self, batch: Sequence[Source]) -> list[str]:
        """Each row's sidecar line: its source, and for a window ``<TAB>start_s<TAB>end_s``."""
        if self.spans is None:
            return [batch[i].label for i in self.kept]
        rows = zip(self.kept, self.spans, strict=True)
        return [f"{batch[i].label}\t{a:.3f}\t{b:.3f}" for i, (a, b) in rows]


class Embedder(Protocol):
    def embed(self, items: Sequence[Path | str]) -> BatchResult: ...


def empty_rows() -> np.ndarray:
    return np.zeros((0, EMBED_DIM), dtype=np.float32)


# ---------------------------------------------------------------------------- inputs
def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def folder_sources(root: Path, suffixes: frozenset[str]) -> list[Source]:
    """Files under ``root`` with a known extension, sorted, labelled by their path relative to it."""
    if not root.is_dir():
        raise FatalError(f"{root} is not a folder")
    files = sorted(
        p for p in root.rglob("*") if p.suffix.lower() in suffixes and p.is_file() and not _is_hidden(p, root)
    )
    return [Source(p.relative_to(root).as_posix(), p) for p in files]


def text_sources(path: Path) -> list[Source]:
    """One text per non-blank line, labelled ``FILE:LINE`` (1-based)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise FatalError(f"cannot read {path}: {err}") from err
    return [Source(f"{path.name}:{n}", line) for n, line in enumerate(lines, 1) if line.strip()]


def collect(modality: str, path: Path) -> list[Source]:
    if modality == "text":
        return text_sources(path)
    return folder_sources(path, IMAGE_SUFFIXES if modality == "images" else AUDIO_SUFFIXES)


# ---------------------------------------------------------------------------- in-process model
def load_model(checkpoint: str, modality: str, device: str) -> AudioCLIP:
    """Only the tower this modality needs; a released checkpoint's name must have its sha256."""
    from audioclip import AudioCLIP, AudioCLIPError
    from audioclip.factory import load_weights

    try:
        weights, _ = load_weights(checkpoint)
        return AudioCLIP.from_state_dict(weights, device, (TOWER[modality],))
    except (AudioCLIPError, RuntimeError, ValueError) as err:  # RuntimeError: e.g. no CUDA device
        raise FatalError(f"cannot load {checkpoint!r} on {device}: {err}") from err


def _error_text(err: Exception) -> str:
    """An item's problem without the batch position the library prefixes (``item 3: ...``)."""
    detail = getattr(err, "detail", None)
    return detail if isinstance(detail, str) else str(err)


class LocalEmbedder:
    """Runs the model in this process with the library's pipeline, as the served towers do: decode
    each item (failures are per item), then collate + forward the good ones."""

    def __init__(
        self, model: AudioCLIP, modality: str, normalize: bool, truncate: bool, windows: Any = None
    ) -> None:
        from audioclip.pipeline import DEFAULT_LIMITS, Options, pipelines

        self.model = model
        self.normalize = normalize
        self.options = Options(truncate=truncate, windows=windows)
        self.limits = DEFAULT_LIMITS.for_windows(windows)
        self.pipeline = pipelines()[TOWER[modality]]
        self.reads_files = modality != "text"

    def embed(self, items: Sequence[Path | str]) -> BatchResult:
        from audioclip import InvalidInputError
        from audioclip.model import l2_normalized

        prepared, kept, failed, spans = [], [], [], []
        for i, item in enumerate(items):
            try:
                raw = Path(item).read_bytes() if self.reads_files else item
                decoded = self.pipeline.decode(raw, self.limits, self.options)
            except (InvalidInputError, OSError) as err:
                failed.append((i, _error_text(err)))
                continue
            if self.options.windows is None:
                prepared.append(decoded)
                kept.append(i)
            else:
                parts, times = self._cut(decoded)
                prepared += parts
                kept += [i] * len(parts)
                spans += [(t.start_s, t.end_s) for t in times]
        rows = self.pipeline.embed(self.model, prepared)
        rows = l2_normalized(rows) if self.normalize else rows
        return BatchResult(rows, kept, failed, spans if self.options.windows else None)

    def _cut(self, clip: Any) -> tuple[list, list]:
        """A decoded clip's windows as clips, by the service's rule (``audioclip.windows``)."""
        from audioclip.audio_input import SAMPLE_RATE
        from audioclip.pipeline import AudioItem
        from audioclip.windows import cut

        parts, times = cut(clip.samples, self.options.windows, SAMPLE_RATE)
        return [AudioItem(part) for part in parts], times


# ---------------------------------------------------------------------------- the service
class RemoteEmbedder:
    """Sends each batch as one request; an item the service refuses is dropped and the rest resent."""

    def __init__(
        self,
        client: AudioCLIPClient,
        modality: str,
        normalize: bool,
        truncate: bool,
        window: tuple[float, float | None] | None = None,
    ) -> None:
        self.modality = modality
        self.client = client
        self.normalize = normalize
        self.truncate = truncate
        self.window = window  # (window_s, hop_s) for audio windows
        self.spans: list[tuple[float, float]] | None = None
        self.rows_of: list[int] = []

    def _call(self, payloads: list) -> np.ndarray:
        """Rows for ``payloads``; with windows, ``rows_of`` and ``spans`` say which payload and span."""
        n = len(payloads)
        if self.modality == "text":
            return self.client.embed_text(payloads, self.normalize, self.truncate, batch_size=n)
        if self.modality == "images":
            return self.client.embed_images(payloads, self.normalize, batch_size=n)
        if self.window is None:
            return self.client.embed_audio(payloads, self.normalize, batch_size=n)
        rows, windows = self.client.embed_audio_windows(payloads, *self.window, self.normalize, batch_size=n)
        self.rows_of = [w.item for w in windows]
        self.spans = [(w.start_s, w.end_s) for w in windows]
        return rows

    def _payloads(self, items: Sequence[Path | str]) -> tuple[dict[int, Any], list[tuple[int, str]]]:
        """Texts as they are; files read once here, so a resend does not read them again."""
        if self.modality == "text":
            return dict(enumerate(items)), []
        payloads, failed = {}, []
        for i, path in enumerate(items):
            try:
                payloads[i] = Path(path).read_bytes()
            except OSError as err:
                failed.append((i, str(err)))
        return payloads, failed

    def embed(self, items: Sequence[Path | str]) -> BatchResult:
        from .client import AudioCLIPClientError, AudioCLIPHTTPError

        payloads, failed = self._payloads(items)
        alive = sorted(payloads)
        while alive:
            try:
                rows = self._call([payloads[i] for i in alive])
            except AudioCLIPHTTPError as err:
                if err.index is None or not 0 <= err.index < len(alive):
                    raise FatalError(f"the server refused a batch: {err}") from err
                message = _REQUEST_POSITION.sub("", err.message)
                failed.append((alive.pop(err.index), f"{err.type}: {message}"))
                continue
            except AudioCLIPClientError as err:
                raise FatalError(str(err)) from err
            if self.window is None:
                return BatchResult(rows, alive, failed)
            return BatchResult(rows, [alive[i] for i in self.rows_of], failed, self.spans)
        return BatchResult(empty_rows(), [], failed, [] if self.window else None)


# ---------------------------------------------------------------------------- running
@dataclass
class Outcome:
    rows: list[np.ndarray] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)


def embed_all(sources: list[Source], embedder: Embedder, batch_size: int, progress: bool) -> Outcome:
    """Every source in order, in batches, reporting failures on stderr as they happen."""
    outcome = Outcome()
    with tqdm(total=len(sources), unit="item", disable=not progress, file=sys.stderr) as bar:
        for start in range(0, len(sources), batch_size):
            batch = sources[start : start + batch_size]
            result = embedder.embed([s.item for s in batch])
            outcome.rows.append(np.asarray(result.rows, dtype=np.float32))
            outcome.labels += result.labels(batch)
            for i, message in sorted(result.failed):
                outcome.errors.append((batch[i].label, message))
                tqdm.write(f"audioclip-embed: skipped {batch[i].label}: {message}", file=sys.stderr)
            bar.update(len(batch))
    return outcome


def sidecars(out: Path) -> tuple[Path, Path]:
    """``OUT.txt`` (row sources) and ``OUT.errors.txt`` (skipped items)."""
    return out.with_suffix(".txt"), out.with_suffix(".errors.txt")


def write_outputs(out: Path, outcome: Outcome, embedding_dtype: str = "float32") -> None:
    """The matrix (in ``embedding_dtype``), its row sources and the skipped items; a stale errors
    file from an earlier run is removed so it cannot be mistaken for this run's."""
    from audioclip.quantize import quantize

    rows = np.concatenate([empty_rows(), *outcome.rows])
    assert len(rows) == len(outcome.labels), "every row has exactly one source"
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, quantize(rows, embedding_dtype), allow_pickle=False)
    sources_path, errors_path = sidecars(out)
    sources_path.write_text("".join(f"{label}\n" for label in outcome.labels), encoding="utf-8")
    if outcome.errors:
        lines = (f"{label}\t{' '.join(message.split())}\n" for label, message in outcome.errors)
        errors_path.write_text("".join(lines), encoding="utf-8")
    else:
        errors_path.unlink(missing_ok=True)


def make_embedder(args: argparse.Namespace) -> tuple[Embedder, Callable[[], None]]:
    """The service or the in-process model, and how to release it."""
    if args.server:
        from .client import AudioCLIPClient

        client = AudioCLIPClient(args.server, api_key=args.api_key, timeout=args.timeout)
        window = (args.window, args.hop) if args.window else None
        embedder = RemoteEmbedder(client, args.modality, args.normalize, args.truncate, window)
        return embedder, client.close
    model = load_model(args.checkpoint, args.modality, args.device)
    windows = None
    if args.window:
        from audioclip.windows import WindowSpec

        windows = WindowSpec(args.window, args.hop, "none")
    return LocalEmbedder(model, args.modality, args.normalize, args.truncate, windows), lambda: None


def check_paths(args: argparse.Namespace) -> None:
    """Refuse outputs that would overwrite the input (``texts.txt -o texts.npy``)."""
    if (args.window or args.hop) and args.modality != "audio":
        raise FatalError("--window and --hop cut audio; they do not apply to " + args.modality)
    if args.hop and not args.window:
        raise FatalError("--hop needs --window")
    if args.ray is not None:
        if args.window:
            raise FatalError("--window is not yet offered with --ray; use it in-process or with --server")
        if args.server:
            raise FatalError("--ray and --server are two ways to run; choose one")
        if args.modality == "text":
            raise FatalError("--ray embeds files (images, audio); texts embed in-process or with --server")
        if args.output.suffix == ".npy":
            raise FatalError("with --ray the output is a folder of Parquet files, not an .npy")
        return
    if args.output.suffix != ".npy":
        raise FatalError(f"the output must end with .npy, got {args.output}")
    source = args.input.resolve()
    for path in (args.output, *sidecars(args.output)):
        if path.resolve() == source:
            raise FatalError(f"{path} would overwrite the input; choose another -o")


def parser() -> argparse.ArgumentParser:
    from audioclip.quantize import EMBEDDING_DTYPES

    p = argparse.ArgumentParser(
        prog="audioclip-embed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("modality", choices=MODALITIES, help="what INPUT holds")
    p.add_argument("input", type=Path, help="a folder (images, audio) or a UTF-8 text file (text)")
    p.add_argument("-o", "--output", type=Path, required=True, help="the .npy to write")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--server", help="base URL of audioclip-serve, e.g. http://127.0.0.1:8000")
    where.add_argument(
        "--checkpoint",
        default=os.environ.get("AUDIOCLIP_CHECKPOINT", DEFAULT_CHECKPOINT),
        help="in-process model: a .pt/.safetensors path or synthetic:NAME (default: %(default)s)",
    )
    p.add_argument("--device", default="cpu", help="in-process model: cpu, cuda, cuda:1 ... (default: cpu)")
    p.add_argument(
        "--batch-size", type=int, help="items per batch/request (default: 16 images, 8 audio, 64 text)"
    )
    p.add_argument("--normalize", action="store_true", help="L2-normalise each row")
    p.add_argument(
        "--truncate", action="store_true", help="cut texts over 77 tokens instead of skipping them"
    )
    p.add_argument(
        "--api-key", default=os.environ.get("AUDIOCLIP_API_KEY"), help="with --server (env AUDIOCLIP_API_KEY)"
    )
    p.add_argument("--timeout", type=float, default=300.0, help="with --server: seconds per request")
    p.add_argument(
        "--embedding-dtype",
        choices=EMBEDDING_DTYPES,
        default="float32",
        help="float32, or compact codes (rules in audioclip.quantize) (default: %(default)s)",
    )
    ray_group = p.add_argument_group("a Ray Data job (--ray)")
    ray_group.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="embed on a Ray cluster (ADDRESS, else $RAY_ADDRESS or the running one, else a local one) "
        "into the Parquet folder -o; INPUT may be a .txt manifest of paths/URIs",
    )
    ray_group.add_argument("--actors", type=int, default=1, help="tower actors (default: 1)")
    ray_group.add_argument("--cpus-per-actor", type=float, default=1.0, help="(default: 1)")
    ray_group.add_argument("--gpus-per-actor", type=float, default=0.0, help="(default: 0, CPU towers)")
    p.add_argument(
        "--window",
        type=float,
        metavar="SECONDS",
        help="audio: cut each file into windows this long, a row each; OUT.txt gives each row's "
        "source<TAB>start_s<TAB>end_s",
    )
    p.add_argument(
        "--hop", type=float, metavar="SECONDS", help="with --window: between starts (default: the window)"
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def run_on_ray(args: argparse.Namespace, batch_size: int) -> int:
    """The corpus job; exit status 1 where some files were unusable (listed in ``OUT/_errors.tsv``)."""
    import ray

    from .corpus import ERRORS_FILE, CorpusJob, run

    try:
        job = CorpusJob(
            modality=TOWER[args.modality],
            checkpoint=args.checkpoint,
            output=str(args.output),
            embedding_dtype=args.embedding_dtype,
            normalize=args.normalize,
            actors=args.actors,
            batch_size=batch_size,
            cpus_per_actor=args.cpus_per_actor,
            gpus_per_actor=args.gpus_per_actor,
        )
    except ValueError as err:
        raise FatalError(str(err)) from err
    suffixes = IMAGE_SUFFIXES if args.modality == "images" else AUDIO_SUFFIXES
    ray.init(address=args.ray or None, log_to_driver=False)
    try:
        report = run(job, str(args.input), suffixes)
    except (FileNotFoundError, ValueError) as err:
        raise FatalError(str(err)) from err
    finally:
        ray.shutdown()
    for source, reason in report.first_errors:
        print(f"audioclip-embed: unusable {source}: {reason}", file=sys.stderr)
    if report.unusable > len(report.first_errors):
        print(f"audioclip-embed: ... {report.unusable - len(report.first_errors)} more", file=sys.stderr)
    print(
        f"audioclip-embed: wrote {report.written} rows to {args.output} ({report.unusable} unusable, "
        f"listed in {ERRORS_FILE}; {report.skipped} already there; {report.output_rows} rows in all)",
        file=sys.stderr,
    )
    return 1 if report.unusable else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    batch_size = args.batch_size or DEFAULT_BATCH_SIZE[args.modality]
    if batch_size < 1:
        print("audioclip-embed: error: --batch-size must be >= 1", file=sys.stderr)
        return 2
    try:
        check_paths(args)
        if args.ray is not None:
            return run_on_ray(args, batch_size)
        sources = collect(args.modality, args.input)
        if not sources:
            raise FatalError(f"no {args.modality} inputs found in {args.input}")
        embedder, close = make_embedder(args)
        try:
            outcome = embed_all(sources, embedder, batch_size, args.progress)
        finally:
            close()
    except FatalError as err:
        print(f"audioclip-embed: error: {err}", file=sys.stderr)
        return 2
    write_outputs(args.output, outcome, args.embedding_dtype)
    print(
        f"audioclip-embed: wrote {len(outcome.labels)} rows to {args.output}"
        + (f"; skipped {len(outcome.errors)} (see {sidecars(args.output)[1]})" if outcome.errors else ""),
        file=sys.stderr,
    )
    return 1 if outcome.errors else 0


if __name__ == "__main__":
    sys.exit(main())
