"""Benchmark: downloaded media -> staged shard sample, per core, beside ffmpeg's decode alone.

Generates N clips shaped like a 360p YouTube download (10 s, 640x360 h264 25 fps + AAC 44.1 kHz stereo), then
measures, one clip at a time on one core (ffmpeg -threads 1, torch.set_num_threads(1); run it under
`taskset -c 0` to pin everything):

  decode   `ffmpeg -threads 1 -ss S -t 10 -i clip -map 0:V:0 -map 0:a:0 -f null -`: the decode every method
           must pay;
  ours     pipeline.stage.stage_clip: one ffmpeg decode (audio + 20 frames), Kaldi fbank, FLAC, JPEGs, the staged
           tar written atomically (fsync included);
  2-pass   the original's way for scale: ffmpeg for the audio (`-vn -ar 16000` to wav), then again for the
           frames (`fps`, scale, crop, JPEG files).

Cost is CPU seconds (this process + its ffmpeg children, from getrusage), so a machine shared with other work
still gives a fair per-core figure; wall time is printed beside it. Also reports bytes per sample.

    python benchmarks/bench_pipeline.py --clips 20
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))



@dataclass
class Timing:
    cpu_s: float
    wall_s: float


def make_clip(path: Path, seed: int) -> None:
    """10 s 640x360 h264 High profile at ~700 kb/s with B-frames (like a YouTube 360p stream) + AAC 44.1 kHz stereo.

    Light noise keeps the picture from compressing to nothing, which would make decoding unrealistically cheap."""
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-y",
           "-f", "lavfi", "-i", f"testsrc2=size=640x360:rate=25:duration=10,noise=alls=6:allf=t+u:all_seed={seed}",
           "-f", "lavfi", "-i", f"aevalsrc=0.3*sin(2*PI*{300 + 40 * seed}*t)+0.1*random({seed})|"
                                f"0.3*sin(2*PI*{150 + 20 * seed}*t):s=44100:d=10",
           "-c:v", "libx264", "-preset", "veryfast", "-profile:v", "high", "-pix_fmt", "yuv420p",
           "-b:v", "700k", "-maxrate", "1000k", "-bufsize", "2000k", "-g", "50",
           "-c:a", "aac", "-b:a", "128k", "-ac", "2", "-movflags", "+faststart", str(path)]
    subprocess.run(cmd, check=True)


def _cpu() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def measure(fn) -> Timing:
    c0, w0 = _cpu(), time.perf_counter()
    fn()
    return Timing(_cpu() - c0, time.perf_counter() - w0)


def decode_only(clip: Path) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-threads", "1", "-ss", "0", "-t", "10", "-i", str(clip),
                    "-map", "0:V:0", "-map", "0:a:0", "-f", "null", "-"], check=True)


def two_pass(clip: Path, work: Path) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-threads", "1", "-ss", "0", "-t", "10", "-i",
                    str(clip), "-vn", "-ac", "1", "-ar", "16000", str(work / "audio.wav")], check=True)
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-threads", "1", "-ss", "0", "-t", "10", "-i",
                    str(clip), "-an", "-vf", "fps=2,scale=224:224:force_original_aspect_ratio=increase,crop=224:224",
                    "-q:v", "2", str(work / "frame_%02d.jpg")], check=True)


def run(n_clips: int, workdir: Path) -> dict:
    import torch
    from pipeline.extract import ExtractConfig
    from pipeline.features import FbankConfig
    from pipeline.stage import stage_clip
    from shards.writer import read_staged_sample, staged_path

    torch.set_num_threads(1)
    clips = []
    for i in range(n_clips):
        p = workdir / f"clip{i:03d}.mp4"
        make_clip(p, i)
        clips.append(p)
    ecfg, fcfg = ExtractConfig(threads=1), FbankConfig()
    # Warm up imports, torch kernels and the page cache so the first clip is not charged for them.
    stage_clip(clips[0], 0, {"key": "warmupwarmu_0_10000"}, staged_path(workdir / "out", "bench", "warmupwarmu_0_10000"),
               ecfg, fcfg)
    decode_only(clips[0])

    res = {"decode": [], "ours": [], "twopass": []}
    sizes = []
    for i, clip in enumerate(clips):
        key = f"bench{i:06d}_0_10000"
        meta = {"key": key, "youtube_id": key[:11], "start_time": 0, "split": "bench",
                "captions": ["a benchmark clip"] * 5, "audiocap_ids": [1, 2, 3, 4, 5], "media_sha256": "0" * 64}
        out = staged_path(workdir / "out", "bench", key)
        # Interleave the three so load changes on a shared machine hit them alike.
        res["decode"].append(measure(lambda: decode_only(clip)))
        res["ours"].append(measure(lambda: stage_clip(clip, 0, meta, out, ecfg, fcfg)))
        tp = workdir / f"twopass{i:03d}"
        tp.mkdir()
        res["twopass"].append(measure(lambda: two_pass(clip, tp)))
        s = read_staged_sample(out)
        sizes.append((out.stat().st_size, {k: len(v) for k, v in s.members.items()}))
    return {"res": res, "sizes": sizes}


def report(r: dict, n: int, load_before, load_after, command: str) -> str:
    med = {k: statistics.median(t.cpu_s for t in v) for k, v in r["res"].items()}
    wall = {k: statistics.median(t.wall_s for t in v) for k, v in r["res"].items()}
    total = [s for s, _ in r["sizes"]]
    parts = r["sizes"][0][1]
    frames = sum(v for k, v in parts.items() if k.startswith("frame"))
    lines = [
        f"Command: `{command}`",
        "",
        f"{n} clips, 10 s 640x360 h264 25 fps (x264 High, ~700 kb/s) + AAC 44.1 kHz stereo; one core: ffmpeg `-threads 1`,"
        f" torch 1 thread. Cost = CPU seconds per clip (process + ffmpeg children), median over clips.",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores,"
        f" load average {load_before[0]:.1f} before, {load_after[0]:.1f} after (other work inflates wall times).",
        "",
        "| path | CPU s / clip | clips/s per core | vs decode alone | wall s / clip |",
        "|---|---|---|---|---|",
    ]
    names = {"decode": "ffmpeg decode alone (video + audio)", "ours": "ours: 1 decode + fbank + FLAC + JPEG + staged tar",
             "twopass": "original-style two passes (audio, then frames)"}
    for k in ("decode", "ours", "twopass"):
        lines.append(f"| {names[k]} | {med[k]:.3f} | {1 / med[k]:.2f} | {med[k] / med['decode']:.2f}x | {wall[k]:.3f} |")
    lines += [
        "",
        f"Bytes per sample (staged tar = shard sample + 512 B tar end): median {statistics.median(total) / 1e3:.0f} kB"
        f" (fbank.npy {parts['fbank.npy'] / 1e3:.0f} kB, flac {parts['flac'] / 1e3:.0f} kB,"
        f" 20 JPEG frames {frames / 1e3:.0f} kB, json {parts['json']} B).",
        f"Target (ours within 1.3x of decode alone): {'met' if med['ours'] / med['decode'] <= 1.3 else 'NOT met'}"
        f" ({med['ours'] / med['decode']:.2f}x).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=20)
    args = ap.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    if os.environ.get("BENCH_COMMAND_PREFIX"):
        command = os.environ["BENCH_COMMAND_PREFIX"] + " " + command
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="avcap-bench-") as tmp:
        r = run(args.clips, Path(tmp))
    body = report(r, args.clips, load_before, os.getloadavg(), command)
    print(body)


if __name__ == "__main__":
    main()
