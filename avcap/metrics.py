"""Caption metrics: COCO caption evaluation (pycocoevalcap) with a Java path and a Java-free path.

- `score_captions(predictions, references)`: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D (pycocoevalcap's `Cider` is the
  CIDEr-D variant: sigma 6, clipped counts, x10), SPICE and SPIDEr = (CIDEr-D + SPICE) / 2 when the user supplies
  the Stanford CoreNLP 3.6.0 jars. Unavailable metrics are None, never a crash; `format_scores` prints them as
  "unavailable" and `last_unavailable_reasons` says why.
- Tokenization: pycocoevalcap's `PTBTokenizer` runs Stanford's Java PTBTokenizer (lower-cased, punctuation
  removed). `ptb_tokenize` reimplements it in Python (clitics split, brackets as -lrb-/-rrb-, quotes as ``/'',
  the same punctuation removed), checked against the Java tokenizer on every AudioCaps caption, so that BLEU,
  ROUGE-L and CIDEr-D come out identical on machines without Java. METEOR and SPICE are Java programs: without
  Java they are unavailable.
- `write_coco_results(path, predictions)`: the COCO results file `[{"image_id": key, "caption": text}, ...]`.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from shards.atomic import atomic_write_text

log = logging.getLogger(__name__)

METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE", "SPIDEr")

# What pycocoevalcap's PTBTokenizer drops after tokenizing (note: compared before lower-casing would matter,
# but its -lowerCase output has "-lrb-", so brackets survive as tokens, exactly as in the original evaluation).
PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
                "...", ";"}

# -----------------------------------------------------------------------------
# Python PTB tokenizer (Stanford PTBTokenizer 3.4.1, options -preserveLines -lowerCase)

_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# Contractions PTB splits inside one word (Penn Treebank conventions).
_SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"), "wanna": ("wan", "na"),
                "lemme": ("lem", "me"), "gimme": ("gim", "me"), "y'all": ("y'", "all")}
_ABBREV = {"mr.", "mrs.", "ms.", "dr.", "st.", "jr.", "sr.", "prof.", "vs.", "etc.", "inc.", "ltd.", "co.",
           "corp.", "mt.", "ft.", "no.", "jan.", "feb.", "mar.", "apr.", "jun.", "jul.", "aug.", "sep.", "sept.",
           "oct.", "nov.", "dec.", "approx.", "min.", "sec.", "hr.", "hrs."}

_TOKEN = re.compile(r"""
    (?P<acronym>(?:[a-z]\.){2,})                      # u.s.  p.m.  e.g.
  | (?P<number>[0-9]+(?:[.,:/][0-9]+)*(?![a-z0-9]))      # 1,000.5  5:30  1/2
  | (?P<nclitic>'n'|'[0-9]{2}s\b)                       # rock 'n' roll, the '90s
  | (?P<word>[a-z]+n't\b|y'all\b|@?[a-z0-9]+(?:[-/@_.&][a-z0-9]+)*(?:\.(?!\.))?)   # don't  well-known  @home  dog.
  | (?P<ellipsis>\.\.\.+)
  | (?P<dashes>--+)
  | (?P<clitic>'(?:s|re|ve|ll|d|m|n'?)\b)
  | (?P<sym>\S)
""", re.VERBOSE)
_NT = re.compile(r"^(.+)(n't)$")


def _ptb_word(tok: str, out: list[str]) -> None:
    """Splits one lexed word token into PTB tokens: a trailing period, n't, PTB's split words."""
    trailing_period = False
    if tok.endswith(".") and tok not in _ABBREV and not re.fullmatch(r"(?:[a-z]\.){2,}", tok):
        tok, trailing_period = tok[:-1], True
    if tok in _SPLIT_WORDS:
        out.extend(_SPLIT_WORDS[tok])
    else:
        m = _NT.match(tok)
        if m:
            out.extend((m.group(1), m.group(2)))
        else:
            out.append(tok)
    if trailing_period:
        out.append(".")


def ptb_tokenize_line(text: str) -> list[str]:
    """One caption -> the Stanford PTBTokenizer's lower-cased tokens (punctuation still included)."""
    text = (text.lower().replace("\u201c", '"').replace("\u201d", '"').replace("\u2018", "`")
            .replace("\u2019", "'").replace("\u2026", "..."))
    out: list[str] = []
    prev_space = True   # an opening double quote follows whitespace, an opening bracket or the line start
    pos = 0
    for m in _TOKEN.finditer(text):
        if m.start() > pos:
            prev_space = True
        pos = m.end()
        kind, tok = m.lastgroup, m.group()
        if kind == "word":
            _ptb_word(tok, out)
        elif kind == "sym":
            if tok == '"':
                out.append("``" if prev_space or (out and out[-1] in ("-lrb-", "-lsb-", "-lcb-", "``", "`"))
                           else "''")
            elif tok == "'" and prev_space:
                out.append("`")   # an opening single quote
            elif tok in _BRACKETS:
                out.append(_BRACKETS[tok])
            elif tok.isprintable() and ord(tok) < 0x10000:
                out.append(tok)
            # astral characters (emoji) are untokenizable to the Java lexer and dropped, as there
        elif kind == "clitic":
            out.append(tok)
        else:
            out.append(tok)
        prev_space = False
    return out


def ptb_tokenize(captions: dict[str, list[str]]) -> dict[str, list[str]]:
    """Python stand-in for pycocoevalcap's PTBTokenizer: {key: [caption]} -> {key: ["tok tok ..."]}."""
    return {k: [" ".join(t for t in ptb_tokenize_line(c.replace("\n", " ")) if t not in PUNCTUATIONS) for c in v]
            for k, v in captions.items()}


def java_available() -> bool:
    java = shutil.which("java")
    if java is None:
        return False
    try:
        return subprocess.run([java, "-version"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


# -----------------------------------------------------------------------------
# scoring

def write_coco_results(path: str | os.PathLike, predictions: dict[str, str]) -> Path:
    """The COCO caption results file, written atomically: [{"image_id": key, "caption": text}, ...]."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"image_id": k, "caption": predictions[k]} for k in sorted(predictions)]
    atomic_write_text(path, json.dumps(rows, indent=1, ensure_ascii=False))
    return path


def _check_inputs(predictions: dict[str, str], references: dict[str, list[str]]) -> None:
    if not predictions:
        raise ValueError("score_captions: no predictions to score")
    missing = [k for k in predictions if k not in references]
    if missing:
        raise ValueError(f"score_captions: {len(missing)} predicted keys have no references, e.g. {missing[:3]}")
    for k, p in predictions.items():
        if not isinstance(p, str):
            raise ValueError(f"score_captions: prediction for {k!r} is {type(p).__name__}, not str")
        refs = references[k]
        if not refs or isinstance(refs, str) or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"score_captions: references for {k!r} must be a non-empty list of strings, got {refs!r}")


def _spice(gts: dict[str, list[str]], res: dict[str, list[str]], jars: str) -> float:
    """SPICE with the user's Stanford CoreNLP 3.6.0 jars put on the classpath beside pycocoevalcap's spice jar."""
    import pycocoevalcap.spice as spice_pkg
    spice_dir = Path(spice_pkg.__file__).parent
    needed = ["stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar"]
    jar_paths = [Path(jars) / n for n in needed]
    absent = [str(p) for p in jar_paths if not p.is_file()]
    if absent:
        raise FileNotFoundError(f"SPICE needs {absent}")
    with tempfile.TemporaryDirectory(prefix="avcap-spice-") as tmp:
        inp, outp = Path(tmp) / "in.json", Path(tmp) / "out.json"
        inp.write_text(json.dumps([{"image_id": k, "test": res[k][0], "refs": gts[k]} for k in res]))
        cp = os.pathsep.join([str(spice_dir / "spice-1.0.jar")] + [str(p) for p in jar_paths])
        cmd = ["java", "-Xmx8G", "-cp", cp, "edu.anu.spice.SpiceScorer", str(inp), "-out", str(outp), "-subset",
               "-silent"]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=spice_dir, timeout=3600)
        if r.returncode != 0 or not outp.exists():
            raise RuntimeError(f"SPICE failed (exit {r.returncode}): {r.stderr.strip()[-500:]}")
        scores = json.loads(outp.read_text())
    vals = [s["scores"]["All"]["f"] for s in scores]
    return float(sum(vals) / len(vals))


def _tokenized(predictions: dict[str, str], references: dict[str, list[str]], java: bool
               ) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(references, predictions) tokenized as the scorers want them, keys sorted: Java PTB or its Python twin."""
    keys = sorted(predictions)
    gts_raw = {k: list(references[k]) for k in keys}
    res_raw = {k: [predictions[k]] for k in keys}
    if java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
        tok = PTBTokenizer()
        gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in gts_raw.items()})
        res = tok.tokenize({k: [{"caption": c} for c in v] for k, v in res_raw.items()})
        return gts, res
    return ptb_tokenize(gts_raw), ptb_tokenize(res_raw)


def cider_d_per_clip(predictions: dict[str, str], references: dict[str, list[str]],
                     use_java: bool | None = None) -> dict[str, float]:
    """Each clip's own CIDEr-D: pycocoevalcap's per-image scores, tokenized as in `score_captions` (same
    `use_java` rule), so their mean is the split's CIDEr-D. The document frequencies come from all the clips
    given: a clip's score depends on the rest of the split, so pass the whole split, not a sample of it."""
    from pycocoevalcap.cider.cider import Cider

    _check_inputs(predictions, references)
    java = java_available() if use_java is None else use_java
    if java and not java_available():
        raise RuntimeError("cider_d_per_clip(use_java=True): no working `java` on PATH")
    gts, res = _tokenized(predictions, references, java)
    _, per_image = Cider().compute_score(gts, res)
    # compute_score walks gts in insertion order: the sorted keys of _tokenized.
    return {k: float(v) for k, v in zip(gts, per_image)}


def score_captions(predictions: dict[str, str], references: dict[str, list[str]], use_java: bool | None = None,
                   spice_jars: str | None = None, unavailable: dict[str, str] | None = None
                   ) -> dict[str, float | None]:
    """COCO caption metrics of `predictions` (one caption per key) against `references` (several per key).

    use_java: None = use Java when a working `java` is on PATH; True = require it (PTB tokenizer and METEOR in
    Java); False = the Java-free path (Python PTB tokenizer; METEOR and SPICE None). spice_jars: a directory
    holding stanford-corenlp-3.6.0.jar and stanford-corenlp-3.6.0-models.jar; without it SPICE/SPIDEr are None.
    Returns {name: value or None} for every name in METRICS, plus "num_clips"; the reason each None metric is
    unavailable is logged and, when `unavailable` is given, stored there by name.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    _check_inputs(predictions, references)
    have_java = java_available()
    if use_java and not have_java:
        raise RuntimeError("score_captions(use_java=True): no working `java` on PATH (install Java 8+ or pass "
                           "use_java=False for the Java-free path)")
    java = have_java if use_java is None else use_java
    keys = sorted(predictions)
    gts, res = _tokenized(predictions, references, java)

    scores: dict[str, float | None] = {name: None for name in METRICS}
    reasons: dict[str, str] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        scores[f"Bleu_{n + 1}"] = float(bleu[n])
    scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if java:
        from pycocoevalcap.meteor.meteor import Meteor
        try:
            meteor = Meteor()   # its __del__ ends the Java process
            scores["METEOR"] = float(meteor.compute_score(gts, res)[0])
            del meteor
        except Exception as e:   # a broken Java install must not end a training run
            reasons["METEOR"] = f"METEOR failed: {e}"
    else:
        reasons["METEOR"] = "METEOR needs Java (Java-free path)"
    if not java:
        reasons["SPICE"] = "SPICE needs Java (Java-free path)"
    elif not spice_jars:
        reasons["SPICE"] = "SPICE needs the Stanford CoreNLP 3.6.0 jars (pass spice_jars=DIR)"
    else:
        try:
            scores["SPICE"] = _spice(gts, res, spice_jars)
        except Exception as e:
            reasons["SPICE"] = f"SPICE failed: {e}"
    if scores["SPICE"] is not None:
        scores["SPIDEr"] = (scores["CIDEr"] + scores["SPICE"]) / 2
    else:
        reasons["SPIDEr"] = "SPIDEr needs SPICE"
    for name, why in reasons.items():
        log.warning("%s unavailable: %s", name, why)
    if unavailable is not None:
        unavailable.update(reasons)
    scores["num_clips"] = float(len(keys))
    return scores


def format_scores(scores: dict[str, float | None]) -> str:
    """One line for logs: "Bleu_1 0.6512 ... SPICE unavailable"."""
    return "  ".join(f"{k} {'unavailable' if scores.get(k) is None else f'{scores[k]:.4f}'}" for k in METRICS)
