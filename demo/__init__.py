"""The embedded demo: a synthetic captioning dataset, a loopback media server and the end-to-end run.

`python -m demo.run` generates clips whose captions describe their content (demo.media), serves them over
HTTP on 127.0.0.1 (demo.server) so the real build flow downloads them with yt-dlp, trains a tiny captioner with
torchrun and evaluates it on held-out clips.
"""
