"""The gallery (pipeline.gallery): page structure, the audio it links, and the page in a real headless Chromium.

The build is the shared 4-clip ops build, copied and rebuilt by the real pipeline from an edited CSV: one clip
gets a hostile caption (HTML) and a caption with quotes and an ampersand, and two new rows fail (cached media
that is not a video: failed-permanent; no media and a dead URL: failed-transient), so the ledger holds real
failures with real reasons.
"""
from __future__ import annotations

import csv
import html.parser
import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pipeline import orchestrate as flows
from pipeline.gallery import GalleryError, strip_frames, write_gallery
from pipeline.ledger import Ledger
from shards.readers import open_shard_reader
from shards.split_info import load_split
from tests.fixtures_ops import OPS_CLIPS, OpsBuild, clip_key, copy_build

HOSTILE = "<img src=x onerror=alert(1)>"
QUOTED = 'a "loud" tone & <b>a hum</b>'
HOSTILE_GENERATED = "<script>document.body.dataset.pwned='yes'</script>a tone"
DEAD_URL = "http://127.0.0.1:9/{youtube_id}.mp4"


@pytest.fixture(scope="module")
def gallery_build(ops_build, tmp_path_factory) -> OpsBuild:
    from pipeline.build import BuildConfig, run_build
    from pipeline.download import DownloadConfig

    build = copy_build(ops_build, tmp_path_factory.mktemp("gallery") / "out")
    rows = [(900000 + i, yid, start, f"a steady tone of {tone:g} hertz") for i, (yid, start, tone) in enumerate(OPS_CLIPS)]
    yid0, start0, _ = OPS_CLIPS[0]
    rows += [(910000, yid0, start0, HOSTILE), (910001, yid0, start0, QUOTED),
             (910002, "galBroken01", 0, "never built"), (910003, "galMissing2", 0, "never downloaded")]
    (build.out_dir / "media" / f"{clip_key('galBroken01', 0)}.mp4").write_bytes(b"<html>not a video</html>")
    path = build.out_dir.parent / "v2.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["audiocap_id", "youtube_id", "start_time", "caption"])
        w.writerows(rows)
    result = run_build(BuildConfig(csv=[path], split=build.split, out=build.out_dir, samples_per_shard=2,
                                   download=DownloadConfig(url_template=DEAD_URL, max_retries=0, workers=1)))
    assert result.counts["ok"] == 4 and result.counts["failed-permanent"] == 1, result.counts
    assert result.counts["failed-transient"] == 1, result.counts
    from pipeline.report import build_report
    build_report(result, artifacts=False)            # the plots the gallery header shows
    return build


def _members(out: Path, split: str) -> dict[str, dict[str, bytes]]:
    """Every sample's json and flac, read independently of the gallery (through the loader's readers)."""
    got = {}
    for shard in load_split(str(out), split).shards:
        reader = open_shard_reader(shard)
        for key, m in reader.samples(lambda k: {"json", "flac"}):
            got[key] = {k: bytes(v) for k, v in m.items()}
        reader.close()
    return got


class _Page(html.parser.HTMLParser):
    """The page's elements as (tag, attrs) and its text, through the standard library's HTML parser."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.open_scripts = 0
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def find(self, tag: str, cls: str | None = None) -> list[dict]:
        return [a for t, a in self.elements if t == tag and (cls is None or cls in (a.get("class") or "").split())]


def _results(build: OpsBuild, tmp: Path) -> Path:
    from avcap.evaluate import score_and_write
    refs = {k: json.loads(m["json"])["captions"] for k, m in _members(build.out_dir, build.split).items()}
    keys = sorted(refs)
    preds = {keys[0]: HOSTILE_GENERATED, keys[1]: refs[keys[1]][0], keys[2]: "a steady tone",
             keys[3]: "music plays"}
    path = tmp / "eval-test.json"
    score_and_write(preds, refs, path, java="no")
    return path


def test_strip_frames_include_the_middle_frame():
    assert strip_frames(20) == [0, 5, 10, 15] and 20 // 2 in strip_frames(20)
    assert strip_frames(4) == [0, 1, 2, 3] and strip_frames(1) == [0]


def test_page_structure_links_audio_and_failure_filter(gallery_build, tmp_path):
    """flows.py gallery: HTML parses, one card per sampled clip, every link resolves to a file, the reason
    filter lists exactly the ledger's reasons, every <audio> is the shard's flac member (same bytes, same decoded
    samples), hostile text is escaped, the sample is deterministic."""
    out = gallery_build.out_dir
    assert flows.main(["gallery", "--out", str(out), "--split", "test", "--sample", "3", "--seed", "7"]) == 0
    page_path = out / "reports" / "gallery-test.html"
    text = page_path.read_text()
    page = _Page(text)
    cards = page.find("article", "card")
    assert len(cards) == 3
    for tag, attr in (("img", "src"), ("audio", "src"), ("a", "href")):
        for a in page.find(tag):
            target = a[attr]
            if target.startswith("https://www.youtube.com/watch?v="):
                continue
            if target.startswith("#"):
                assert f'id="{target[1:]}"' in text
                continue
            assert (page_path.parent / target).is_file(), target
    assert not any(a.get("src", "").startswith(("http:", "https:", "//")) for _, a in page.elements)
    # three build plots in the header
    assert sum(a["src"].endswith(("-durations.png", "-loudness.png", "-failures.png")) for a in page.find("img")) == 3

    with Ledger(out / "ledger.sqlite", "test") as ledger:
        reasons = {f.reason for f in ledger.failures()}
    assert len(reasons) == 2
    filter_reasons = {a["data-reason"] for a in page.find("button") if "data-reason" in a} - {""}
    assert filter_reasons == reasons
    assert {a["data-reason"] for a in page.find("tr") if "data-reason" in a} == reasons

    members = _members(out, "test")
    assert len(page.find("audio")) == 3
    for card, audio in zip(cards, page.find("audio")):
        data = (page_path.parent / audio["src"]).read_bytes()
        member = members[card["data-key"]]["flac"]
        assert data == member
        played, sr = sf.read(page_path.parent / audio["src"], dtype="int16")
        want, want_sr = sf.read(io.BytesIO(member), dtype="int16")
        assert sr == want_sr == 16000 and np.array_equal(played, want)
    # the same seed gives the same cards
    again = write_gallery(out, "test", sample=3, seed=7)
    assert [c["data-key"] for c in _Page(again.html.read_text()).find("article", "card")] == \
        [c["data-key"] for c in cards]
    # all the clips: the hostile captions are text, never markup
    everything = write_gallery(out, "test", sample=10)
    every_text = everything.html.read_text()
    assert everything.cards == 4 and everything.clips == 4
    assert HOSTILE not in every_text and QUOTED not in every_text
    assert html.escape(HOSTILE) in every_text and html.escape(QUOTED) in every_text
    assert not any(a.get("src") == "x" for a in _Page(every_text).find("img"))


def test_reads_only_what_it_shows_through_the_member_index(gallery_build, tmp_path, monkeypatch):
    """Every read goes through the loader's indexed reader; a sampled clip's members are json, flac, fbank.npy
    and the 4 strip frames, another clip's nothing (with results: its json alone, for the references)."""
    from shards import readers
    asked: dict[str, set[str]] = {}
    real = readers.IndexedShardReader.samples

    def spy(self, want):
        def record(key):
            got = want(key)
            asked[key] = asked.get(key, set()) | set(got or ())
            return got
        return real(self, record)

    monkeypatch.setattr(readers.IndexedShardReader, "samples", spy)
    monkeypatch.setattr(readers, "TarSampleReader", None)     # header parsing would fail loudly
    page = write_gallery(gallery_build.out_dir, "test", out=tmp_path, sample=2, seed=3)
    shown = {c["data-key"] for c in _Page(page.html.read_text()).find("article", "card")}
    strip = {f"frame{i:02d}.jpg" for i in strip_frames(20)}
    assert len(asked) == 4 and len(shown) == 2
    for key, members in asked.items():
        assert members == ({"json", "flac", "fbank.npy"} | strip if key in shown else set()), key

    results = _results(gallery_build, tmp_path)
    asked.clear()
    page = write_gallery(gallery_build.out_dir, "test", out=tmp_path, results=results, sample=2, seed=3)
    shown = {c["data-key"] for c in _Page(page.html.read_text()).find("article", "card")}
    for key, members in asked.items():
        assert members == ({"json", "flac", "fbank.npy"} | strip if key in shown else {"json"}), key


def test_results_page_per_clip_cider_adds_up(gallery_build, tmp_path):
    """--results: generated captions and per-clip CIDEr-D on the cards, worst first; their mean is the split's
    CIDEr-D of the metrics file; a results file naming a clip not in the split is refused by name."""
    results = _results(gallery_build, tmp_path)
    metrics = json.loads(results.with_name("eval-test.metrics.json").read_text())
    page = write_gallery(gallery_build.out_dir, "test", out=tmp_path / "site", results=results, sample=4)
    text = page.html.read_text()
    parsed = _Page(text)
    cards = parsed.find("article", "card")
    scores = [float(c["data-cider"]) for c in cards]
    assert len(cards) == 4 and scores == sorted(scores)              # worst first
    assert np.mean(scores) == pytest.approx(metrics["CIDEr"], abs=1e-12)
    every = [float(td) for td in _cells(text, "clip-cider")]
    assert len(every) == 4 and np.mean(every) == pytest.approx(metrics["CIDEr"], abs=1e-12)
    assert HOSTILE_GENERATED not in text and "&lt;script&gt;" in text
    assert page.warnings == []

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image_id": "nosuchclip1_0_10000", "caption": "x"}]))
    with pytest.raises(GalleryError, match=r"bad\.json: 1 clips are not in split 'test'.*nosuchclip1"):
        write_gallery(gallery_build.out_dir, "test", out=tmp_path / "site2", results=bad)
    bad.write_text('{"image_id": 1}')
    assert flows.main(["gallery", "--out", str(gallery_build.out_dir), "--results", str(bad)]) == 1


def test_undecodable_members_are_named_on_their_cards(learnable_data, tmp_path):
    """Hand-made shards whose flac member is 64 zero bytes (tests.fixtures_train): every card names the problem
    and has no player; frames, spectrogram and captions are still shown; no ledger: the manifest's counts."""
    page = write_gallery(learnable_data.root, "val", out=tmp_path, sample=3)
    parsed = _Page(page.html.read_text())
    problems = [t for t in parsed.text if t.startswith("flac member undecodable")]
    assert page.cards == 3 and len(problems) == 3 and not parsed.find("audio")
    assert len(parsed.find("img", "spec")) == 3 and len(parsed.find("img", "mid")) == 3
    assert len(parsed.find("li", "caption")) == 6


def _cells(text: str, cls: str) -> list[str]:
    import re
    return re.findall(rf'<td class="num {cls}">([^<]*)</td>', text)


# --no-sandbox: Chromium refuses to run as root with its sandbox; nothing else is relaxed (file:// pages keep
# their default same-origin rules), so what loads here loads from a user's disk too.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--mute-audio", "--hide-scrollbars"]


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail("chromium is not installed: run scripts/setup.sh (it installs Debian's chromium)")
    profile = tmp_path / "chromium-profile"
    return subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                          text=True, timeout=60)


def test_page_in_headless_chromium(gallery_build, tmp_path):
    """The page from a file:// URL in Chromium: after its scripts ran the DOM shows every card, the per-clip
    scores and the hostile captions as text (no element made of them, no script of theirs ran); every <audio>
    reached loadedmetadata with its clip's duration; a screenshot is not blank."""
    results = _results(gallery_build, tmp_path)
    page = write_gallery(gallery_build.out_dir, "test", out=tmp_path / "site", results=results, sample=4)
    url = page.html.resolve().as_uri()
    r = _chromium(tmp_path, "--virtual-time-budget=15000", "--dump-dom", url)
    assert r.returncode == 0, r.stderr[-2000:]
    dom = r.stdout
    parsed = _Page(dom)
    body = parsed.find("body")[0]
    assert body.get("data-scripts") == "ran" and "data-pwned" not in body
    cards = parsed.find("article", "card")
    assert len(cards) == 4
    assert [float(c["data-cider"]) for c in cards] == [page.per_clip_cider[c["data-key"]] for c in cards]
    text = "".join(parsed.text)
    assert HOSTILE in text and HOSTILE_GENERATED in text       # shown as text ...
    assert not any(a.get("src") == "x" for a in parsed.find("img")) and len(parsed.find("script")) == 1
    metas = parsed.find("span", "audio-meta")
    assert len(metas) == 4
    for m in metas:
        assert "data-error" not in m
        assert float(m["data-duration"]) == pytest.approx(float(m["data-expected"]), abs=1e-3)
    assert "4 of 4 players loaded" in text

    shot = tmp_path / "shot.png"
    r = _chromium(tmp_path, "--virtual-time-budget=5000", "--window-size=1280,1400", f"--screenshot={shot}", url)
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    from PIL import Image
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (1400, 1280) and pixels.std() > 20


def test_evaluate_writes_the_evaluation_gallery(gallery_build, caption_vocab_path, tmp_path, one_torch_thread):
    """avcap.evaluate --gallery: the evaluation's page beside its results, with every clip's generated caption
    and CIDEr-D, the mean of which is the evaluation's CIDEr-D."""
    import torch

    from avcap.checkpoint import save_checkpoint
    from avcap.evaluate import EvalConfig, evaluate_checkpoint
    from avcap.model import AVCap, AVCapConfig
    from avcap.tokenizer import load_tokenizer, special_ids, tokenizer_vocab

    tok = load_tokenizer(caption_vocab_path)
    ids = special_ids(tok)
    cfg = AVCapConfig.tiny(depth_a=1, depth_v=1, depth_u=1, embed_dim=32, num_heads=2, text_hidden=32,
                           text_heads=2, text_ffn=64, text_layers=1, max_positions=64, vocab_size=len(tok),
                           cls_id=ids.cls, sep_id=ids.sep, pad_id=ids.pad)
    torch.manual_seed(0)
    ckpt = tmp_path / "model.pt"
    save_checkpoint(ckpt, AVCap(cfg), cfg, tokenizer_vocab(tok), norm_stats={"mean": -4.346, "std": 4.332},
                    frames_per_clip=20)
    out = tmp_path / "eval" / "eval-test.json"
    scores = evaluate_checkpoint(EvalConfig(checkpoint=str(ckpt), data=str(gallery_build.out_dir), split="test",
                                            out=str(out), java="no", num_workers=0, batch_size=4, beam_size=2,
                                            max_gen_steps=5, device="cpu", gallery=True))
    page_path = out.parent / "reports" / "gallery-test.html"
    text = page_path.read_text()
    cards = _Page(text).find("article", "card")
    preds = {r["image_id"]: r["caption"] for r in json.loads(out.read_text())}
    assert sorted(c["data-key"] for c in cards) == sorted(preds) == gallery_build.keys
    assert np.mean([float(c["data-cider"]) for c in cards]) == pytest.approx(scores["CIDEr"], abs=1e-12)
    assert all(f'class="generated">{html.escape(p)}<' in text for p in preds.values())
