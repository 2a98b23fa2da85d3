"""The data pipeline: AudioCaps CSV -> yt-dlp -> ffmpeg -> fbank -> staged samples (shards are in `shards`).

Modules, one stage each: manifest (CSV/JSON -> clips), download (yt-dlp window downloads, local media),
extract (one ffmpeg decode per clip), features (Kaldi fbank), ledger (per-clip status in SQLite), and build
(the stages chained; `flows.py build` runs it as a Prefect flow).
"""
