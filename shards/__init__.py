"""Shards: WebDataset tars of finished samples (writer), the dataset manifest (manifest), the training loader.

Kept import-free so the loader side does not pull in the pipeline's ffmpeg/torchaudio code."""
