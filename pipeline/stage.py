"""Stage 5, Stage: one clip's media -> extract (one ffmpeg decode) -> fbank -> the finished sample, written as a
small staged tar (shards.sample_format's encoding, shards.writer's staging) that the shard writer later gathers."""
from __future__ import annotations

from pathlib import Path

from pipeline.extract import ExtractConfig, extract_clip
from pipeline.features import FbankConfig, compute_fbank, num_fbank_frames
from shards.sample_format import encode_sample
from shards.writer import Sample, write_staged_sample


def stage_clip(media_path: Path, start_time: int, meta: dict, out_path: Path, extract_cfg=None, fbank_cfg=None,
               duration: float = 10.0) -> Sample:
    """Media file -> extract (one ffmpeg decode) -> fbank -> encoded sample written to `out_path`.

    `meta` carries the clip fields (key, youtube_id, start_time, split, captions, audiocap_ids, media_sha256);
    the measured fields (duration, fbank_frames, frames, decoded_frames, frame_times, sample_rate) are added here.
    Raises pipeline.extract.ExtractError for a bad clip (nothing is written then).
    """
    extract_cfg = extract_cfg or ExtractConfig()
    fbank_cfg = fbank_cfg or FbankConfig()
    if extract_cfg.sample_rate != int(fbank_cfg.sample_frequency):
        raise ValueError(f"extract sample_rate {extract_cfg.sample_rate} != fbank sample_frequency "
                         f"{fbank_cfg.sample_frequency}")
    ex = extract_clip(media_path, start_time, extract_cfg, duration=duration)
    fbank = compute_fbank(ex.waveform, fbank_cfg)
    full = dict(meta)
    full.update(duration=round(ex.duration, 6), sample_rate=ex.sample_rate, num_samples=int(len(ex.waveform)),
                fbank_frames=min(num_fbank_frames(len(ex.waveform), fbank_cfg), fbank_cfg.target_length),
                frames=len(ex.frames), decoded_frames=ex.decoded_frames,
                frame_times=[round(t, 6) for t in ex.frame_times])
    if ex.decode_errors:
        # Only when there were any: a clean sample keeps the bytes it had before this field existed.
        full["decode_errors"] = {"count": ex.decode_errors, "first_lines": list(ex.decode_error_lines)}
    sample = Sample(full["key"], encode_sample(fbank=fbank, waveform=ex.waveform, sample_rate=ex.sample_rate,
                                               frames=ex.frames, meta=full))
    write_staged_sample(out_path, sample)
    return sample
