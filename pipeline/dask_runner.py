"""Scale-out of the CPU stage (extract + fbank + staged sample) on a Dask cluster, orchestrated per chunk.

`DaskClipRunner(address, out_dir)` is a pipeline.build ClipRunner: it sends the process stage's jobs to the
Dask scheduler at `address` in chunks of clips and yields every clip's outcome as its chunk reports, so the
ledger records it at once. Orchestration costs per chunk, not per clip: one future per chunk, no Prefect task
run per clip (those cost the driver ~0.1 CPU-s each, more than a small clip's whole processing, and filled
Prefect's database with a row per clip). The build's "process" stage is still one Prefect task.

- Locality: workers read media from and write staged samples to the output directory, so DIR must be on a
  filesystem every worker shares. Before anything is submitted, each worker must read a probe file the driver
  wrote under DIR (and import this project's code); otherwise BuildError names the worker and says why.
- Back-pressure: at most `in_flight_per_thread` chunks per worker thread are submitted at a time; the next
  chunk goes out when one lands, so a 50k-clip build holds a few dozen futures, not 50k.
- Lost workers: each chunk appends every finished clip's outcome to a journal file under DIR/.dask/. When
  Dask re-runs a chunk whose worker died, the new attempt reads the journal and redoes only the clips the
  dead worker had not finished. A chunk that still fails (Dask gave up on it) reports its journalled clips as
  they finished and the rest as failed-transient internal-error: the next build run tries them again.
- Downloads never come here: they stay in the driver, bound by the site's per-session limits, not CPU.
"""
from __future__ import annotations

import json
import logging
import math
import os
import secrets
import socket
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable, Iterator

from pipeline.build import BuildError, ProcessJob, ProcessOutcome, process_clip
from pipeline.status import FAILED_TRANSIENT

log = logging.getLogger("avcap.dask")

JOURNAL_DIR = ".dask"
DEFAULT_CHUNK = 64
# Two chunks per worker thread: one running, one queued on the worker, so a thread never waits for the driver.
IN_FLIGHT_PER_THREAD = 2


def validate_address(address: str) -> None:
    if "://" not in address:
        raise ValueError(f"dask address {address!r}: expected a scheduler URL like tcp://host:8786")


def run_chunk(jobs: list[ProcessJob], journal: str,
              process: Callable[[ProcessJob], ProcessOutcome] = process_clip) -> list[ProcessOutcome]:
    """On a worker: the chunk's clips one after another; each outcome is journalled before the next clip
    starts, so a retry of this chunk after a lost worker skips what is already done."""
    _one_torch_thread()
    path = Path(journal)
    done = read_journal(path)
    outcomes = []
    with open(path, "a+", encoding="utf-8") as f:
        if f.tell() > 0:
            f.seek(f.tell() - 1)
            if f.read(1) != "\n":
                f.write("\n")     # end the line a killed attempt tore, so the next outcome starts its own
        for job in jobs:
            if job.key in done:
                outcomes.append(done[job.key])
                continue
            o = process(job)
            f.write(json.dumps(asdict(o)) + "\n")
            f.flush()
            outcomes.append(o)
    return outcomes


def read_journal(path: Path) -> dict[str, ProcessOutcome]:
    """Outcomes a chunk journalled; a torn last line (the worker died while writing it) is ignored."""
    done: dict[str, ProcessOutcome] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return done
    for line in lines:
        try:
            o = ProcessOutcome(**json.loads(line))
        except (ValueError, TypeError):
            continue
        done[o.key] = o
    return done


_torch_threads_set = False


def _one_torch_thread() -> None:
    # One clip per worker thread: torch's own intra-op threads would only fight the other clips (as in the
    # local process pool's initializer).
    global _torch_threads_set
    if not _torch_threads_set:
        import torch
        torch.set_num_threads(1)
        _torch_threads_set = True


def probe_worker(path: str, token: str) -> str | None:
    """On a worker: None when it can read the driver's probe file under DIR and write beside it, else why not."""
    where = f"{socket.gethostname()} pid {os.getpid()}"
    try:
        seen = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        return f"cannot read {path} ({e.strerror or e}) on {where}"
    if seen != token:
        return f"{path} on {where} holds another probe: DIR there is a different directory of the same name"
    reply = Path(f"{path}.{socket.gethostname()}-{os.getpid()}")
    try:
        reply.write_text(token, encoding="utf-8")
        reply.unlink()
    except OSError as e:
        return f"cannot write under {Path(path).parent} ({e.strerror or e}) on {where}"
    return None


def chunked(jobs: list[ProcessJob], chunk_size: int, threads: int) -> list[list[ProcessJob]]:
    """Chunks of `chunk_size` clips, smaller when there are too few clips to give every worker thread one."""
    size = max(1, min(chunk_size, math.ceil(len(jobs) / max(1, threads))))
    return [jobs[i:i + size] for i in range(0, len(jobs), size)]


class DaskClipRunner:
    """A pipeline.build ClipRunner on the Dask scheduler at `address`; see the module docstring."""

    def __init__(self, address: str, out_dir: str | Path, chunk_size: int = DEFAULT_CHUNK,
                 in_flight_per_thread: int = IN_FLIGHT_PER_THREAD,
                 process: Callable[[ProcessJob], ProcessOutcome] = process_clip,
                 connect_timeout_s: float = 30.0):
        validate_address(address)
        if chunk_size < 1 or in_flight_per_thread < 1:
            raise ValueError(f"chunk_size ({chunk_size}) and in_flight_per_thread ({in_flight_per_thread}) "
                             "must be >= 1")
        self.address, self.out_dir = address, Path(out_dir).absolute()
        self.chunk_size, self.in_flight_per_thread = chunk_size, in_flight_per_thread
        self.process, self.connect_timeout_s = process, connect_timeout_s

    def preflight(self) -> None:
        """Called by pipeline.build.run_build before any stage: the scheduler answers and every worker sees
        DIR, so a cluster that cannot work stops the build before hours of downloads."""
        with self._client() as client:
            self._check_workers(client)

    def __call__(self, jobs: list[ProcessJob]) -> Iterator[ProcessOutcome]:
        if not jobs:
            return
        with self._client() as client:
            threads = self._check_workers(client)
            yield from self._run(client, jobs, threads)

    # ---------------------------------------------------------------------------------------------------

    def _client(self):
        from distributed import Client

        try:
            return Client(self.address, timeout=self.connect_timeout_s, set_as_default=False)
        except (OSError, TimeoutError) as e:
            raise BuildError(f"cannot reach the Dask scheduler at {self.address} ({e}); start one with "
                             "`dask scheduler` and workers with `dask worker ADDRESS`") from e

    def _check_workers(self, client) -> int:
        """Every worker sees DIR (and has this code); returns the number of worker threads."""
        try:
            client.wait_for_workers(1, timeout=self.connect_timeout_s)
        except TimeoutError as e:
            raise BuildError(f"the Dask scheduler at {self.address} has no workers; start some with "
                             f"`dask worker {self.address}`") from e
        journal_dir = self.out_dir / JOURNAL_DIR
        journal_dir.mkdir(parents=True, exist_ok=True)
        probe = journal_dir / f"probe-{secrets.token_hex(8)}"
        token = secrets.token_hex(16)
        probe.write_text(token, encoding="utf-8")
        try:
            try:
                answers = client.run(probe_worker, str(probe), token)
            except Exception as e:  # noqa: BLE001 - a worker that cannot even unpickle the probe lacks our code
                raise BuildError(f"Dask workers at {self.address} could not run the directory probe "
                                 f"({type(e).__name__}: {e}); every worker needs this project installed") from e
        finally:
            probe.unlink(missing_ok=True)
        blind = {w: why for w, why in answers.items() if why}
        if blind:
            listed = "; ".join(f"{w}: {why}" for w, why in sorted(blind.items()))
            raise BuildError(f"{len(blind)} of {len(answers)} Dask workers cannot use the output directory "
                             f"{self.out_dir}: {listed}. Workers read media from and write staged samples to "
                             "DIR, so DIR must be on a filesystem that every worker mounts at the same path")
        return sum(client.nthreads().values())

    def _run(self, client, jobs: list[ProcessJob], threads: int) -> Iterator[ProcessOutcome]:
        from distributed import as_completed

        run_id = secrets.token_hex(4)
        chunks = chunked(jobs, self.chunk_size, threads)
        journal_dir = self.out_dir / JOURNAL_DIR
        todo = iter(enumerate(chunks))
        owner: dict = {}

        def submit_next() -> object | None:
            nxt = next(todo, None)
            if nxt is None:
                return None
            i, chunk = nxt
            journal = journal_dir / f"chunk-{run_id}-{i:06d}.jsonl"
            fut = client.submit(run_chunk, chunk, str(journal), self.process, key=f"avcap-chunk-{run_id}-{i}",
                                pure=False)
            owner[fut] = (chunk, journal)
            return fut

        first = [f for f in (submit_next() for _ in range(threads * self.in_flight_per_thread)) if f is not None]
        log.info("process on Dask %s: %d clips in %d chunks over %d worker threads", self.address, len(jobs),
                 len(chunks), threads)
        pending = as_completed(first, loop=client.loop)
        for fut in pending:
            chunk, journal = owner.pop(fut)
            try:
                outcomes = fut.result()
            except Exception as e:  # noqa: BLE001 - Dask gave up on the chunk (workers kept dying, ...)
                outcomes = self._salvage(chunk, journal, e)
            finally:
                fut.release()
            yield from outcomes
            journal.unlink(missing_ok=True)
            nxt = submit_next()
            if nxt is not None:
                pending.add(nxt)

    @staticmethod
    def _salvage(chunk: Iterable[ProcessJob], journal: Path, error: BaseException) -> list[ProcessOutcome]:
        done = read_journal(journal)
        message = f"Dask chunk failed: {type(error).__name__}: {error}"
        log.warning("%s; %d of its clips had finished, the rest are tried again next run", message, len(done))
        return [done.get(j.key) or ProcessOutcome(j.key, FAILED_TRANSIENT, "internal-error", message,
                                                  media_sha256=j.media_sha256) for j in chunk]
