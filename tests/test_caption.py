"""`python -m avcap.caption`: local files through the dataset's own preprocessing, with a tiny saved checkpoint."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from avcap.caption import (CaptionConfig, CaptionError, Captioner, MediaInfo, choose_mode,
                           probe_media, window_starts)
from demo.media import DemoMediaConfig, plan_dataset, render_clip
from shards.epoch_plan import eval_frame_start

REPO_ROOT = Path(__file__).resolve().parent.parent


def _save_tiny_checkpoint(path: Path, vocab_path: Path, mode: str) -> Path:
    from avcap.checkpoint import save_checkpoint
    from avcap.model import AVCap, AVCapConfig
    from avcap.tokenizer import load_tokenizer, special_ids

    tok = load_tokenizer(str(vocab_path))
    ids = special_ids(tok)
    torch.manual_seed(0)
    cfg = AVCapConfig.tiny(cls_id=ids.cls, sep_id=ids.sep, pad_id=ids.pad, vocab_size=len(tok), depth_a=1,
                           depth_v=1, depth_u=1, text_layers=1, mode=mode)
    # Unusual normalization stats: the captioner must take them from the checkpoint, not from defaults.
    return save_checkpoint(path, AVCap(cfg), cfg, tok, norm_stats={"mean": -3.0, "std": 5.0}, frames_per_clip=20)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from avcap.tokenizer import build_wordpiece_vocab

    root = tmp_path_factory.mktemp("caption")
    plan = plan_dataset(DemoMediaConfig(clips=40, seed=2), speech=False)
    vocab = build_wordpiece_vocab([c for clip in plan for c in clip.captions], root / "vocab.txt", vocab_size=200)
    clip = next(c for c in plan if c.visual == "red" and c.start_time >= 2)
    video = render_clip(clip, DemoMediaConfig(), root, root)   # start_time + 11 s long, grey/silent lead-in
    audio_only, video_only, junk = root / "sound.m4a", root / "silent.mp4", root / "junk.mp4"
    for out, keep in ((audio_only, ["-vn", "-c:a", "copy"]), (video_only, ["-an", "-c:v", "copy"])):
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(video), *keep, str(out)], check=True)
    junk.write_bytes(b"this is not a video\n" * 50)
    return dict(root=root, clip=clip, video=video, audio_only=audio_only, video_only=video_only, junk=junk,
                ckpt_av=_save_tiny_checkpoint(root / "av.pt", vocab, "av"),
                ckpt_audio=_save_tiny_checkpoint(root / "audio.pt", vocab, "audio"))


# --------------------------------------------------------------------------------------------- units

def test_window_starts_and_modes(tmp_path):
    info = MediaInfo(path=tmp_path / "x.mp4", duration=23.5, has_audio=True, has_video=True)
    assert window_starts(info, 0.0, all_windows=False) == [0.0]
    assert window_starts(info, 7.5, all_windows=False) == [7.5]
    assert window_starts(info, 0.0, all_windows=True) == [0.0, 10.0, 20.0]
    assert window_starts(MediaInfo(info.path, 20.5, True, True), 0.0, all_windows=True) == [0.0, 10.0]
    with pytest.raises(CaptionError, match=r"x\.mp4.*--start 23"):
        window_starts(info, 23.0, all_windows=False)

    av, sound, silent = info, MediaInfo(info.path, 10, True, False), MediaInfo(info.path, 10, False, True)
    assert choose_mode("av", av) == "av"
    assert choose_mode("av", sound) == "audio" and choose_mode("av", silent) == "visual"
    assert choose_mode("audio", av) == "audio"
    with pytest.raises(CaptionError, match="no audio stream"):
        choose_mode("audio", silent)
    with pytest.raises(CaptionError, match="no video stream"):
        choose_mode("av", sound, requested="av")
    # The evaluation loader's frame rule: the middle frame, or a centred run of frames.
    assert eval_frame_start(20, 1) == 10 and eval_frame_start(20, 4) == 8 and eval_frame_start(20, 8) == 6


def test_probe_errors_name_the_file(assets, tmp_path):
    with pytest.raises(CaptionError, match=r"junk\.mp4: not a readable media file"):
        probe_media(assets["junk"])
    with pytest.raises(CaptionError, match=r"absent\.mp4: no such file"):
        probe_media(tmp_path / "absent.mp4")
    info = probe_media(assets["video"])
    assert info.has_audio and info.has_video
    assert info.duration == pytest.approx(assets["clip"].start_time + 11.0, abs=0.2)
    assert not probe_media(assets["audio_only"]).has_video and not probe_media(assets["video_only"]).has_audio


# --------------------------------------------------------------------------------------------- same preprocessing

def test_window_matches_the_dataset_sample(assets, tmp_path):
    """The captioner's inputs are exactly what the pipeline stores and the eval loader feeds."""
    from avcap.generate import beam_search
    from avcap.tokenizer import decode_batch
    from shards.augment import AugmentConfig, prepare_batch
    from shards.decode import decode_jpeg
    from shards.sample_format import decode_npy
    from pipeline.stage import stage_clip

    clip = assets["clip"]
    captioner = Captioner(CaptionConfig(checkpoint=str(assets["ckpt_av"]), start=clip.start_time))
    assert (captioner.augment_cfg.norm_mean, captioner.augment_cfg.norm_std) == (-3.0, 5.0)
    window = captioner._window(assets["video"], float(clip.start_time), "av", assets["video"])

    sample = stage_clip(assets["video"], clip.start_time, {"key": clip.key, "captions": clip.captions},
                        tmp_path / f"{clip.key}.tar")
    fbank = torch.from_numpy(decode_npy(sample.members["fbank.npy"], "sample").copy())
    frame = decode_jpeg(sample.members["frame10.jpg"], "sample")
    assert torch.equal(window.fbank, fbank)
    assert torch.equal(window.frames[0], frame)
    red = frame.float().mean(dim=(1, 2))
    assert red[0] > 150 and red[1] < 80  # the window, not the grey lead-in

    # And the caption equals the eval path's: loader-shaped batch -> prepare_batch(train=False) -> beam search.
    batch = prepare_batch({"fbank": fbank[None], "frames": frame[None, None]},
                          AugmentConfig(norm_mean=-3.0, norm_std=5.0), train=False)
    tokens, _ = beam_search(captioner.model, batch["audio"], batch["visual"], beam_size=4, max_steps=42)
    expected = decode_batch(captioner.tokenizer, tokens)[0]
    got = captioner.caption_file(assets["video"])
    assert [(r.start, r.mode, r.caption) for r in got] == [(float(clip.start_time), "av", expected)]


def test_single_stream_files_use_single_modality_modes(assets):
    captioner = Captioner(CaptionConfig(checkpoint=str(assets["ckpt_av"]), all_windows=True))
    sound = captioner.caption_file(assets["audio_only"])
    silent = captioner.caption_file(assets["video_only"])
    n = int(assets["clip"].start_time + 11) // 10 + 1
    assert [r.mode for r in sound] == ["audio"] * n and [r.mode for r in silent] == ["visual"] * n
    assert [r.start for r in sound] == [10.0 * i for i in range(n)]
    assert sound[-1].end == pytest.approx(assets["clip"].start_time + 11.0, abs=0.1)  # the short last window
    assert all(r.caption.strip() for r in sound + silent)

    audio_model = Captioner(CaptionConfig(checkpoint=str(assets["ckpt_audio"])))
    assert audio_model.caption_file(assets["video"])[0].mode == "audio"
    with pytest.raises(CaptionError, match=r"silent\.mp4: media has no audio stream"):
        audio_model.caption_file(assets["video_only"])


# --------------------------------------------------------------------------------------------- the command

def test_command_line(assets):
    cmd = [sys.executable, "-m", "avcap.caption", str(assets["video"]), str(assets["junk"]),
           str(assets["video_only"]), "--checkpoint", str(assets["ckpt_av"]), "--start", "2"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert res.returncode == 1, res.stderr  # one file could not be used
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 2, res.stdout
    name, span, mode, text = lines[0].split("\t")
    assert name == assets["video"].name and span == "2.0-12.0 s" and mode == "[av]" and text.strip()
    assert lines[1].split("\t")[2] == "[visual]"
    assert f"error: {assets['junk']}: not a readable media file" in res.stderr
    assert "visual-only mode" in res.stderr

    res = subprocess.run([sys.executable, "-m", "avcap.caption", str(assets["video"]), "--checkpoint",
                          str(assets["root"] / "nope.pt")], capture_output=True, text=True, cwd=REPO_ROOT)
    assert res.returncode == 2 and "nope.pt: no such file" in res.stderr


def test_exported_folder_captions_like_the_checkpoint(assets, tmp_path):
    from avcap.export import export
    folder = export(assets["ckpt_av"], tmp_path / "exported")
    from_pt = Captioner(CaptionConfig(checkpoint=str(assets["ckpt_av"])))
    from_folder = Captioner(CaptionConfig(checkpoint=str(folder)))
    assert (from_folder.augment_cfg, from_folder.extract_cfg) == (from_pt.augment_cfg, from_pt.extract_cfg)
    # one decoded window (ffmpeg is the slow part), captioned by both
    window = from_pt._window(assets["video"], float(assets["clip"].start_time), "av", assets["video"])
    caption = from_pt._caption_batch([window], "av")
    assert caption[0].strip() and from_folder._caption_batch([window], "av") == caption
