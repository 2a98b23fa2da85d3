"""The sample format: what one sample is, the names of its members and how each member's bytes are coded.

A sample is a key and its members. Inside a tar (a staged sample, a shard) each member is the file `{key}.{member}`
(webdataset's naming), and the members are:
  fbank.npy      float16 [1024, 128] unnormalized Kaldi fbank (np.save bytes)
  flac           the 16 kHz mono int16 waveform the fbank was computed from (lossless FLAC, libsndfile)
  frame00.jpg .. frame{F-1:02d}.jpg   224x224 JPEG, F = frames per clip; the index is zero-padded to the width of
                 F - 1 (at least 2 digits), so member names sort in frame order
  json           captions, audiocap_ids, youtube_id, start_time, split, duration, media_sha256, media_offset,
                 key, fbank_frames, ...; `decode_errors` {count, first_lines} only when ffmpeg reported errors on
                 a clip kept because its decode was complete (canonical JSON: sorted keys, fixed separators)

Keys are `{youtube_id}_{start_ms}_{end_ms}` (`validate_key`): never a dot, so the key/member split of a tar member
name (`split_member_name`, the rule webdataset groups by) is unambiguous.

Every module that writes, reads or checks samples (the clip stage, the shard writer, the member index, the shard
readers, the batcher, the audit, the gallery and the build report) takes these names, the key rule and the codecs
from here; it imports nothing of the project, so it sits below all of them. Decoders raise SampleFormatError (a
ValueError) whose message names the member they were given. The encoders decide the shard bytes
(tests/test_formats.py holds them to golden sha256s).
"""
from __future__ import annotations

import io
import json
import re

import numpy as np
import soundfile as sf

FBANK_MEMBER = "fbank.npy"
FLAC_MEMBER = "flac"
JSON_MEMBER = "json"
REQUIRED_MEMBERS = (FBANK_MEMBER, FLAC_MEMBER, JSON_MEMBER)   # every sample holds these and its frames
FRAME_MEMBER_RE = re.compile(r"^frame\d{2,}\.jpg$")
KEY_RE = re.compile(r"^[A-Za-z0-9_-]{11}_\d+_\d+$")


class SampleFormatError(ValueError):
    """A member name or a member's bytes do not follow the sample format; the message names the member."""


def validate_key(key: str) -> str:
    if not isinstance(key, str) or not KEY_RE.match(key):
        raise ValueError(f"bad sample key {key!r}: expected '{{youtube_id}}_{{start_ms}}_{{end_ms}}'")
    return key


def frame_member(i: int, frames_per_clip: int) -> str:
    """The member name of frame i of a sample with `frames_per_clip` frames (`frame07.jpg`)."""
    if not 0 <= i < frames_per_clip:
        raise ValueError(f"frame {i} does not exist in a sample of {frames_per_clip} frames")
    return f"frame{i:0{max(2, len(str(frames_per_clip - 1)))}d}.jpg"


def frame_members(members) -> list[str]:
    """The frame member names among `members`, in frame order."""
    return sorted(m for m in members if FRAME_MEMBER_RE.match(m))


def split_member_name(name: str) -> tuple[str, str]:
    """A tar member name -> (sample key, member suffix), as webdataset groups them: the key is the name up to the
    first dot of its basename (a directory part stays in the key), the suffix is the rest.

    A name without a dot, with nothing before it or nothing after it, belongs to no sample: SampleFormatError."""
    base = name.rsplit("/", 1)[-1]
    stem, dot, suffix = base.partition(".")
    if not dot:
        raise SampleFormatError(f"member {name!r} has no suffix (not a webdataset layout)")
    if not stem or not suffix:
        raise SampleFormatError(f"member {name!r} has an empty {'key' if not stem else 'suffix'} "
                                f"(not a webdataset layout)")
    return name[: len(name) - len(base)] + stem, suffix


# ---------------------------------------------------------------------------------------------------- codecs

def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes, where: str, header_cache: dict[bytes, tuple] | None = None) -> np.ndarray:
    """A .npy member to a read-only array over `data`, without copying it (np.load on a BytesIO copies).
    `where` names the member in errors (e.g. "shard S sample K: fbank.npy").

    numpy parses the header with ast.literal_eval (~0.1 ms); every sample of a dataset has the same header, so a
    cache keyed by the header bytes skips that. Pickled (object) and Fortran-order arrays are refused: encode_npy
    writes neither, and a member from someone else never runs code.
    """
    head = bytes(data[:128])
    if header_cache is not None and head in header_cache:
        shape, dtype, offset, count = header_cache[head]
        if len(data) - offset == count * dtype.itemsize:
            return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(f)
    except ValueError as e:
        raise SampleFormatError(f"{where}: not a valid .npy file ({e})") from e
    count = int(np.prod(shape))
    if fortran or dtype.hasobject or len(data) - f.tell() != count * dtype.itemsize:
        raise SampleFormatError(f"{where}: holds {len(data) - f.tell()} data bytes for shape {shape} {dtype}"
                                f"{' (Fortran order)' if fortran else ''}")
    if header_cache is not None and f.tell() <= 128:
        header_cache[head] = (shape, dtype, f.tell(), count)
    return np.frombuffer(data, dtype=dtype, count=count, offset=f.tell()).reshape(shape)


def encode_flac(waveform: np.ndarray, sample_rate: int) -> bytes:
    """Lossless FLAC of an int16 mono waveform; libsndfile's encoder is deterministic for the same samples."""
    waveform = np.asarray(waveform)
    if waveform.dtype != np.int16 or waveform.ndim != 1:
        raise ValueError(f"encode_flac wants a 1-D int16 waveform, got {waveform.dtype} {waveform.shape}")
    buf = io.BytesIO()
    sf.write(buf, waveform, sample_rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def decode_flac(data: bytes, where: str) -> tuple[np.ndarray, int]:
    """A flac member to (int16 waveform, sample rate); `where` names the member in errors."""
    try:
        wav, sr = sf.read(io.BytesIO(data), dtype="int16", always_2d=False)
    except (sf.SoundFileError, RuntimeError, TypeError, ValueError) as e:   # libsndfile's own error types
        raise SampleFormatError(f"{where}: not a decodable FLAC ({e})") from e
    return np.ascontiguousarray(wav), int(sr)


def encode_json(obj: dict) -> bytes:
    # Sorted keys and fixed separators: same content, same bytes.
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def decode_json(data: bytes, where: str) -> dict:
    """A json member to its object; `where` names the member in errors."""
    try:
        obj = json.loads(bytes(data))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SampleFormatError(f"{where}: not valid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise SampleFormatError(f"{where}: a JSON {type(obj).__name__}, not an object")
    return obj


# ---------------------------------------------------------------------------------------------- one sample

def encode_sample(*, fbank: np.ndarray, waveform: np.ndarray, sample_rate: int, frames: list[bytes],
                  meta: dict) -> dict[str, bytes]:
    """The members of one sample; `meta` becomes the json member.

    `meta` must hold `key`, `duration` (real seconds) and `fbank_frames` (real, unpadded fbank rows: the
    normalization stats and the loader's masks depend on it); `pipeline.stage.stage_clip` fills the measured ones.
    """
    validate_key(meta.get("key", ""))
    missing = [k for k in ("duration", "fbank_frames") if k not in meta]
    if missing:
        raise ValueError(f"sample {meta['key']}: json lacks {missing}")
    if not frames:
        raise ValueError(f"sample {meta['key']}: no frames")
    members = {FBANK_MEMBER: encode_npy(fbank), FLAC_MEMBER: encode_flac(waveform, sample_rate)}
    for i, jpg in enumerate(frames):
        members[frame_member(i, len(frames))] = bytes(jpg)
    members[JSON_MEMBER] = encode_json(meta)
    return members
