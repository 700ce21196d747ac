"""Long recordings on the demo service: decode time per format, windows/s against whole 5-s clips,
and the router's and the audio tower's memory for a one-hour file.

    python scripts/bench_windows.py                 # everything (the hour takes ~10 min on 2 cores)
    python scripts/bench_windows.py --hour-minutes 5     # a shorter "hour", for a quick look

Decoding runs here, in-process (``audioclip.load_audio``, median of 3), for a minute of 48 kHz stereo
in each format. The service parts run ``serve run`` of ``configs/demo.yaml`` (request timeout raised
for the long file) and send, over HTTP: one 60-s clip with ``window_s=5`` (12 windows) against one
request of twelve 5-s clips, alternating, and then the long file as WebM/Opus (what a browser
records) with ``window_s=5, pool=mean``, sampling the resident memory (VmRSS) of the router and
audio tower replica processes every 0.2 s.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from media_files import encode_audio, encode_video, tone_scene  # noqa: E402

from audioclip.audio_input import load_audio  # noqa: E402
from audioclip_serve.bench.serveapp import ServeApp  # noqa: E402


def _soundfile(samples: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples.T, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def decode_times(seconds: float = 60.0) -> dict[str, float]:
    """Milliseconds to decode (and resample to 44.1 kHz) one minute of 48 kHz stereo, per format."""
    scene = tone_scene(48000, seconds, channels=2)
    files = {
        "wav (libsndfile)": _soundfile(scene, 48000, "WAV", "PCM_16"),
        "flac (libsndfile)": _soundfile(scene, 48000, "FLAC"),
        "mp3 (libsndfile)": _soundfile(scene, 48000, "MP3"),
        "ogg opus (libsndfile)": _soundfile(scene, 48000, "OGG", "OPUS"),
        "m4a aac (ffmpeg)": encode_audio(scene, 48000, "m4a_aac"),
        "m4a alac (ffmpeg)": encode_audio(scene, 48000, "m4a_alac"),
        "webm opus (ffmpeg)": encode_audio(scene, 48000, "webm_opus"),
        "mkv opus (ffmpeg)": encode_audio(scene, 48000, "mkv_opus"),
        "mp4 video aac (ffmpeg)": encode_video(scene, 48000, "mp4_h264_aac"),
    }
    times = {}
    for name, data in files.items():
        runs = []
        for _ in range(3):
            started = time.perf_counter()
            load_audio(data)
            runs.append(time.perf_counter() - started)
        times[name] = statistics.median(runs) * 1000 * 60 / seconds
        print(f"decode {name:24s} {len(data) / 1e6:6.2f} MB  {times[name]:7.1f} ms per minute", flush=True)
    return times


def replica_pids() -> dict[str, int]:
    """pids of the router and audio tower replicas (Ray names replica processes after them)."""
    pids = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        for name in ("Router", "AudioEncoder"):
            if f"ServeReplica:audioclip:{name}" in command and "ray::" in command:
                pids[name] = int(proc.name)
    return pids


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class PeakRSS:
    """Samples the resident memory of some processes in a thread; ``peaks`` in MiB."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.before = {name: rss_mib(pid) for name, pid in pids.items()}
        self.peaks = dict(self.before)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for name, pid in self.pids.items():
                self.peaks[name] = max(self.peaks[name], rss_mib(pid))

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def windows_against_clips(http: httpx.Client, rounds: int) -> tuple[float, float]:
    """(windows/s of one 60-s clip cut into 5-s windows, clips/s of one request of twelve 5-s clips)."""
    long_clip = _soundfile(tone_scene(44100, 60.0), 44100, "WAV", "PCM_16")
    short = [_soundfile(tone_scene(44100, 5.0) * (0.5 + i / 24), 44100, "WAV", "PCM_16") for i in range(12)]
    import base64

    windowed_s, clips_s = [], []
    clips_body = {"audio": [base64.b64encode(c).decode() for c in short]}
    for _ in range(rounds):
        started = time.perf_counter()
        r = http.post("/v1/embed/audio?window_s=5", content=long_clip, headers={"content-type": "audio/wav"})
        r.raise_for_status()
        windowed_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        http.post("/v1/embed/audio", json=clips_body).raise_for_status()
        clips_s.append(time.perf_counter() - started)
    return 12 / statistics.median(windowed_s), 12 / statistics.median(clips_s)


def hour_file(minutes: float) -> bytes:
    print(f"encoding {minutes:g} min of mono 48 kHz WebM/Opus ...", flush=True)
    scene = tone_scene(48000, minutes * 60.0, channels=1)
    return encode_audio(scene, 48000, "webm_opus")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hour-minutes", type=float, default=60.0, help="length of the long file")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    decode_times()
    long_file = hour_file(args.hour_minutes)
    print(f"long file: {len(long_file) / 1e6:.1f} MB", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
        config["http_options"]["request_timeout_s"] = 3600
        source = Path(tmp) / "demo.yaml"
        source.write_text(yaml.safe_dump(config, sort_keys=False))
        app = ServeApp(source, Path(tmp), ready_timeout_s=300)
        app.start()
        try:
            with httpx.Client(base_url=app.url, timeout=3600) as http:
                windows_per_s, clips_per_s = windows_against_clips(http, args.rounds)
                print(
                    f"windows/s {windows_per_s:.2f} (60-s clip, window_s=5) vs clips/s {clips_per_s:.2f} "
                    f"(twelve 5-s clips in one request): {windows_per_s / clips_per_s:.2f}x",
                    flush=True,
                )
                pids = replica_pids()
                with PeakRSS(pids) as meter:
                    started = time.perf_counter()
                    r = http.post(
                        "/v1/embed/audio?window_s=5&pool=mean",
                        content=long_file,
                        headers={"content-type": "audio/webm"},
                    )
                    elapsed = time.perf_counter() - started
                r.raise_for_status()
                windows = r.json()["windows"][0]["windows"]
                print(f"long file: {windows} windows in {elapsed:.1f} s = {windows / elapsed:.2f} windows/s")
                for name in pids:
                    before, peak = meter.before[name], meter.peaks[name]
                    print(f"  {name}: RSS {before:.0f} MiB before, peak {peak:.0f} (+{peak - before:.0f})")
        finally:
            app.stop()


if __name__ == "__main__":
    main()
