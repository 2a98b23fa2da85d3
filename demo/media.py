"""A deterministic synthetic audio-visual captioning dataset, made with ffmpeg's lavfi sources and espeak-ng.

Every clip pairs one sound class (tones, noise, beeping rhythms, speech) with one picture class (colour
screens, a moving square, a test pattern, a cellular automaton). Its five captions name both, in five
wordings, so a tiny captioner can learn to name the sound from the audio and the picture from the frames, and a
constant caption cannot score well.

Each file is an AudioCaps-shaped download: an mp4 (h264 + aac, faststart) that is `start_time + 10 s` plus a
short tail long, grey and silent before `start_time`, so a pipeline that ignores the start offset sees wrong
content. The CSVs have the AudioCaps header and CRLF line ends.

    python -m demo.media --out out/demo-media --clips 100
"""
from __future__ import annotations

import argparse
import csv
import random
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from shards.atomic import remove_stale_temps, temp_path

SPLITS = ("train", "val", "test")
YOUTUBE_ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
CLIP_SECONDS = 10


# ----------------------------------------------------------------------------------------------------------
# What the clips contain and how captions name it

@dataclass(frozen=True)
class ContentClass:
    name: str
    phrases: tuple[str, ...]  # synonyms; noun phrases ("a high tone", "a red screen")
    needs_speech: bool = False


# One plain phrase per class: a tiny model trained for a few CPU minutes learns to name what it hears and sees
# much sooner when each class has one name (richer synonym sets kept it guessing the wording instead).
# The sounds differ broadly in a log-mel fbank, so a patch embedding tells them apart early: each tonal class owns
# its own pitch band (low tone < slow beeps < fast beeps < high tone) on top of its rhythm, noise fills every band,
# and speech is one class ("a person speaking", both voices): man vs woman differ only in pitch and formants,
# too fine a distinction for a model trained a few CPU minutes.
AUDIO_CLASSES: tuple[ContentClass, ...] = (
    ContentClass("low_tone", ("a low tone",)),
    ContentClass("high_tone", ("a high tone",)),
    ContentClass("white_noise", ("static noise",)),
    ContentClass("fast_beeps", ("fast beeps",)),
    ContentClass("slow_beeps", ("slow beeps",)),
    ContentClass("speech", ("a person speaking",), needs_speech=True),
)

VISUAL_CLASSES: tuple[ContentClass, ...] = (
    ContentClass("red", ("a red screen",)),
    ContentClass("green", ("a green screen",)),
    ContentClass("blue", ("a blue screen",)),
    ContentClass("square", ("a moving square",)),
    ContentClass("test_pattern", ("a test pattern",)),
    ContentClass("cells", ("flickering cells",)),
)

# One template per caption slot so the five captions of a clip are worded five different ways; all name the sound
# first, so the decoder's first content word must come from the audio: it cannot get by on the easy picture.
CAPTION_TEMPLATES: tuple[str, ...] = (
    "{a} and {v}",
    "{a} with {v}",
    "{a} over {v}",
    "{a} while {v} is shown",
    "{a} and {v} in view",
)

SPEECH_WORDS = ("the weather is nice today", "please open the window", "we will meet at the station",
                "the river is calm this morning", "turn left at the next corner", "the train leaves at noon",
                "thank you for coming", "the coffee is still hot", "let us start the meeting",
                "the garden needs more water")

BASE_COLOURS = {"red": (200, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 200)}


# ----------------------------------------------------------------------------------------------------------
# Configuration and plan

@dataclass
class DemoMediaConfig:
    clips: int = 100              # total over the three splits
    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    size: int = 256               # square frames: >= 224 so the pipeline's center crop has something to crop
    fps: int = 10                 # few frames keep h264 encoding fast; the pipeline samples 20 per 10 s anyway
    max_start_s: int = 4          # start_time drawn from [0, max_start_s]
    tail_s: float = 1.0           # media continue past the window, as real videos do
    sample_rate: int = 44100
    workers: int = 2              # concurrent ffmpeg processes
    speech: bool | None = None    # None: use speech when espeak-ng is installed
    timeout_s: float = 120.0      # per ffmpeg / espeak-ng run


@dataclass
class DemoClip:
    youtube_id: str
    start_time: int
    split: str
    audio: str                    # AUDIO_CLASSES name
    visual: str                   # VISUAL_CLASSES name
    captions: list[str]
    audiocap_ids: list[int]
    params: dict = field(default_factory=dict)  # per-clip randomness (frequencies, colours, voice, ...)

    @property
    def key(self) -> str:
        return f"{self.youtube_id}_{self.start_time * 1000}_{(self.start_time + CLIP_SECONDS) * 1000}"

    @property
    def filename(self) -> str:
        return f"{self.youtube_id}.mp4"


@dataclass
class DemoDataset:
    root: Path
    media_dir: Path
    csv_paths: dict[str, Path]
    clips: list[DemoClip]
    speech: bool
    notes: list[str]              # what the user should know (e.g. no speech because espeak-ng is missing)
    seconds: float = 0.0          # wall time of generation

    def split(self, name: str) -> list[DemoClip]:
        return [c for c in self.clips if c.split == name]


def espeak_path() -> str | None:
    return shutil.which("espeak-ng")


def make_youtube_id(rng: random.Random, leading_dash: bool) -> str:
    body = "".join(rng.choice(YOUTUBE_ID_ALPHABET) for _ in range(10))
    first = "-" if leading_dash else rng.choice(YOUTUBE_ID_ALPHABET[:-2])
    return first + body


def split_sizes(n: int, val_fraction: float, test_fraction: float) -> dict[str, int]:
    if n < 6:
        raise ValueError(f"demo clips={n}: need at least 6 (2 per split) to train, select and evaluate")
    n_val = max(2, round(n * val_fraction))
    n_test = max(2, round(n * test_fraction))
    return {"train": n - n_val - n_test, "val": n_val, "test": n_test}


def plan_dataset(cfg: DemoMediaConfig, speech: bool) -> list[DemoClip]:
    """Decide every clip's ids, window, classes, captions and parameters; deterministic in cfg.seed."""
    rng = random.Random(cfg.seed)
    audio_classes = [a for a in AUDIO_CLASSES if speech or not a.needs_speech]
    sizes = split_sizes(cfg.clips, cfg.val_fraction, cfg.test_fraction)
    entries = [(a, v, split) for split in SPLITS for a, v in balanced_combos(audio_classes, sizes[split], rng)]
    rng.shuffle(entries)  # interleave the splits, so ids and start times do not follow the split

    clips, seen_ids = [], set()
    next_audiocap_id = 100000
    for i, (a, v, split) in enumerate(entries):
        youtube_id = make_youtube_id(rng, leading_dash=(i % 7 == 3))
        while youtube_id in seen_ids:
            youtube_id = make_youtube_id(rng, leading_dash=(i % 7 == 3))
        seen_ids.add(youtube_id)
        templates = list(CAPTION_TEMPLATES)
        rng.shuffle(templates)
        captions = []
        for t in templates:
            text = t.format(a=rng.choice(a.phrases), v=rng.choice(v.phrases))
            captions.append(text[0].upper() + text[1:])
        clips.append(DemoClip(
            youtube_id=youtube_id, start_time=rng.randint(0, cfg.max_start_s), split=split,
            audio=a.name, visual=v.name, captions=captions,
            audiocap_ids=list(range(next_audiocap_id, next_audiocap_id + len(captions))),
            params=_clip_params(rng, a.name, v.name)))
        next_audiocap_id += len(captions)
    return clips


def balanced_combos(audio: list[ContentClass], n: int, rng: random.Random) -> list[tuple[ContentClass, ContentClass]]:
    """n (sound, picture) pairs that use every sound equally often (up to one) and cover the whole class grid
    before any pair repeats.

    The grid is walked by diagonals (diagonal k pairs sound i with picture i + k): each holds every sound once,
    so any prefix of the walk is balanced in sound, and a full walk holds each pair once. A split drawn this way
    has no sound-picture correlation for the decoder to lean on (trained on 84 randomly drawn clips, one run
    captioned red-screen clips of three different sounds "a high tone and a red screen")."""
    visual = list(VISUAL_CLASSES)
    audio = list(audio)
    out: list[tuple[ContentClass, ContentClass]] = []
    while len(out) < n:
        rng.shuffle(audio)
        rng.shuffle(visual)
        diagonals = [[(audio[i], visual[(i + k) % len(visual)]) for i in range(len(audio))]
                     for k in range(len(visual))]
        rng.shuffle(diagonals)
        out.extend(pair for diagonal in diagonals for pair in diagonal)
    return out[:n]


def _clip_params(rng: random.Random, audio: str, visual: str) -> dict:
    """Per-clip variation so clips of a class are not identical files."""
    p: dict = {"gain": round(rng.uniform(0.3, 0.6), 3), "floor_seed": rng.randint(1, 10**6)}
    if audio == "low_tone":
        p["freq"] = round(rng.uniform(120, 250), 1)
    elif audio == "high_tone":
        p["freq"] = round(rng.uniform(3000, 4000), 1)
    elif audio in ("fast_beeps", "slow_beeps"):
        p["freq"] = round(rng.uniform(1500, 2000) if audio == "fast_beeps" else rng.uniform(400, 600), 1)
        p["period"] = round(rng.uniform(0.2, 0.3) if audio == "fast_beeps" else rng.uniform(0.9, 1.2), 3)
        p["beep"] = round(min(0.1, p["period"] / 2), 3)
    elif audio == "white_noise":
        p["noise_seed"] = rng.randint(1, 10**6)
    elif audio == "speech":
        male = rng.random() < 0.5
        p["voice"] = rng.choice(("en+m1", "en+m3", "en+m5")) if male else rng.choice(("en+f1", "en+f3", "en+f4"))
        p["pitch"] = rng.randint(15, 35) if male else rng.randint(65, 90)
        p["speed"] = rng.randint(140, 180)
        p["text"] = ". ".join(rng.sample(SPEECH_WORDS, 3))
    if visual in BASE_COLOURS:
        p["rgb"] = [min(255, max(0, c + rng.randint(-25, 25))) for c in BASE_COLOURS[visual]]
    elif visual == "square":
        p["side"] = rng.randint(40, 70)
        p["y"] = rng.randint(20, 150)
        p["speed"] = rng.randint(20, 40)  # px/s
    elif visual == "cells":
        p["life_seed"] = rng.randint(1, 10**6)
    return p


# ----------------------------------------------------------------------------------------------------------
# Rendering with ffmpeg

def ffmpeg_command(clip: DemoClip, cfg: DemoMediaConfig, out_path: Path, speech_wav: Path | None) -> list[str]:
    """One ffmpeg run renders a clip: lavfi picture source, lavfi or espeak-ng sound, grey/silent lead-in."""
    p, total, s, sz, r = clip.params, clip.start_time + CLIP_SECONDS + cfg.tail_s, clip.start_time, cfg.size, cfg.fps
    if clip.visual in BASE_COLOURS:
        video = f"color=c=0x{p['rgb'][0]:02x}{p['rgb'][1]:02x}{p['rgb'][2]:02x}:s={sz}x{sz}:r={r}:d={total}"
    elif clip.visual == "square":
        video = (f"color=c=black:s={sz}x{sz}:r={r}:d={total},"
                 f"drawbox=x='mod(t*{p['speed']},{sz})':y={p['y']}:w={p['side']}:h={p['side']}:c=white:t=fill")
    elif clip.visual == "test_pattern":
        video = f"testsrc=s={sz}x{sz}:r={r}:d={total}"
    elif clip.visual == "cells":
        video = f"life=s={sz}x{sz}:r={r}:seed={p['life_seed']}:ratio=0.3:mold=0,trim=duration={total}"
    else:
        raise ValueError(f"unknown visual class {clip.visual!r}")
    # Grey before the window: a pipeline that ignores start_time would see it.
    video += f",drawbox=x=0:y=0:w=iw:h=ih:c=gray:t=fill:enable='lt(t,{s})',format=yuv420p"

    g, sr = p["gain"], cfg.sample_rate
    inputs = ["-f", "lavfi", "-i", video]
    if clip.audio in ("low_tone", "high_tone"):
        inputs += ["-f", "lavfi", "-i", f"aevalsrc={g}*sin(2*PI*{p['freq']}*t):s={sr}:d={total}"]
    elif clip.audio in ("fast_beeps", "slow_beeps"):
        expr = f"{g}*lt(mod(t\\,{p['period']})\\,{p['beep']})*sin(2*PI*{p['freq']}*t)"
        inputs += ["-f", "lavfi", "-i", f"aevalsrc={expr}:s={sr}:d={total}"]
    elif clip.audio == "white_noise":
        inputs += ["-f", "lavfi", "-i", f"anoisesrc=c=white:a={g}:r={sr}:d={total}:seed={p['noise_seed']}"]
    elif clip.audio == "speech":
        if speech_wav is None:
            raise ValueError(f"clip {clip.youtube_id}: speech class {clip.audio} needs an espeak-ng recording")
        inputs += ["-stream_loop", "-1", "-i", str(speech_wav)]
    else:
        raise ValueError(f"unknown audio class {clip.audio!r}")
    # A faint pink-noise floor, as every real recording has; then silence before the window.
    inputs += ["-f", "lavfi", "-i", f"anoisesrc=c=pink:a=0.004:r={sr}:d={total}:seed={p['floor_seed']}"]
    audio_graph = (f"[1:a]aresample={sr},aformat=channel_layouts=mono,atrim=0:{total}[snd];"
                   f"[snd][2:a]amix=inputs=2:normalize=0:duration=first,"
                   f"volume=0:enable='lt(t,{s})',aformat=channel_layouts=stereo[a]")
    return ["ffmpeg", "-nostdin", "-v", "error", "-y", *inputs, "-filter_complex", audio_graph,
            "-map", "0:v", "-map", "[a]", "-t", f"{total}",
            "-c:v", "libx264", "-preset", "veryfast", "-crf", "28", "-pix_fmt", "yuv420p",
            # A keyframe every second, like real uploads: a stream-copy cut at start_time lands near it.
            "-g", str(cfg.fps),
            "-c:a", "aac", "-b:a", "96k", "-movflags", "+faststart", "-f", "mp4", str(out_path)]


def _run(cmd: list[str], what: str, timeout_s: float) -> None:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"{what}: {cmd[0]} timed out after {timeout_s:.0f} s") from e
    if res.returncode != 0:
        raise RuntimeError(f"{what}: {cmd[0]} exited {res.returncode}: {res.stderr.strip()[-800:]}")


def render_clip(clip: DemoClip, cfg: DemoMediaConfig, media_dir: Path, work_dir: Path) -> Path:
    out_path = media_dir / clip.filename
    speech_wav = None
    if clip.audio == "speech":
        espeak = espeak_path()
        if espeak is None:
            raise RuntimeError(f"clip {clip.youtube_id} needs speech but espeak-ng is not installed")
        speech_wav = work_dir / f"{clip.youtube_id}.wav"
        p = clip.params
        _run([espeak, "-v", p["voice"], "-p", str(p["pitch"]), "-s", str(p["speed"]), "-w", str(speech_wav),
              p["text"]], f"speech for clip {clip.youtube_id}", cfg.timeout_s)
    tmp = temp_path(out_path)   # the project's temp naming (shards.atomic); `-f mp4` since the name has no .mp4
    _run(ffmpeg_command(clip, cfg, tmp, speech_wav), f"rendering clip {clip.youtube_id}", cfg.timeout_s)
    tmp.replace(out_path)  # atomic: a half-written file never looks like a finished clip
    if speech_wav is not None:
        speech_wav.unlink(missing_ok=True)
    return out_path


def write_audiocaps_csv(path: Path, clips: list[DemoClip]) -> Path:
    """AudioCaps layout: one row per caption, header audiocap_id,youtube_id,start_time,caption, CRLF."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\r\n")
        w.writerow(["audiocap_id", "youtube_id", "start_time", "caption"])
        for clip in clips:
            for cap_id, caption in zip(clip.audiocap_ids, clip.captions):
                w.writerow([cap_id, clip.youtube_id, clip.start_time, caption])
    return path


def generate_dataset(out_dir: Path | str, cfg: DemoMediaConfig | None = None,
                     progress: bool = True) -> DemoDataset:
    """Render the dataset into out_dir/{media/, train.csv, val.csv, test.csv}; existing clips are reused."""
    cfg = cfg or DemoMediaConfig()
    root = Path(out_dir)
    media_dir, work_dir = root / "media", root / "tmp"
    media_dir.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(media_dir)   # renders a killed run left half-written
    for tool in ("ffmpeg",):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed: the demo renders its clips with it")
    notes = []
    have_espeak = espeak_path() is not None
    speech = have_espeak if cfg.speech is None else cfg.speech
    if speech and not have_espeak:
        raise RuntimeError("speech=True but espeak-ng is not installed (apt-get install espeak-ng)")
    if not speech:
        notes.append("no speech clips: espeak-ng is not installed (apt-get install espeak-ng)"
                     if not have_espeak else "no speech clips: speech disabled in the config")

    t0 = time.perf_counter()
    clips = plan_dataset(cfg, speech)
    todo = [c for c in clips if not (media_dir / c.filename).exists()]
    done = 0
    with ThreadPoolExecutor(max_workers=max(1, cfg.workers)) as pool:
        for _ in pool.map(lambda c: render_clip(c, cfg, media_dir, work_dir), todo):
            done += 1
            if progress and (done % 10 == 0 or done == len(todo)):
                print(f"[demo.media] rendered {done}/{len(todo)} clips", file=sys.stderr, flush=True)
    csv_paths = {s: write_audiocaps_csv(root / f"{s}.csv", [c for c in clips if c.split == s]) for s in SPLITS}
    shutil.rmtree(work_dir, ignore_errors=True)
    return DemoDataset(root=root, media_dir=media_dir, csv_paths=csv_paths, clips=clips, speech=speech,
                       notes=notes, seconds=time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--clips", type=int, default=DemoMediaConfig.clips)
    ap.add_argument("--seed", type=int, default=DemoMediaConfig.seed)
    ap.add_argument("--workers", type=int, default=DemoMediaConfig.workers)
    ap.add_argument("--no-speech", action="store_true")
    args = ap.parse_args(argv)
    cfg = DemoMediaConfig(clips=args.clips, seed=args.seed, workers=args.workers,
                          speech=False if args.no_speech else None)
    ds = generate_dataset(args.out, cfg)
    for note in ds.notes:
        print(f"[demo.media] note: {note}", file=sys.stderr)
    sizes = {s: len(ds.split(s)) for s in SPLITS}
    print(f"[demo.media] {len(ds.clips)} clips {sizes} in {ds.seconds:.1f} s -> {ds.root}")


if __name__ == "__main__":
    main()
