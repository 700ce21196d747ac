"""A corpus embedded by a Ray Data job: ``audioclip-embed images|audio INPUT -o OUT/ --ray [ADDRESS]``.

An HTTP service is the wrong tool for a million files: every file crosses the proxy, and one
machine's client drives it. Here Ray Data streams the corpus through the cluster instead:

    sources -> skip rows already in OUT -> read + decode (the library's pipeline)
            -> embed (an actor pool of towers, CPU or GPU) -> Parquet files in OUT

Ray Data runs reading and decoding inside the tower actors when both ask for the same resources
(CPU towers: no copy of decoded items between processes), and in CPU tasks beside GPU towers or
towers given more CPUs; the cluster must keep CPUs free of actors for those and the writes.

INPUT is a folder (searched recursively for known extensions; a local path or any URI pyarrow's
filesystems read, e.g. ``s3://bucket/photos``) or a manifest: a ``.txt`` file with one path or URI
per line (relative paths are taken from the manifest's folder; local paths are normalised, so a file
has one source name however it was listed). A manifest is read by Ray Data, so the driver never
holds it; a folder is listed by the driver (its paths only). Each output row is ``source``,
``modality``, ``embedding`` (a fixed-size list of the ``embedding_dtype``; null for an unusable
file), ``checkpoint_sha256`` and ``error`` (null, or why the file could not be used). Running again
with the same OUT skips every source already written, so an interrupted job resumes where it
stopped.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from audioclip.image_input import IMAGE_SIZE
from audioclip.pipeline import AudioItem, ImageItem, Limits, pipelines
from audioclip.quantize import EMBEDDING_DTYPES, NUMPY_DTYPE, quantize, row_length

MODALITIES = ("image", "audio")
ERRORS_FILE = "_errors.tsv"  # underscore: Parquet readers skip it when they read the folder


@dataclass(frozen=True)
class CorpusJob:
    """What to embed and how: the checkpoint every actor loads (a path each node can read, or
    ``synthetic:NAME``), the output folder, and the actor pool's shape."""

    modality: str
    checkpoint: str
    output: str
    embedding_dtype: str = "float32"
    normalize: bool = False
    actors: int = 1
    batch_size: int = 16
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    decode_batch_size: int = 32
    rows_per_file: int = 4096  # at least, per Parquet file (else one small file per decode block)
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"--ray embeds files: images or audio, not {self.modality!r}")
        if self.embedding_dtype not in EMBEDDING_DTYPES:
            raise ValueError(f"embedding_dtype must be one of {', '.join(EMBEDDING_DTYPES)}")
        if min(self.actors, self.batch_size, self.decode_batch_size, self.rows_per_file) < 1:
            raise ValueError("actors, batch sizes and rows per file must be >= 1")


@dataclass
class JobReport:
    written: int  # rows this run wrote (embeddings and unusable files)
    skipped: int  # sources already in the output, not embedded again
    unusable: int  # unusable files in the output (any run's), all listed in OUT/_errors.tsv
    first_errors: list[tuple[str, str]]  # (source, reason) of the first few of them
    output_rows: int  # rows in the output folder now


# ---------------------------------------------------------------------------- filesystems
def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow's filesystem for a local path or a URI, and the path within it."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), posixpath.abspath(uri)
    return pafs.FileSystem.from_uri(uri)


def _joined(root_uri: str, path: str) -> str:
    """A path the filesystem listed under ``root_uri``, as a URI of the same scheme."""
    if "://" not in root_uri:
        return path
    return f"{root_uri.split('://', 1)[0]}://{path}"


def folder_sources(root_uri: str, suffixes: frozenset[str]) -> list[str]:
    """Files under a folder with a known extension, sorted; hidden files and folders are skipped."""
    fs, root = filesystem(root_uri)
    info = fs.get_file_info(root)
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{root_uri} is not a folder")
    found = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    files = []
    for entry in found:
        relative = posixpath.relpath(entry.path, root)
        hidden = any(part.startswith(".") for part in relative.split("/"))
        suffix = posixpath.splitext(entry.path)[1].lower()
        if entry.type == pafs.FileType.File and suffix in suffixes and not hidden:
            files.append(_joined(root_uri, entry.path))
    return sorted(files)


def read_file(source: str) -> bytes:
    fs, path = filesystem(source)
    with fs.open_input_stream(path) as stream:
        return stream.read()


# ---------------------------------------------------------------------------- resume
def _parquet_files(output: str) -> list[str]:
    fs, root = filesystem(output)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return []
    found = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    return sorted(e.path for e in found if e.type == pafs.FileType.File and e.path.endswith(".parquet"))


def written_sources(output: str) -> set[str]:
    """Sources already in the output. A file a killed run left half-written cannot be read: it is
    removed, so its rows are embedded again rather than lost."""
    fs, _ = filesystem(output)
    done: set[str] = set()
    for path in _parquet_files(output):
        try:
            with fs.open_input_file(path) as handle:
                done.update(pq.read_table(handle, columns=["source"]).column("source").to_pylist())
        except (pa.ArrowInvalid, OSError):
            fs.delete_file(path)
    return done


_DONE: dict[str, set[str]] = {}  # per worker process: the written set, fetched once per job


def skip_written(batch: dict[str, np.ndarray], done_ref: list) -> dict[str, np.ndarray]:
    """Drops the sources an earlier run wrote. ``done_ref`` holds the reference to their set in the
    object store (in a list, so that Ray hands over the reference, not the set)."""
    import ray

    key = done_ref[0].hex()
    if key not in _DONE:
        _DONE.clear()
        _DONE[key] = ray.get(done_ref[0])
    keep = np.array([source not in _DONE[key] for source in batch["source"]], dtype=bool)
    return {"source": batch["source"][keep]}


# ---------------------------------------------------------------------------- stages
def decode_batch(batch: dict[str, np.ndarray], modality: str, limits: Limits) -> pa.Table:
    """Read and decode each file with the library's pipeline; an unusable one keeps its row, with
    the reason in ``error`` and no ``item``. Prepared items travel as raw bytes (a 224x224x3 uint8
    crop, or float32 samples with their channel count)."""
    from audioclip import InvalidInputError

    pipeline = pipelines()[modality]
    items: list[bytes | None] = []
    channels: list[int] = []
    errors: list[str | None] = []
    for source in batch["source"]:
        try:
            prepared = pipeline.decode(read_file(source), limits)
        except (InvalidInputError, OSError) as err:
            items.append(None)
            channels.append(0)
            errors.append(" ".join(str(getattr(err, "detail", None) or err).split()))
            continue
        array = prepared.pixels if isinstance(prepared, ImageItem) else prepared.samples
        items.append(np.ascontiguousarray(array).tobytes())
        channels.append(array.shape[0] if isinstance(prepared, AudioItem) else 3)
        errors.append(None)
    return pa.table(
        {
            "source": pa.array(batch["source"], pa.string()),
            "item": pa.array(items, pa.binary()),
            "channels": pa.array(channels, pa.int8()),
            "error": pa.array(errors, pa.string()),
        }
    )


def prepared_item(modality: str, data: bytes, channels: int) -> ImageItem | AudioItem:
    if modality == "image":
        return ImageItem(np.frombuffer(data, dtype=np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE, 3))
    return AudioItem(np.frombuffer(data, dtype=np.float32).reshape(channels, -1))


class TowerActor:
    """One tower, built once per actor as the served towers are built; embeds decoded rows."""

    def __init__(self, job: CorpusJob) -> None:
        from audioclip.factory import TowerBuild, build_tower, load_weights

        weights, info = load_weights(job.checkpoint)
        device = "cuda" if job.gpus_per_actor > 0 else "cpu"
        self.model = build_tower(weights, job.modality, TowerBuild(device=device))
        self.pipeline = pipelines()[job.modality]
        self.job = job
        self.sha256 = info.sha256
        self.width = row_length(self.model.config.embed_dim, job.embedding_dtype)
        self.value_type = pa.from_numpy_dtype(NUMPY_DTYPE[job.embedding_dtype])

    def __call__(self, batch: pa.Table) -> pa.Table:
        from audioclip.model import l2_normalized

        ok = [i for i, error in enumerate(batch.column("error").to_pylist()) if error is None]
        data, channels = batch.column("item").to_pylist(), batch.column("channels").to_pylist()
        items = [prepared_item(self.job.modality, data[i], channels[i]) for i in ok]
        rows = self.pipeline.embed(self.model, items)
        if self.job.normalize:
            rows = l2_normalized(rows)
        codes = quantize(rows, self.job.embedding_dtype)
        flat = np.zeros((batch.num_rows, self.width), dtype=NUMPY_DTYPE[self.job.embedding_dtype])
        flat[ok] = codes
        valid = np.zeros(batch.num_rows, dtype=bool)
        valid[ok] = True
        values = pa.array(flat.reshape(-1), self.value_type)
        embedding = pa.FixedSizeListArray.from_arrays(values, self.width, mask=pa.array(~valid))
        n = batch.num_rows
        return pa.table(
            {
                "source": batch.column("source"),
                "modality": pa.array([self.job.modality] * n, pa.string()),
                "embedding": embedding,
                "checkpoint_sha256": pa.array([self.sha256] * n, pa.string()),
                "error": batch.column("error"),
            }
        )


# ---------------------------------------------------------------------------- the job
def source_dataset(input_uri: str, suffixes: frozenset[str]) -> Any:
    """One ``source`` row per file: a folder listed here (paths only), or a manifest read by Ray Data."""
    import ray.data

    if input_uri.endswith(".txt"):
        base = posixpath.dirname(input_uri if "://" in input_uri else posixpath.abspath(input_uri))

        def resolve(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            lines = [line.strip() for line in batch["text"]]
            paths = [p if "://" in p else posixpath.normpath(posixpath.join(base, p)) for p in lines if p]
            return {"source": np.array(paths, dtype=object)}

        return ray.data.read_text(input_uri).map_batches(resolve, batch_format="numpy")
    return ray.data.from_items([{"source": s} for s in folder_sources(input_uri, suffixes)])


def run(job: CorpusJob, input_uri: str, suffixes: frozenset[str]) -> JobReport:
    """Embed every source not yet in ``job.output`` and write it there; the caller has joined or
    started the Ray cluster, which must have CPUs beyond the actors' for the reading, decoding and
    writing tasks. The sources already written are gathered by a task on this node and reach the
    skip stage through the object store: the driver holds neither them nor the corpus."""
    import ray
    import ray.data
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cpus = ray.cluster_resources().get("CPU", 0.0)
    if job.actors * job.cpus_per_actor >= cpus:  # the tasks would wait forever for a CPU
        raise ValueError(
            f"{job.actors} actors x {job.cpus_per_actor:g} CPUs leave none of the cluster's {cpus:g} CPUs "
            "for the tasks that read, decode and write; use fewer actors or fewer CPUs per actor"
        )
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    count_ref, done_ref = (
        ray.remote(_written).options(num_returns=2, scheduling_strategy=here).remote(job.output)
    )
    skipped = ray.get(count_ref)
    earlier = set(_parquet_files(job.output))  # after the task removed any half-written file
    ds = source_dataset(input_uri, suffixes)
    if skipped:
        ds = ds.map_batches(skip_written, fn_args=([done_ref],), batch_size=None, batch_format="numpy")
    # Small blocks, so that decoding and the actors share the work (a manifest is one block, a
    # folder's listing a few): streamed, never the whole corpus at once.
    ds = ds.repartition(target_num_rows_per_block=job.decode_batch_size)
    decoded = ds.map_batches(
        decode_batch,
        fn_args=(job.modality, job.limits),
        batch_size=job.decode_batch_size,
        batch_format="numpy",
    )
    embedded = decoded.map_batches(
        TowerActor,
        fn_constructor_args=(job,),
        batch_size=job.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=job.actors),
        num_cpus=job.cpus_per_actor,
        num_gpus=job.gpus_per_actor,
    )
    embedded.write_parquet(job.output, min_rows_per_file=job.rows_per_file)
    files = _parquet_files(job.output)
    unusable, first = write_errors(job.output, files)
    return JobReport(
        written=_row_count(job.output, [path for path in files if path not in earlier]),
        skipped=skipped,
        unusable=unusable,
        first_errors=first,
        output_rows=_row_count(job.output, files),
    )


def _written(output: str) -> tuple[int, set[str]]:
    done = written_sources(output)
    return len(done), done


def _row_count(output: str, files: list[str]) -> int:
    fs, _ = filesystem(output)
    total = 0
    for path in files:
        with fs.open_input_file(path) as handle:
            total += pq.ParquetFile(handle).metadata.num_rows
    return total


def write_errors(output: str, files: list[str], keep: int = 20) -> tuple[int, list[tuple[str, str]]]:
    """``OUT/_errors.tsv``: (source, reason) of the unusable files in these output files, streamed
    batch by batch (only those rows' two columns are read); their count and the first ``keep``."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    fs, root = filesystem(output)
    count, first = 0, []
    with fs.open_output_stream(posixpath.join(root, ERRORS_FILE)) as out:
        if not files:
            return 0, []
        dataset = pads.dataset(files, filesystem=fs, format="parquet")
        unusable = pc.field("error").is_valid()
        for batch in dataset.to_batches(columns=["source", "error"], filter=unusable, batch_size=4096):
            rows = list(
                zip(batch.column("source").to_pylist(), batch.column("error").to_pylist(), strict=True)
            )
            out.write("".join(f"{source}\t{error}\n" for source, error in rows).encode())
            first += rows[: keep - len(first)]
            count += len(rows)
    return count, first
