"""The loader's public entry: `make_loader(LoaderConfig, rank, world_size, epoch, start_batch)` gives one rank's
batches of one epoch over a dataset's shards; workers only read and decode, augmentation runs on the device.

Pipeline per (rank, worker) "slot", rebuilt every epoch, one module per step:

    manifest shard list (shards.split_info.load_split)
        ─► epoch plan (shards.epoch_plan: deterministic shard shuffle by (seed, epoch), split by rank and worker)
        ─► shard reader (shards.readers: reads only the members a sample uses)
        ─► sample shuffle buffer (train; here) ─► decode fbank.npy / the chosen JPEG frame(s) / json into batch
           tensors (shards.batching, shards.decode, memory from shards.buffer_pool) ─► batches

Batch counts come from the manifest alone (shards.epoch_plan): every rank yields the same number, so uneven
shards never leave a DDP rank waiting on another, and eval reads every clip exactly once, padding with samples
whose `valid` flag is False, which the caller drops after gathering. A sample that does not decode
(skip_bad_shards) is skipped and the next one takes its row, so the counts hold; a resumed epoch then decodes the
batches it skips, since the skipped samples decide where it is.

Randomness in the workers is a pure function of (seed, epoch, slot, clip key), never of timing or worker
scheduling: the train frame (window) and the train caption per sample are picked by a stable hash of
(seed, epoch, pass, key), so workers decode only the frames used. Resuming mid-epoch with `start_batch=k`
yields exactly the batches k.. of the uninterrupted epoch (skipped samples are read but not decoded).
The batch layout is in shards.batching.
"""
from __future__ import annotations

import functools
import gc
import importlib.machinery
import multiprocessing
import os
import random
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from avcap.tokenizer import load_tokenizer
from shards.batching import Batcher, sample_members
from shards.epoch_plan import SlotPart, batches_per_epoch, eval_frame_start, plan_epoch
from shards.hashing import stable_hash
from shards.index import ShardError
from shards.readers import TarSampleReader, is_remote_indexed, open_shard_reader
from shards.remote import RemoteConfig, RemoteReadError, RemoteStore, SlotCache, is_remote
from shards.split_info import SplitInfo, load_split
from shards.tls import certificate_failure


@dataclass
class LoaderConfig:
    data: str                        # dataset directory, or the URL / path of its manifest.json
    shard_base: str = ""             # read the manifest's shard paths under this path / URL (pipe: too)
    split: str = "train"
    batch_size: int = 8
    num_workers: int = 2             # decode workers per rank; 0 decodes in the calling process
    shuffle_buffer: int = 200        # samples per worker (each holds ~0.3 MB of undecoded bytes)
    seed: int = 0
    num_frames: int = 1              # consecutive frames per sample
    train: bool = True               # train: shuffles, wrap-around, random frame; eval: exactly once, middle frame
    skip_bad_shards: bool = False    # warn and skip a damaged shard instead of raising ShardError
    tokenizer: str | None = None     # vocab path / hub name: workers also emit tokens + need_predict
    max_caption_tokens: int = 40
    prefetch_factor: int = 4
    pin_memory: bool = False
    remote: RemoteConfig = field(default_factory=RemoteConfig)   # timeouts, retries, requests in flight


# -----------------------------------------------------------------------------
# the per-rank dataset

class ShardStream(IterableDataset):
    """One rank's batches for one epoch; each DataLoader worker plays one slot of the epoch plan."""

    def __init__(self, info: SplitInfo, cfg: LoaderConfig, rank: int, world_size: int, epoch: int,
                 start_batch: int = 0):
        if not 1 <= cfg.num_frames <= info.frames_per_clip:
            raise ValueError(f"num_frames={cfg.num_frames} but the dataset has {info.frames_per_clip} frames per clip")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.info, self.cfg, self.rank, self.world_size, self.epoch = info, cfg, rank, world_size, epoch
        self.workers = max(1, cfg.num_workers)
        self.total = batches_per_epoch(info, world_size, cfg.num_workers, cfg.batch_size, cfg.train)
        if not 0 <= start_batch <= self.total:
            raise ValueError(f"start_batch {start_batch} outside the epoch's {self.total} batches")
        self.start_batch = start_batch
        self._store: RemoteStore | None = None   # made in the worker on first use (fsspec sessions stay there)
        self.bad_samples = 0   # samples skipped because a member did not decode (skip_bad_shards)
        self.plan = plan_epoch(info, world_size * self.workers, cfg.seed, epoch, cfg.train)

    def __len__(self) -> int:
        return self.total - self.start_batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        wi = get_worker_info()
        proc = wi.id if wi is not None else 0
        if wi is not None and wi.num_workers != self.workers:
            raise RuntimeError(f"ShardStream planned for {self.workers} workers, DataLoader has {wi.num_workers}")
        # Batch i of the epoch comes from role i % workers. DataLoader asks its processes round-robin from
        # process 0, so after skipping start_batch batches process 0 must play role start_batch % workers.
        role = (proc + self.start_batch) % self.workers
        slot = self.rank * self.workers + role
        tok = None
        if self.cfg.tokenizer:
            tok = load_tokenizer(self.cfg.tokenizer)
        batcher = Batcher(self.info, batch_size=self.cfg.batch_size, num_frames=self.cfg.num_frames, tokenizer=tok,
                          max_caption_tokens=self.cfg.max_caption_tokens)
        B = self.cfg.batch_size
        quota = len(range(role, self.total, self.workers))
        skip = len(range(role, self.start_batch, self.workers))
        rows = self._train_rows(slot, role, quota * B) if self.cfg.train else self._eval_rows(slot)
        done = 0        # batches of this role made (or, when resuming, passed over)
        passed = 0      # rows passed over without decoding, when resuming
        pad = None      # eval: a row that decoded, to pad the last batches with (valid=False)
        bad_in_a_row = 0
        while done < quota:
            row = next(rows, None)
            if row is None:   # eval: the slot's samples are done; pad up to the quota every worker yields
                pad = pad or self._pad_row()
                row = (*pad, 0, False)
            if done < skip and not self.cfg.skip_bad_shards:
                # Read (to keep the shuffle identical) but not decoded. With skip_bad_shards the skipped batches
                # are decoded like the others: which samples do not decode decides where the epoch stands.
                passed += 1
                if passed == B:
                    done, passed = done + 1, 0
                continue
            try:
                batcher.add(*row)
            except ShardError as e:
                if not self.cfg.skip_bad_shards or not row[5]:
                    raise
                self.bad_samples += 1
                bad_in_a_row += 1
                warnings.warn(f"skipped sample {row[1]} of shard {row[0]} ({self.bad_samples} skipped so far by "
                              f"rank {self.rank} loader role {role}): {e}")
                if bad_in_a_row > self.info.num_samples:
                    raise ShardError(f"rank {self.rank} loader role {role}: no sample of its shards decodes "
                                     f"(last: {e})") from e
                continue
            bad_in_a_row = 0
            if pad is None and row[5]:
                pad = row[:4]
            if len(batcher) == B:
                batch = batcher.emit()
                done += 1
                if done > skip:
                    yield batch

    # -- reading ---------------------------------------------------------------

    def _frame0(self, key: str, pass_idx: int) -> int:
        F, nf = self.info.frames_per_clip, self.cfg.num_frames
        if not self.cfg.train:
            return eval_frame_start(F, nf)
        return stable_hash("frame", self.cfg.seed, self.epoch, pass_idx, key) % (F - nf + 1)

    def _remote_store(self) -> RemoteStore:
        if self._store is None:
            self._store = RemoteStore(self.cfg.remote)
        return self._store

    def _read_parts(self, parts: list[SlotPart], pass_idx: int, limit: int | None = None,
                    cache: SlotCache | None = None) -> Iterator[tuple[str, str, dict[str, bytes], int]]:
        """Raw samples (url, key, members, frame0) of a slot's parts, checking counts against the manifest.

        Stops after `limit` samples: what the slot still needs this epoch, so nothing past it is read (or, for a
        remote shard, fetched). `cache` (the slot's, for the epoch) keeps what remote shards already gave."""
        if cache is None:   # one of its own, ended with this generator
            own = SlotCache()
            try:
                yield from self._read_parts(parts, pass_idx, limit, own)
            finally:
                own.close()
            return
        taken = 0
        ahead: _StartedAhead | None = None
        try:
            for k, part in enumerate(parts):
                if limit is not None and taken >= limit:
                    return
                shard = self.info.shards[part.shard]
                nxt = self.info.shards[parts[k + 1].shard] if k + 1 < len(parts) else None
                # The indexes of the next two shards: the next one is started ahead (below) as soon as fewer than
                # `lead` samples of this one are left, which for a shard of few more than `lead` samples comes
                # before an index asked for only now would arrive (measured at 20 ms with 128-sample shards: the
                # start waited 10-17 ms per shard, a quarter of the local rate)
                for later in parts[k + 1:k + 3]:
                    if is_remote_indexed(self.info.shards[later.shard]):
                        cache.open_ahead(self.info.shards[later.shard], self._remote_store())
                reader, failed = None, None
                want = _Want(self, part, pass_idx, limit, taken)
                if ahead is not None:
                    if (ahead.part, ahead.taken) == (k, taken):   # started for this part, same samples before it
                        want, reader, failed = ahead.want, ahead.reader, ahead.error
                    else:   # the previous shard gave fewer samples than planned (skipped as bad): start over
                        ahead.close()
                    ahead = None
                # What this part will give: the next remote shard is started once that many minus what is in
                # flight are given, so its first windows are fetched while this one's last are decoded
                expect = part.count(shard.num_samples)
                if limit is not None:
                    expect = min(expect, limit - taken)
                lead = self.cfg.remote.windows_ahead * self.cfg.remote.window_samples
                after = taken + expect   # samples taken before the next part
                start_next = nxt is not None and is_remote_indexed(nxt) and (limit is None or after < limit)
                got = 0
                try:
                    if failed is not None:
                        raise failed
                    if reader is None:
                        reader = open_shard_reader(shard, self._remote_store() if is_remote(shard.url) else None,
                                                   cache)
                    indexed = not isinstance(reader, TarSampleReader)
                    if indexed and len(reader) != shard.num_samples:
                        raise ShardError(f"shard {shard.url}: holds {len(reader)} samples, the manifest says "
                                         f"{shard.num_samples}")
                    for key, members in reader.samples(want):
                        if start_next and ahead is None and expect - got <= lead:
                            ahead = self._start_ahead(k + 1, parts[k + 1], nxt, pass_idx, limit, after, cache)
                        if members is not None:
                            taken += 1
                            got += 1
                            yield shard.url, key, members, want.chosen.pop(key)
                        if not indexed and limit is not None and taken >= limit:
                            break   # a stream: the rest of the shard is not needed (the count was checked up
                                    # front for indexed readers only; a streamed shard is counted when read to its
                                    # end)
                    else:
                        if want.idx != shard.num_samples:
                            raise ShardError(f"shard {shard.url}: holds {want.idx} samples, the manifest says "
                                             f"{shard.num_samples}")
                except (ShardError, OSError) as e:
                    if not self.cfg.skip_bad_shards:
                        if isinstance(e, ShardError):
                            raise
                        if isinstance(e, RemoteReadError):   # names the URL and what failed already
                            raise ShardError(f"shard {e}") from e
                        # fsspec's open (a streamed shard) says FileNotFoundError(url) for a refused certificate
                        raise ShardError(f"shard {shard.url}: cannot be read ({certificate_failure(e) or e})") from e
                    warnings.warn(f"skipping the rest of bad shard {shard.url} after {want.idx} samples: {e}")
                finally:
                    if reader is not None:
                        reader.close()
        finally:
            if ahead is not None:
                ahead.close()

    def _start_ahead(self, k: int, part: SlotPart, shard: Any, pass_idx: int, limit: int | None, taken: int,
                     cache: SlotCache) -> "_StartedAhead":
        """The reader of the slot's next remote shard, its first windows requested (RemoteShardReader.start), or
        the error opening it raised: raised when that shard's turn comes, as if it had been opened then."""
        want = _Want(self, part, pass_idx, limit, taken)
        try:
            reader = open_shard_reader(shard, self._remote_store(), cache)
        except (ShardError, OSError) as e:
            return _StartedAhead(k, taken, want, error=e)
        reader.start(want)
        return _StartedAhead(k, taken, want, reader=reader)

    def _train_rows(self, slot: int, role: int, rows: int) -> Iterator[tuple]:
        """The `rows` shuffled rows of a slot this epoch: its shards in plan order, again from the start
        (wrap-around, new frame and caption picks) while it needs more, through a shuffle buffer; then, only if the
        caller asks for more (samples skipped as undecodable), further passes.

        Exactly `rows` samples are read for the epoch's batches: a buffer filled past them would read samples no
        batch uses (and, before this was bounded, wrapped tiny slots around dozens of times per epoch: one epoch
        of 11 samples over HTTP fetched each shard ~92 times). A wrap-around pass rereads the slot's first
        `rows - slot_samples` samples in the same order, so the SlotCache keeps those members and a remote slot
        fetches no byte twice in an epoch."""
        parts = self.plan[slot]
        rng = random.Random(stable_hash("samples", self.cfg.seed, self.epoch, slot))
        have = sum(p.count(self.info.shards[p.shard].num_samples) for p in parts)
        cache = SlotCache(room=min(max(0, rows - have), have))

        def passes(limit: int | None, pass_idx: int) -> Iterator[tuple]:
            n = 0
            while limit is None or n < limit:
                got = 0
                for url, key, members, f0 in self._read_parts(parts, pass_idx, None if limit is None else limit - n,
                                                              cache):
                    got += 1
                    pick = stable_hash("caption", self.cfg.seed, self.epoch, pass_idx, key)
                    yield url, key, members, f0, pick, True
                if got == 0:   # never spin forever on shards that yield nothing
                    urls = [self.info.shards[p.shard].url for p in parts]
                    raise ShardError(f"rank {self.rank} loader role {role}: no readable samples in shards {urls}")
                n += got
                pass_idx += 1

        buf: list[tuple] = []
        size = max(1, self.cfg.shuffle_buffer)
        try:
            for row in passes(rows, 0):
                buf.append(row)
                if len(buf) >= size:
                    j = rng.randrange(len(buf))
                    buf[j], buf[-1] = buf[-1], buf[j]
                    yield buf.pop()
            while buf:
                j = rng.randrange(len(buf))
                buf[j], buf[-1] = buf[-1], buf[j]
                yield buf.pop()
            yield from passes(None, -(-rows // max(1, have)))
        finally:
            cache.close()

    def _eval_rows(self, slot: int) -> Iterator[tuple]:
        """The slot's samples once, in shard order (the caller pads the last batches)."""
        cache = SlotCache()
        try:
            for url, key, members, f0 in self._read_parts(self.plan[slot], 0, cache=cache):
                yield url, key, members, f0, 0, True
        finally:
            cache.close()

    def _pad_row(self) -> tuple[str, str, dict[str, bytes], int]:
        """A sample that decodes, for a slot without one of its own to pad eval batches with: the split's first."""
        probe = Batcher(self.info, batch_size=1, num_frames=self.cfg.num_frames, tokenizer=None,
                        max_caption_tokens=self.cfg.max_caption_tokens)
        for row in self._read_parts([SlotPart(i) for i in range(len(self.info.shards))], 0):
            try:
                probe.add(*row, 0, False)
            except ShardError:
                if self.cfg.skip_bad_shards:
                    continue
                raise
            return row
        raise ShardError(f"split {self.info.split!r}: no readable sample to pad eval batches with")


@dataclass
class _StartedAhead:
    """The slot's next remote shard, started early: for part `part`, assuming `taken` samples before it; its
    reader (first windows requested) or the error opening it raised."""
    part: int
    taken: int
    want: "_Want"
    reader: Any = None
    error: BaseException | None = None

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()


class _Want:
    """Which members of each sample of a slot's shard part are read, asked by the reader in tar order (for a
    remote shard, as it plans its requests, possibly before the previous shard is done): the part's samples
    (index % stride == offset) up to the slot's `limit`, counted from the `taken` samples before this part; each
    chosen sample's first frame kept in `chosen` until it is given out."""

    def __init__(self, stream: "ShardStream", part: SlotPart, pass_idx: int, limit: int | None, taken: int):
        self.stream, self.part, self.pass_idx, self.limit, self.taken = stream, part, pass_idx, limit, taken
        self.idx = 0        # samples asked about so far
        self.planned = 0    # of which chosen
        self.chosen: dict[str, int] = {}

    def __call__(self, key: str) -> set[str] | None:
        i, self.idx = self.idx, self.idx + 1
        if i % self.part.stride != self.part.offset or (self.limit is not None
                                                        and self.taken + self.planned >= self.limit):
            return None
        self.planned += 1
        self.chosen[key] = f0 = self.stream._frame0(key, self.pass_idx)
        return set(sample_members(f0, self.stream.cfg.num_frames, self.stream.info.frames_per_clip))


# What a worker reading remote shards imports on its first request, loaded by the forkserver instead (below):
# otherwise every epoch's fresh workers import them while their first windows wait (~13 ms at each epoch start).
# The server skips any that is not installed.
_WORKER_PRELOAD = [__name__, "pycurl", "fsspec.utils"]


def _main_module() -> list[str]:
    """The name the forkserver can import the main module under, if any, for it to load.

    Every worker runs the main module as it starts (multiprocessing prepares a child so), and does it in
    moments when the module's imports are loaded already; else each worker of each epoch imports them (train.py:
    257 modules, 0.3 s). multiprocessing's own "__main__" preload does nothing here: Python 3.11's forkserver is
    given no main path and does not apply the parent's sys.path, so it finds modules from the working directory,
    then PYTHONPATH and site-packages. So a script is named only when it lies in the working directory (`python
    train.py` from the repository), where the server's import finds that very file, never another of its name;
    a `python -m NAME` module is found alike; `X.__main__` mains are not run in workers, so not loaded."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None:   # python -m NAME
        return [] if spec.name.endswith("__main__") else [spec.name]
    path = getattr(main, "__file__", None)
    if not path or not path.endswith(".py"):
        return []
    name = os.path.basename(path)[:-3]
    found = importlib.machinery.PathFinder.find_spec(name, [os.getcwd()])
    same = found is not None and found.origin is not None and os.path.samefile(found.origin, path)
    return [name] if same else []


def _worker_context():
    ctx = multiprocessing.get_context("forkserver")
    # The server imports this module (torch, torchvision, numpy) once and every worker forks from it already
    # loaded: otherwise each worker of each epoch imports them anew (measured 0.7 s instead of ~25 s for a
    # 2-worker loader on a loaded 2-core machine). No effect once the server runs.
    ctx.set_forkserver_preload(_main_module() + _WORKER_PRELOAD)
    return ctx


def _init_worker(env: dict[str, str], worker_id: int) -> None:
    """Set up a fresh loader worker: its garbage collector and its environment.

    The objects the worker starts with (the forkserver's modules: torch, numpy, ~330k objects) are put out of the
    collector's reach (gc.freeze): a full collection in the worker walks every one of them, writing to the pages
    it shares with the server, so that the worker copies them all (measured, one worker, remote shards at 20 ms:
    7 of 10 epochs took ~20 more page faults and ~0.2 ms more CPU per sample, ~960 instead of ~1,180 samples/s;
    none of 10 with the freeze). What the worker makes itself is collected as usual.

    A forkserver worker also starts with the server's environment, which is the environment of the first loader
    this process made: give it the environment of the process as this loader is made, as a forked worker would
    have, so that credentials and endpoints set since (AWS_*, FSSPEC_*: s3://) reach the workers that read."""
    gc.freeze()
    for k in set(os.environ) - set(env):
        del os.environ[k]
    os.environ.update(env)
    config = sys.modules.get("fsspec.config")   # fsspec reads its FSSPEC_* variables once, when imported
    if config is not None:
        config.conf.clear()
        config.set_conf_files(config.conf_dir, config.conf)
        config.set_conf_env(config.conf)


def make_loader(cfg: LoaderConfig, rank: int = 0, world_size: int = 1, epoch: int = 0,
                start_batch: int = 0, info: SplitInfo | None = None) -> tuple[DataLoader | ShardStream, int]:
    """The rank's batches of one epoch and the epoch's batch count (identical on every rank).

    The iterable yields `batches_per_epoch - start_batch` batches: those of the uninterrupted epoch from
    `start_batch` on (for exact resume). With num_workers=0 the ShardStream itself is returned (no subprocesses).
    `info`: the split as the caller read it once (`load_split(cfg.data, cfg.split, cfg.shard_base)`), so that
    every epoch of a run reads the same shard list, whatever the manifest says by then (a dataset republished
    during training), and an epoch over a remote manifest starts without its round trip; else it is read now.
    """
    if cfg.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {cfg.batch_size}")
    if info is None:
        info = load_split(cfg.data, cfg.split, cfg.shard_base)
    elif info.split != cfg.split:
        raise ValueError(f"make_loader: the split given is {info.split!r}, the config asks for {cfg.split!r}")
    ds = ShardStream(info, cfg, rank, world_size, epoch, start_batch)
    if cfg.num_workers == 0:
        return ds, ds.total
    # Workers start from a forkserver, not a fork of this process: the trainer already runs threads (gloo,
    # OpenMP, the previous epoch's pin thread), and a fork taken while one of them holds a lock can leave the new
    # worker waiting forever on it (seen: a fresh epoch's worker stuck at 0 s CPU, its peer rank waiting on it).
    dl = DataLoader(ds, batch_size=None, num_workers=cfg.num_workers, prefetch_factor=cfg.prefetch_factor,
                    pin_memory=cfg.pin_memory, persistent_workers=False, in_order=True,
                    multiprocessing_context=_worker_context(),
                    worker_init_fn=functools.partial(_init_worker, dict(os.environ)))
    return dl, ds.total
