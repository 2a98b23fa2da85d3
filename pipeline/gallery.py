"""The gallery: one HTML page to look at and listen to a split's clips, its failures and, after an evaluation,
what the model says about each clip.

    python flows.py gallery --out DIR [--split S] [--results RESULTS.json] [--sample N] [--seed K]

writes `PAGE_DIR/reports/gallery-{split}.html` and its files under `PAGE_DIR/reports/gallery-{split}/`
(PAGE_DIR is DIR for `flows.py gallery` and the build flow, the results file's directory for
`avcap.evaluate --gallery`). The page is self-contained: inline CSS and a little JS, no network fetch, relative
links to its own files only (the YouTube links are plain links). It shows
- a header: split, clips by status and failure reasons with counts (the ledger's; click one to filter the
  failures table), the build's plots, the manifest fingerprint and tool versions;
- a card per sampled clip: key and YouTube link, 4 frames (the clip's middle frame, the one evaluation uses,
  larger), an <audio> player of the sample's flac member (the member's bytes as they are, so the samples the
  browser plays are the shard's), a small fbank spectrogram, duration, loudness and all captions;
- with a COCO results file (`[{"image_id": key, "caption": text}]`): the generated caption and the clip's own
  CIDEr-D (avcap.metrics.cider_d_per_clip, scored over every clip of the results file), cards sortable worst
  first, the split's metrics (its `.metrics.json` beside the results when there is one) and every clip's score;
- the failures table from the ledger (clip, status, reason, message tail, attempts).

Sampling is seeded: the same seed gives the same cards. Samples are read through the loader's shard readers
(shards.readers.open_shard_reader: the member index when there is one), and only the members the page shows.
Everything shown comes from other people's files (captions, messages, ids, results), so all text is escaped
with html.escape and nothing from them reaches the page's script or its file names.
"""
from __future__ import annotations

import argparse
import html
import io
import json
import logging
import math
import random
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import quote

from avcap import metrics as M
from pipeline.ledger import Ledger, LedgerError
from pipeline.report import artifact_key, rms_dbfs
from shards.atomic import atomic_write_text, remove_stale_temps, temp_dir
from shards.epoch_plan import eval_frame_start
from shards.index import ShardError
from shards.manifest import read_manifest
from shards.readers import local_path, open_shard_reader
from shards.split_info import load_split
from shards.writer import validate_split
from shards.sample_format import (FBANK_MEMBER, FLAC_MEMBER, JSON_MEMBER, SampleFormatError, decode_flac, decode_json,
                                  decode_npy, frame_member)

log = logging.getLogger("avcap.gallery")

DEFAULT_SAMPLE = 48
STRIP_FRAMES = 4                    # frames per card; the middle one (F // 2) shown larger
MESSAGE_TAIL_CHARS = 300            # of a failure's tool output
SPECTROGRAM_HEIGHT = 64             # px; the width is the real frames / SPECTROGRAM_TIME_STEP
SPECTROGRAM_TIME_STEP = 4
YOUTUBE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{11}$")
SAFE_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,80}$")
PLOTS = ("durations", "loudness", "failures")   # pipeline.report's build-{split}-{name}.png


class GalleryError(RuntimeError):
    """The gallery cannot be made (no manifest, unreadable shard, malformed results file); says which input."""


@dataclass
class Card:
    key: str
    meta: dict[str, Any]
    captions: list[str]
    frames: list[tuple[int, str]]               # (frame index, file name) in strip order
    audio: str | None                           # file name of the flac
    spectrogram: str | None
    duration: float | None                      # seconds of audio, from the flac itself
    samples: int | None
    loudness: float | None                      # dBFS
    problems: list[str] = field(default_factory=list)
    generated: str | None = None
    cider: float | None = None


@dataclass
class GalleryPage:
    html: Path
    assets: Path
    split: str
    clips: int                                  # samples in the split's shards
    cards: int
    counts: dict[str, int]
    reasons: dict[str, int]
    metrics: dict[str, Any] | None = None
    per_clip_cider: dict[str, float] | None = None
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        counts = ", ".join(f"{n} {s}" for s, n in self.counts.items() if n)
        text = f"split {self.split}: {self.cards} of {self.clips} clips shown; {counts or 'no ledger counts'}"
        if self.reasons:
            text += "; failures: " + ", ".join(f"{r} {n}" for r, n in self.reasons.items())
        if self.metrics and self.metrics.get("CIDEr") is not None:
            text += f"; CIDEr-D {float(self.metrics['CIDEr']):.3f}"
        return text


def e(value: Any) -> str:
    """Text and attribute values for the page: always escaped (quotes too)."""
    return html.escape("" if value is None else str(value), quote=True)


# ------------------------------------------------------------------------------------------------ inputs

def strip_frames(frames_per_clip: int) -> list[int]:
    """The 4 frame indices of a card, in order: quarters of the clip, the middle one (F // 2) among them."""
    # (F * 2) // 4 == F // 2: the middle frame is always the third of the strip (when F >= 4).
    return sorted({(frames_per_clip * k) // STRIP_FRAMES for k in range(STRIP_FRAMES)})


def read_results(path: Path) -> dict[str, str]:
    """{key: caption} of a COCO results file; a malformed one is a GalleryError naming the file and entry."""
    try:
        rows = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise GalleryError(f"results file {path}: cannot be read ({err})") from err
    except ValueError as err:
        raise GalleryError(f"results file {path}: not valid JSON ({err})") from err
    if not isinstance(rows, list):
        raise GalleryError(f"results file {path}: expected a list of {{image_id, caption}}, got {type(rows).__name__}")
    out: dict[str, str] = {}
    for i, r in enumerate(rows):
        if not (isinstance(r, dict) and isinstance(r.get("image_id"), str) and isinstance(r.get("caption"), str)):
            raise GalleryError(f"results file {path}: entry #{i} is not {{\"image_id\": str, \"caption\": str}}: "
                               f"{str(r)[:200]}")
        if r["image_id"] in out:
            raise GalleryError(f"results file {path}: clip {r['image_id']!r} appears twice")
        out[r["image_id"]] = r["caption"]
    if not out:
        raise GalleryError(f"results file {path}: holds no captions")
    return out


def read_metrics(results: Path) -> dict[str, Any] | None:
    """The `<stem>.metrics.json` that avcap.evaluate writes beside its results file, if there is one."""
    path = results.with_name(results.stem + ".metrics.json")
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise GalleryError(f"metrics file {path}: not valid JSON ({err})") from err
    if not isinstance(metrics, dict) or not isinstance(metrics.get("CIDEr"), (int, float)):
        raise GalleryError(f"metrics file {path}: expected an object with a numeric CIDEr")
    return metrics


def _java_used(metrics: dict[str, Any]) -> bool:
    # avcap.metrics marks METEOR unavailable "(Java-free path)" exactly when the Python tokenizer ran: the
    # per-clip scores must be tokenized the same way to add up to the file's CIDEr-D.
    return "Java-free" not in str((metrics.get("unavailable") or {}).get("METEOR", ""))


def _local_dir(data: str) -> Path | None:
    """The build directory of a local dataset (a directory or its manifest.json), else None."""
    here = local_path(data)
    if here is None:
        return None
    return Path(here).parent if here.endswith(".json") else Path(here)


def _ledger_view(data: str, split: str, manifest_entry: dict) -> tuple[dict[str, int], list[dict]]:
    """(clips per status, failures) from DIR/ledger.sqlite when the data is a local build, else the manifest's."""
    here = _local_dir(data)
    ledger_path = here / "ledger.sqlite" if here is not None else None
    if ledger_path is not None and ledger_path.is_file():
        try:
            with Ledger(ledger_path, split) as ledger:
                counts = {s: n for s, n in ledger.counts().items()}
                failures = [{"key": f.key, "status": f.status, "reason": f.reason or "unknown",
                             "message": f.message or "", "attempts": f.attempts, "stage": f.stage}
                            for f in ledger.failures()]
        except LedgerError as err:
            raise GalleryError(str(err)) from err
        return counts, failures
    counts = dict(manifest_entry.get("counts") or {})
    failures = [{"key": str(f.get("key")), "status": str(f.get("status")), "reason": str(f.get("reason") or "unknown"),
                 "message": str(f.get("message") or ""), "attempts": None, "stage": None}
                for f in manifest_entry.get("failures") or [] if isinstance(f, dict)]
    return counts, failures


# ------------------------------------------------------------------------------------------------ media

_COLORMAP = None


def _colormap():
    global _COLORMAP
    if _COLORMAP is None:
        import matplotlib
        import numpy as np
        _COLORMAP = (matplotlib.colormaps["magma"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)
    return _COLORMAP


def spectrogram_png(fbank, real_frames: int | None) -> bytes:
    """A small PNG of a [T, M] log-mel fbank: time left to right, low mel bins at the bottom, per-image contrast
    (2nd..99.5th percentile), padding rows left out."""
    import numpy as np
    from PIL import Image
    x = np.asarray(fbank, dtype=np.float32)
    if real_frames:
        x = x[: max(1, min(int(real_frames), x.shape[0]))]
    t = max(1, x.shape[0] // SPECTROGRAM_TIME_STEP)
    x = x[: t * SPECTROGRAM_TIME_STEP].reshape(t, -1, x.shape[1]).mean(axis=1) if x.shape[0] >= SPECTROGRAM_TIME_STEP else x
    lo, hi = np.percentile(x, [2, 99.5])
    level = np.clip((x - lo) / max(hi - lo, 1e-6), 0, 1)
    rgb = _colormap()[(level.T[::-1] * 255).astype(np.uint8)]
    img = Image.fromarray(rgb).resize((rgb.shape[1], SPECTROGRAM_HEIGHT), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _read_samples(info, want: dict[str, set[str]], take) -> None:
    """Calls take(key, {member: bytes}) with the wanted members of each wanted key, through the loader's shard
    readers."""
    for shard in info.shards:
        reader = None
        try:
            reader = open_shard_reader(shard)
            for key, members in reader.samples(lambda k: want.get(k)):
                if members is not None:
                    take(key, {m: bytes(v) for m, v in members.items()})
        except (ShardError, OSError) as err:
            raise GalleryError(f"shard {shard.url} cannot be read: {err}") from err
        finally:
            if reader is not None:
                reader.close()


def _score(predictions: dict[str, str], jsons: dict[str, bytes], metrics: dict | None, results: Path
           ) -> tuple[dict, dict[str, float], list[str]]:
    """(split metrics, per-clip CIDEr-D, warnings) of the predictions against the clips' own captions."""
    references = {}
    for k in predictions:
        try:
            caps = decode_json(jsons[k], JSON_MEMBER)["captions"]
            if not isinstance(caps, list):
                raise TypeError("captions is not a list")
        except (KeyError, ValueError, TypeError) as err:
            raise GalleryError(f"clip {k}: its json member has no captions to score against ({err})") from err
        references[k] = [str(c) for c in caps]
    try:
        if metrics is None:
            metrics = dict(M.score_captions(predictions, references))
            java = M.java_available()
        else:
            java = _java_used(metrics) and M.java_available()
        per_clip = M.cider_d_per_clip(predictions, references, use_java=java)
    except ValueError as err:
        raise GalleryError(f"results file {results}: {err}") from err
    mean = sum(per_clip.values()) / len(per_clip)
    warnings = []
    if not math.isclose(mean, float(metrics["CIDEr"]), rel_tol=1e-9, abs_tol=1e-9):
        warnings.append(f"the mean of the per-clip CIDEr-D ({mean:.6f}) differs from the metrics' CIDEr-D "
                        f"({float(metrics['CIDEr']):.6f}): the metrics were computed on other clips, other "
                        f"references or with another tokenizer")
    return metrics, per_clip, warnings


def _list_keys(info) -> list[str]:
    keys: list[str] = []
    for shard in info.shards:
        reader = None
        try:
            reader = open_shard_reader(shard)
            keys += [k for k, _ in reader.samples(lambda k: None)]
        except (ShardError, OSError) as err:
            raise GalleryError(f"shard {shard.url} cannot be read: {err}") from err
        finally:
            if reader is not None:
                reader.close()
    if len(set(keys)) != len(keys):
        raise GalleryError(f"split {info.split!r} of {info.manifest_url}: a clip appears in two shards")
    return keys


def _make_card(n: int, key: str, members: dict[str, bytes], frame_ids: list[int], frames_per_clip: int,
               assets: Path) -> Card:
    """Writes the card's files (frames, flac, spectrogram) into `assets`; a member that cannot be read becomes a
    problem shown on the card rather than the end of the page."""
    import numpy as np


    base = key if SAFE_NAME_RE.match(key) else f"clip{n:04d}"   # a file name never comes from a hostile key
    base = f"{n:04d}-{base}"
    problems: list[str] = []
    meta: dict[str, Any] = {}
    captions: list[str] = []
    try:
        meta = decode_json(members[JSON_MEMBER], JSON_MEMBER)
        captions = [str(c) for c in meta.get("captions") or []]
    except (KeyError, SampleFormatError) as err:
        problems.append(f"json member unreadable ({err})")
        meta = {}
    frames = []
    for i in frame_ids:
        data = members.get(frame_member(i, frames_per_clip))
        if data is None:
            problems.append(f"frame {i} missing")
            continue
        name = f"{base}-f{i:02d}.jpg"
        (assets / name).write_bytes(data)                # the shard's JPEG as is: nothing decoded or re-encoded
        frames.append((i, name))
    audio = duration = samples = loudness = None
    if FLAC_MEMBER in members:
        try:
            wav, sr = decode_flac(members[FLAC_MEMBER], FLAC_MEMBER)
            samples, duration = int(len(wav)), len(wav) / float(sr)
            loudness = rms_dbfs(np.asarray(wav))
            audio = f"{base}.flac"
            (assets / audio).write_bytes(members[FLAC_MEMBER])
        except SampleFormatError as err:
            problems.append(f"flac member undecodable ({err})")
    else:
        problems.append("flac member missing")
    spectrogram = None
    if FBANK_MEMBER in members:
        try:
            fb = decode_npy(members[FBANK_MEMBER], f"sample {key}: {FBANK_MEMBER}")
            if fb.ndim != 2:
                raise SampleFormatError(f"{FBANK_MEMBER} has shape {list(fb.shape)}, expected [T, M]")
            spectrogram = f"{base}-fbank.png"
            (assets / spectrogram).write_bytes(spectrogram_png(fb, meta.get("fbank_frames")))
        except SampleFormatError as err:
            problems.append(str(err))
    else:
        problems.append(f"{FBANK_MEMBER} member missing")
    return Card(key, meta, captions, frames, audio, spectrogram, duration, samples, loudness, problems)


# ------------------------------------------------------------------------------------------------ page

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f4f4f2;color:#222}
header,section{padding:12px 20px}header{background:#fff;border-bottom:1px solid #ddd}
h1{font-size:20px;margin:4px 0 8px}h2{font-size:16px;margin:14px 0 6px}
table{border-collapse:collapse;background:#fff}td,th{border:1px solid #ddd;padding:3px 7px;text-align:left;
vertical-align:top}th{background:#eee}.num{text-align:right;font-variant-numeric:tabular-nums}
.plots img{height:130px;margin-right:8px;border:1px solid #ddd;background:#fff}
.filters button,.sorts button{margin:2px 4px 2px 0;border:1px solid #999;background:#fff;border-radius:12px;
padding:2px 10px;cursor:pointer}.filters button.on,.sorts button.on{background:#335;color:#fff}
.cards{display:flex;flex-wrap:wrap;gap:12px;padding:12px 20px}
.card{background:#fff;border:1px solid #ccc;border-radius:6px;padding:10px;width:520px}
.card h3{font-size:13px;margin:0 0 6px;font-family:monospace;word-break:break-all}
.strip{display:flex;align-items:center;gap:4px}.strip img{width:96px;height:96px;object-fit:cover}
.strip img.mid{width:160px;height:160px;outline:2px solid #335}
.spec{display:block;margin:6px 0;width:256px;height:64px;image-rendering:pixelated}
audio{width:100%;margin:6px 0}.facts{color:#555;font-size:12px}.problem{background:#fdd;padding:4px}
.gen{background:#eef4ff;padding:4px;margin:4px 0}.score{font-weight:bold}
ol.caps{margin:4px 0;padding-left:20px}.warn{background:#fea;padding:6px}
.fp{font-family:monospace;word-break:break-all}.row{display:flex;gap:32px;flex-wrap:wrap;align-items:flex-start}
.row>div{max-width:560px}
"""

# Reads only data-* attributes the page wrote itself; writes what it sees into the DOM (audio metadata and
# errors), so a headless browser's dump shows whether every player loaded.
_JS = """
(function(){
  var cards = document.getElementById('cards');
  function sortCards(how){
    var list = Array.prototype.slice.call(cards.querySelectorAll('.card'));
    list.sort(function(a, b){
      if (how === 'key') return a.dataset.key < b.dataset.key ? -1 : a.dataset.key > b.dataset.key ? 1 : 0;
      var x = parseFloat(a.dataset.cider), y = parseFloat(b.dataset.cider);
      return how === 'worst' ? x - y : y - x;
    });
    list.forEach(function(c){ cards.appendChild(c); });
    document.querySelectorAll('.sorts button').forEach(function(b){
      b.classList.toggle('on', b.dataset.sort === how); });
    cards.dataset.order = how;
  }
  document.querySelectorAll('.sorts button').forEach(function(b){
    b.addEventListener('click', function(){ sortCards(b.dataset.sort); }); });
  function filterFailures(reason){
    var shown = 0;
    document.querySelectorAll('#failures tbody tr').forEach(function(r){
      var on = reason === '' || r.dataset.reason === reason; r.hidden = !on; if (on) shown++; });
    document.querySelectorAll('.filters button').forEach(function(b){
      b.classList.toggle('on', b.dataset.reason === reason); });
    var s = document.getElementById('failures-shown'); if (s) s.textContent = shown;
  }
  document.querySelectorAll('.filters button').forEach(function(b){
    b.addEventListener('click', function(){ filterFailures(b.dataset.reason); }); });
  var players = document.querySelectorAll('audio'), loaded = 0, failed = 0;
  function tally(){
    document.getElementById('audio-status').textContent =
      loaded + ' of ' + players.length + ' players loaded' + (failed ? ', ' + failed + ' failed' : '');
  }
  players.forEach(function(a){
    var out = a.parentNode.querySelector('.audio-meta');
    function done(){ loaded++; out.textContent = 'loaded ' + a.duration.toFixed(3) + ' s';
      out.dataset.duration = a.duration; tally(); }
    if (a.readyState >= 1) done(); else a.addEventListener('loadedmetadata', done, {once: true});
    a.addEventListener('error', function(){ failed++;
      out.textContent = 'error ' + (a.error ? a.error.code : '?'); out.dataset.error = '1'; tally(); });
  });
  tally();
  document.body.dataset.scripts = 'ran';
})();
"""


def _fmt(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _youtube_link(meta: dict[str, Any]) -> str:
    yid = meta.get("youtube_id")
    if not isinstance(yid, str) or not YOUTUBE_ID_RE.match(yid):
        return ""
    start = meta.get("start_time")
    t = f"&t={int(start)}s" if isinstance(start, (int, float)) and not isinstance(start, bool) and start >= 0 else ""
    return f' <a href="https://www.youtube.com/watch?v={quote(yid)}{t}" rel="noreferrer">YouTube</a>'


def _card_html(c: Card, n: int, rel: str, middle: int) -> str:
    cider = "" if c.cider is None else f' data-cider="{c.cider!r}"'
    parts = [f'<article class="card" id="card-{n}" data-key="{e(c.key)}"{cider}>',
             f"<h3>{e(c.key)}{_youtube_link(c.meta)}</h3>", '<div class="strip">']
    parts += [f'<img src="{e(rel)}/{e(name)}" alt="frame {i}" title="frame {i}"'
              f'{" class=mid" if i == middle else ""} loading="lazy">' for i, name in c.frames]
    parts.append("</div>")
    if c.audio:
        parts.append(f'<div><audio controls preload="metadata" src="{e(rel)}/{e(c.audio)}"></audio>'
                     f'<span class="audio-meta facts" data-expected="{c.duration!r}">not loaded</span></div>')
    if c.spectrogram:
        parts.append(f'<img class="spec" src="{e(rel)}/{e(c.spectrogram)}" alt="fbank spectrogram">')
    facts = [f"duration {_fmt(c.duration, 2)} s", f"loudness {_fmt(c.loudness, 1)} dBFS"]
    if c.samples is not None:
        facts.append(f"{c.samples} samples")
    parts.append(f'<div class="facts">{e(" · ".join(facts))}</div>')
    if c.generated is not None:
        parts.append(f'<div class="gen">generated: <span class="generated">{e(c.generated)}</span> · CIDEr-D '
                     f'<span class="score">{_fmt(c.cider)}</span></div>')
    parts.append('<ol class="caps">' + "".join(f'<li class="caption">{e(cap)}</li>' for cap in c.captions) + "</ol>")
    parts += [f'<div class="problem">{e(p)}</div>' for p in c.problems]
    parts.append("</article>")
    return "".join(parts)


def _table(rows: Iterable[tuple], head: tuple, attrs: Iterable[str] | None = None, tid: str = "") -> str:
    attrs = list(attrs) if attrs is not None else None
    out = [f'<table{f" id={tid}" if tid else ""}><thead><tr>' + "".join(f"<th>{e(h)}</th>" for h in head) +
           "</tr></thead><tbody>"]
    for i, r in enumerate(rows):
        extra = attrs[i] if attrs is not None else ""
        out.append(f"<tr{extra}>" + "".join(
            f'<td class="num">{e(v)}</td>' if isinstance(v, (int, float)) and not isinstance(v, bool)
            else f"<td>{e(v)}</td>" for v in r) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _page(*, split: str, data: str, entry: dict, counts: dict[str, int], failures: list[dict],
          reasons: dict[str, int], plots: list[str], cards: list[Card], clips: int, rel: str, middle: int,
          sample: int, seed: int, results: Path | None, metrics: dict | None, per_clip: dict[str, float] | None,
          predictions: dict[str, str] | None, warnings: list[str]) -> str:
    title = f"Gallery of split {split}" + (" with generated captions" if results else "")
    h = ["<!doctype html><html lang=en><head><meta charset=utf-8>",
         '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src \'self\'; '
         'media-src \'self\'; style-src \'unsafe-inline\'; script-src \'unsafe-inline\'">',
         f"<title>{e(title)}</title><style>{_CSS}</style></head><body data-scripts=none><header>",
         f"<h1>{e(title)}</h1>",
         f'<p>data <code>{e(data)}</code> · {clips} clips in {len(entry.get("shards") or [])} shards · '
         f'<span id="cards-count">{len(cards)}</span> cards (a seeded sample: --sample {sample} --seed {seed})'
         + (f" · results <code>{e(results)}</code>" if results else "") + "</p>"]
    h += [f'<p class="warn">{e(w)}</p>' for w in warnings]
    fp = entry.get("fingerprint")
    tools = entry.get("tool_versions")
    h.append('<div class="row"><div><h2>Clips by status</h2>' + _table([tuple(counts.values())], tuple(counts)) +
             '</div><div><h2>Failure reasons</h2><p class="filters" id="reason-filter">'
             '<button data-reason="" class=on>all</button>' +
             "".join(f'<button data-reason="{e(r)}">{e(r)} <span class="n">{n}</span></button>'
                     for r, n in reasons.items()) + "</p></div>"
             f'<div><h2>Manifest</h2><p>fingerprint <span class="fp" id="fingerprint">{e(fp or "not recorded")}'
             "</span>" + (f'<br>updated {e(entry.get("updated_at"))}' if entry.get("updated_at") else "") + "</p>" +
             ("<details><summary>tool versions</summary>" +
              _table(((k, v) for k, v in sorted(tools.items())), ("tool", "version")) + "</details>"
              if isinstance(tools, dict) and tools else "") + "</div></div>")
    if metrics is not None:
        names = [k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        missing = metrics.get("unavailable") or {}
        h.append('<h2>Split metrics</h2><table id="metrics"><thead><tr>' +
                 "".join(f"<th>{e(k)}</th>" for k in names) + "</tr></thead><tbody><tr>" +
                 "".join(f'<td class="num" data-metric="{e(k)}">{e(round(float(metrics[k]), 4))}</td>'
                         for k in names) + "</tr></tbody></table>" +
                 (f'<p class="facts">unavailable: {e("; ".join(f"{k} ({v})" for k, v in missing.items()))}</p>'
                  if isinstance(missing, dict) and missing else ""))
    if plots:
        h.append('<h2>Build plots</h2><div class="plots">' +
                 "".join(f'<img src="{e(rel)}/{e(p)}" alt="{e(p)}">' for p in plots) + "</div>")
    h.append('<p>audio: <span id="audio-status">scripts did not run</span></p></header>')
    if per_clip is not None:
        h.append('<section><p class="sorts">sort cards: <button data-sort="worst" class=on>worst CIDEr-D first'
                 '</button><button data-sort="best">best first</button><button data-sort="key">by key</button></p>'
                 "</section>")
    order = "worst" if per_clip is not None else "key"
    h.append(f'<main class="cards" id="cards" data-order="{order}">' +
             "".join(_card_html(c, i, rel, middle) for i, c in enumerate(cards)) + "</main>")
    if per_clip is not None and predictions is not None:
        carded = {c.key: i for i, c in enumerate(cards)}
        worst = sorted(per_clip, key=lambda k: (per_clip[k], k))
        rows = "".join(f'<tr data-key="{e(k)}"><td>' +
                       (f'<a href="#card-{carded[k]}">{e(k)}</a>' if k in carded else e(k)) +
                       f'</td><td class="num clip-cider">{per_clip[k]!r}</td><td>{e(predictions[k])}</td></tr>'
                       for k in worst)
        h.append(f"<section><h2>Every scored clip, worst first ({len(per_clip)})</h2><details><summary>show"
                 '</summary><table id="scores"><thead><tr><th>clip</th><th>CIDEr-D</th><th>generated</th></tr>'
                 f"</thead><tbody>{rows}</tbody></table></details></section>")
    h.append(f'<section><h2>Failures (<span id="failures-shown">{len(failures)}</span> shown of {len(failures)})'
             "</h2>" + _table(((f["key"], f["status"], f["reason"], f["message"][-MESSAGE_TAIL_CHARS:],
                                "—" if f["attempts"] is None else f["attempts"]) for f in failures),
                               ("clip", "status", "reason", "message (tail)", "attempts"),
                               attrs=[f' data-reason="{e(f["reason"])}"' for f in failures], tid="failures") +
             "</section>")
    h.append(f"<script>{_JS}</script></body></html>\n")
    return "".join(h)


# ------------------------------------------------------------------------------------------------ build

def write_gallery(data: str | Path, split: str = "test", out: str | Path | None = None,
                  results: str | Path | None = None, sample: int = DEFAULT_SAMPLE, seed: int = 0) -> GalleryPage:
    """Write `OUT/reports/gallery-{split}.html` (+ `OUT/reports/gallery-{split}/`) for the split of the dataset
    at `data` (a directory or manifest URL); OUT defaults to `data`. See the module docstring."""

    data = str(data)
    try:
        validate_split(split)
    except ValueError as err:
        raise GalleryError(str(err)) from err
    if sample < 0:
        raise GalleryError(f"--sample must be >= 0, got {sample}")
    if out is None:
        out = _local_dir(data)
        if out is None:
            raise GalleryError(f"data {data} is not local: say where the page goes (out=DIR)")
    out = Path(out)
    try:
        url, raw = read_manifest(data)
    except (OSError, ValueError) as err:
        raise GalleryError(str(err)) from err
    entry = (raw.get("splits") or {}).get(split) if isinstance(raw, dict) else None
    if not isinstance(entry, dict):
        have = sorted(raw.get("splits") or {}) if isinstance(raw, dict) and isinstance(raw.get("splits"), dict) else []
        raise GalleryError(f"dataset manifest {url} has no split {split!r} (splits: {have or 'none'})")
    if entry.get("shards"):
        try:
            info = load_split(data, split)
        except (OSError, ValueError) as err:
            raise GalleryError(str(err)) from err
        keys = _list_keys(info)
        frames_per_clip = info.frames_per_clip
    else:                                        # a build where every clip failed: header and failures only
        info, keys, frames_per_clip = None, [], 1
    counts, failures = _ledger_view(data, split, entry)
    reasons: dict[str, int] = {}
    for f in failures:
        reasons[f["reason"]] = reasons.get(f["reason"], 0) + 1
    reasons = dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))

    predictions = metrics = per_clip = None
    warnings: list[str] = []
    population = sorted(keys)
    if results is not None:
        results = Path(results)
        predictions = read_results(results)
        unknown = sorted(set(predictions) - set(keys))
        if unknown:
            raise GalleryError(f"results file {results}: {len(unknown)} clips are not in split {split!r} of {url}, "
                               f"e.g. {unknown[:3]}")
        population = sorted(predictions)
        metrics = read_metrics(results)
    chosen = sorted(random.Random(seed).sample(population, min(sample, len(population))))
    middle = eval_frame_start(frames_per_clip, 1)
    frame_ids = strip_frames(frames_per_clip)
    want: dict[str, set[str]] = {k: {JSON_MEMBER} for k in (predictions or {})}
    for k in chosen:
        want[k] = {JSON_MEMBER, FLAC_MEMBER, FBANK_MEMBER} | {frame_member(i, frames_per_clip) for i in frame_ids}

    reports = out / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    assets_name = f"gallery-{split}"
    final_assets = reports / assets_name
    remove_stale_temps(reports)                   # asset dirs of killed runs (their pid is gone)
    tmp_assets = temp_dir(reports, assets_name)
    try:
        number = {k: n for n, k in enumerate(chosen)}
        made: dict[str, Card] = {}
        jsons: dict[str, bytes] = {}

        def take(key: str, members: dict[str, bytes]) -> None:
            # Cards are made as their samples are read: only one sample's members are held at a time.
            if key in number:
                made[key] = _make_card(number[key], key, members, frame_ids, frames_per_clip, tmp_assets)
            if predictions is not None and key in predictions and JSON_MEMBER in members:
                jsons[key] = members[JSON_MEMBER]

        if info is not None:
            _read_samples(info, want, take)
        cards = [made[k] for k in chosen]
        if predictions is not None:
            metrics, per_clip, note = _score(predictions, jsons, metrics, results)
            warnings += note
            for c in cards:
                c.generated, c.cider = predictions[c.key], per_clip[c.key]
            cards.sort(key=lambda c: (c.cider, c.key))       # worst first, as the page opens
        plots = []
        here = _local_dir(data)
        if here is not None:
            for name in PLOTS:
                src = here / "reports" / f"build-{split}-{name}.png"
                if src.is_file():
                    shutil.copyfile(src, tmp_assets / src.name)
                    plots.append(src.name)
        page = _page(split=split, data=data, entry=entry, counts=counts, failures=failures, reasons=reasons,
                     plots=plots, cards=cards, clips=len(keys), rel=assets_name, middle=middle, sample=sample,
                     seed=seed, results=results, metrics=metrics, per_clip=per_clip, predictions=predictions,
                     warnings=warnings)
        if final_assets.exists():
            shutil.rmtree(final_assets)
        tmp_assets.rename(final_assets)
    except BaseException:
        shutil.rmtree(tmp_assets, ignore_errors=True)
        raise
    html_path = reports / f"gallery-{split}.html"
    atomic_write_text(html_path, page)
    result = GalleryPage(html_path, final_assets, split, len(keys), len(cards), counts, reasons, metrics, per_clip,
                         warnings)
    log.info("gallery: %s (%s)", html_path, result.summary())
    return result


def build_gallery_artifact(out_dir: str, split: str, sample: int = DEFAULT_SAMPLE,
                           artifacts: bool = True) -> GalleryPage | None:
    """A build's gallery: write the page, then (`artifacts`, inside a flow or task run) publish its path and a
    summary as a Prefect markdown artifact `avcap-build-{split}-gallery`. A page that cannot be made (a build
    stopped before its manifest) is a warning: it must not replace the build's own outcome."""
    try:
        page = write_gallery(out_dir, split, sample=sample)
    except GalleryError as err:
        log.warning("no gallery for split %s: %s", split, err)
        return None
    log.info("gallery of split %s: %s", split, page.html)
    if not artifacts:
        return page
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(
        key=artifact_key(split, "gallery"),
        markdown=f"# Gallery of split `{split}`\n\n- page: `{page.html}`\n- {page.summary()}\n",
        description=f"Gallery of split {split}: {page.html}")
    return page


# ------------------------------------------------------------------------------------------------ CLI

def add_gallery_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path, help="build directory (manifest.json, shards, ledger)")
    p.add_argument("--split", default="test", help="split to show (default test)")
    p.add_argument("--results", type=Path, help="COCO results file of an evaluation (avcap.evaluate --out): adds "
                                                "generated captions, per-clip CIDEr-D and the split's metrics")
    p.add_argument("--sample", type=int, default=DEFAULT_SAMPLE, help=f"clips shown (default {DEFAULT_SAMPLE})")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample (same seed, same cards)")


def gallery_main(a: argparse.Namespace) -> int:
    try:
        page = write_gallery(a.out, a.split, results=a.results, sample=a.sample, seed=a.seed)
    except GalleryError as err:
        print(f"gallery failed: {err}", file=sys.stderr)
        return 1
    print(page.html)
    print(page.summary(), file=sys.stderr)
    for w in page.warnings:
        print(f"warning: {w}", file=sys.stderr)
    return 0
