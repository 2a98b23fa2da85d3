"""Loader throughput on one core: our shard loader vs a loader in the original's style, on the same clips.

    .venv/bin/python benchmarks/bench_loader.py --clips 64 --repeats 3

Per clip: 10 s of 16 kHz audio, 20 frames 224x224 JPEG (q90). Measured, all single-threaded in this process:
- original style: wav read + Kaldi fbank + pad, per-sample SpecAugment + normalization + noise + roll, PIL
  open + Resize(224, bicubic) + CenterCrop + ToTensor + Normalize of the frame(s);
- ours: shards.loader (num_workers=0, so the reading and decoding run in this one process) over shards written
  by shards.writer.write_shard (fbank.npy, flac, 20 frame JPEGs and json per sample, plus the member index
  sidecar that a format-2 manifest lists): the indexed reader;
- ours, header parsing: the same shards through a manifest without the index (format 1 / remote-style path);
- ours + batched augmentation: the same plus shards.augment.prepare_batch(train=True, noise=True) on the CPU
  (on a GPU this step leaves the loader's core);
- bare decode: np.load of the fbank bytes and torchvision decode_jpeg of the used frame(s), from memory;
- JPEG decoders: torchvision.io.decode_jpeg vs PIL on the same frames (the loader uses the faster one).
Times are this process's CPU time (time.process_time), i.e. per-core cost: on a shared, loaded machine wall
time would mostly measure the other processes.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shards.augment import AugmentConfig, prepare_batch  # noqa: E402
from shards.loader import LoaderConfig, make_loader  # noqa: E402

MEAN, STD = -4.346, 4.332
FRAMES = 20


def fbank_of(wave: np.ndarray) -> torch.Tensor:
    w = torch.from_numpy(wave).float().unsqueeze(0)
    w = w - w.mean()
    fb = torchaudio.compliance.kaldi.fbank(w, htk_compat=True, sample_frequency=16000, use_energy=False,
                                           window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10)
    return torch.nn.functional.pad(fb, (0, 0, 0, 1024 - fb.shape[0]))


def make_clips(root: Path, n: int, rng: np.random.Generator, per_shard: int = 16) -> list[dict]:
    """wav + jpg files (the original's inputs) and the same clips as shard samples.

    Writes manifest.json (shards with their member index) and manifest-noindex.json (the same shards, no index).
    """
    from shards.writer import Sample, write_shard
    from tests.real_manifest import write_real_manifest
    (root / "wav").mkdir(parents=True)
    (root / "jpg").mkdir()
    (root / "shards").mkdir()
    clips = []
    for c in range(n):
        t = np.arange(160000) / 16000
        wave = (0.3 * np.sin(2 * np.pi * (200 + 20 * c) * t) + 0.05 * rng.standard_normal(160000)) * 0.5
        wave_i16 = (wave * 32767).astype(np.int16)
        sf.write(root / "wav" / f"{c}.wav", wave_i16, 16000, subtype="PCM_16")
        flac = io.BytesIO()
        sf.write(flac, wave_i16, 16000, format="FLAC")
        base = Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).resize((224, 224), Image.BICUBIC)
        jpgs = []
        for f in range(FRAMES):
            img = base.rotate(f * 3).filter(ImageFilter.GaussianBlur(1))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            jpgs.append(buf.getvalue())
            (root / "jpg" / f"{c}_{f}.jpg").write_bytes(buf.getvalue())
        npy = io.BytesIO()
        np.save(npy, fbank_of(wave_i16).numpy().astype(np.float16))
        clips.append({"__key__": f"clip{c:04d}xxx_0_10000", "fbank.npy": npy.getvalue(), "flac": flac.getvalue(),
                      "json": json.dumps({"captions": [f"clip {c}"]}).encode(),
                      **{f"frame{f:02d}.jpg": j for f, j in enumerate(jpgs)}})
    shards = []
    for i in range(0, n, per_shard):
        rel = f"shards/train-{i // per_shard:05d}.tar"
        chunk = clips[i:i + per_shard]
        write_shard(root / rel, [Sample(c["__key__"], {k: v for k, v in c.items() if k != "__key__"}) for c in chunk])
        shards.append((rel, len(chunk)))
    # The pipeline's manifest form (tests/real_manifest.py), and the same shards as format 1 (no member index).
    write_real_manifest(root, {"train": shards}, frames=FRAMES, indexed=True)
    noindex = json.loads((root / "manifest.json").read_text())
    noindex["format_version"] = 1
    for s in noindex["splits"]["train"]["shards"]:
        s["index"] = None
    (root / "manifest-noindex.json").write_text(json.dumps(noindex))
    return clips


def original_style(root: Path, n: int, nf: int, rng: np.random.Generator) -> float:
    """Seconds per sample of a per-sample loader in the original's style."""
    import torchvision.transforms as T
    freqm, timem = torchaudio.transforms.FrequencyMasking(48), torchaudio.transforms.TimeMasking(192)
    tf = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    t0 = time.process_time()
    for c in range(n):
        wave, _ = sf.read(root / "wav" / f"{c}.wav", dtype="int16")
        fb = fbank_of(wave)
        fb = freqm(fb.t().unsqueeze(0))
        fb = timem(fb).squeeze(0).t()
        fb = (fb - MEAN) / STD
        fb = fb + torch.rand(1024, 128) * float(rng.random()) / 10
        fb = torch.roll(fb, int(rng.integers(-1024, 1024)), 0)
        start = int(rng.integers(0, FRAMES - nf + 1))
        frames = [tf(Image.open(root / "jpg" / f"{c}_{start + j}.jpg").convert("RGB")) for j in range(nf)]
        visual = frames[0] if nf == 1 else torch.stack(frames, dim=1)
        assert fb.shape == (1024, 128) and visual.shape[-1] == 224
    return (time.process_time() - t0) / n


def ours(data: str, nf: int, batch_size: int, augment: bool) -> tuple[float, int]:
    cfg = LoaderConfig(data=data, split="train", batch_size=batch_size, num_workers=0, num_frames=nf,
                       shuffle_buffer=64, seed=0)
    it, nb = make_loader(cfg, 0, 1, epoch=0)
    aug = AugmentConfig(noise=True)
    t0 = time.process_time()
    count = 0
    for batch in it:
        if augment:
            out = prepare_batch(batch, aug, train=True, device="cpu")
            assert out["audio"].shape[0] == batch_size
        count += len(batch["keys"])
    return (time.process_time() - t0) / count, count


def bare_decode(clips: list[dict], nf: int) -> float:
    from torchvision.io import ImageReadMode, decode_jpeg
    t0 = time.process_time()
    for s in clips:
        fb = np.load(io.BytesIO(s["fbank.npy"]))
        imgs = [decode_jpeg(torch.frombuffer(bytearray(s[f"frame{10 + j - nf // 2:02d}.jpg"]), dtype=torch.uint8),
                            mode=ImageReadMode.RGB) for j in range(nf)]
        assert fb.shape == (1024, 128) and imgs[0].shape == (3, 224, 224)
    return (time.process_time() - t0) / len(clips)


def webdataset_iteration(root: Path, nf: int) -> float:
    """Seconds per sample of webdataset's own tar iteration (tarfile over every member, all bytes read, grouped
    by key) plus the decode of the members a step uses: the alternative to the loader's header parsing for
    unindexed and `pipe:` shards (shards.readers says why it is not used; this measures it)."""
    from torchvision.io import ImageReadMode, decode_jpeg
    from webdataset.tariterators import tarfile_samples
    urls = [{"url": str(p)} for p in sorted((root / "shards").glob("*.tar"))]
    t0 = time.process_time()
    n = 0
    for s in tarfile_samples(urls):
        fb = np.load(io.BytesIO(s["fbank.npy"]))
        imgs = [decode_jpeg(torch.frombuffer(bytearray(s[f"frame{10 + j - nf // 2:02d}.jpg"]), dtype=torch.uint8),
                            mode=ImageReadMode.RGB) for j in range(nf)]
        json.loads(s["json"])
        assert fb.shape == (1024, 128) and imgs[0].shape == (3, 224, 224)
        n += 1
    return (time.process_time() - t0) / n


def jpeg_decoders(clips: list[dict], repeats: int) -> dict[str, float]:
    """Seconds per 224x224 frame for the two decoders the loader could use, each to its natural layout."""
    from torchvision.io import ImageReadMode, decode_jpeg
    jpgs = [s[f"frame{f:02d}.jpg"] for s in clips for f in (0, 10)]

    def tv():
        for j in jpgs:
            decode_jpeg(torch.frombuffer(bytearray(j), dtype=torch.uint8), mode=ImageReadMode.RGB)

    def pil():
        for j in jpgs:
            np.asarray(Image.open(io.BytesIO(j)).convert("RGB"))

    out = {}
    for name, fn in (("torchvision.io.decode_jpeg", tv), ("PIL (np.asarray of the RGB image)", pil)):
        best = float("inf")
        for _ in range(repeats):
            t0 = time.process_time()
            fn()
            best = min(best, time.process_time() - t0)
        out[name] = best / len(jpgs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="best of N timings per measurement")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        root = Path(tmp)
        clips = make_clips(root, args.clips, rng)
        sample_bytes = np.mean([sum(len(v) for k, v in s.items() if k != "__key__") for s in clips])
        print(f"{args.clips} clips, {sample_bytes / 1e6:.2f} MB and {len(clips[0]) - 1} members per sample, "
              f"batch {args.batch_size}, torch threads 1")
        dec = jpeg_decoders(clips, args.repeats)
        print("JPEG decode per 224x224 q90 frame, one core: " + ", ".join(f"{k} {v * 1e6:.0f} us" for k, v in dec.items()))
        print("| frames | original style | ours (loader, indexed) | ours, header parsing (no index) "
              "| ours + batched augment (CPU) | bare decode of used members | loader / original "
              "| loader / bare decode | webdataset tar iteration + decode of used members (no index) "
              "| header parsing / webdataset |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        indexed, noindex = str(root), str(root / "manifest-noindex.json")
        for nf in (1, 4):
            orig = min(original_style(root, args.clips, nf, rng) for _ in range(args.repeats))
            ld = min(ours(indexed, nf, args.batch_size, augment=False)[0] for _ in range(args.repeats))
            lh = min(ours(noindex, nf, args.batch_size, augment=False)[0] for _ in range(args.repeats))
            la = min(ours(indexed, nf, args.batch_size, augment=True)[0] for _ in range(args.repeats))
            bare = min(bare_decode(clips, nf) for _ in range(args.repeats))
            wds_it = min(webdataset_iteration(root, nf) for _ in range(args.repeats))
            fmt = lambda s: f"{1 / s:,.0f}/s ({s * 1e3:.2f} ms)"  # noqa: E731
            print(f"| {nf} | {fmt(orig)} | {fmt(ld)} | {fmt(lh)} | {fmt(la)} | {fmt(bare)} | {orig / ld:.1f}x | "
                  f"{ld / bare:.2f}x | {fmt(wds_it)} | {lh / wds_it:.2f}x |")

if __name__ == "__main__":
    main()
