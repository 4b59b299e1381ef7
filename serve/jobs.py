"""Asynchronous video jobs: the ingress's queue and dispatcher, and a replica's job runner.

Life of a job (``status``): queued -> running (progress: step k of n) -> succeeded | failed
(with the reason) | cancelled. The record in ``serve.store.JobStore`` is the truth; the
ingress's memory only holds the order of waiting jobs and the tasks of dispatched ones.

- ``JobManager`` (one per ingress replica; the ingress runs one replica): bounded waiting
  queue (full -> 503), dispatch of at most ``max_in_flight`` jobs to generator replicas,
  cancellation, and a maintenance loop that retries or fails a running job whose heartbeat
  is older than the lease (its replica died or hung) and deletes expired jobs. At start it
  re-queues the queued jobs a previous ingress left in the store.
- ``JobRunner`` (on the generator replica): marks the job running, reports each sampler step
  and a heartbeat, stops at the next step once a cancel is asked, and writes the outcome.

Neither imports Ray: ``dispatch`` is a coroutine given by serve.app that raises
``ReplicaLost`` or ``ReplicaBusy`` for Serve's failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from serve.limits import RequestError
from serve.metrics import NoMetrics
from serve.store import JobStore, new_job_id

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    "queued",
    "running",
    "succeeded",
    "failed",
    "cancelled",
)
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)
MAX_ATTEMPTS = 2  # a job lost with its replica runs once more, then fails
BUSY_RETRY_S = 1.0  # wait before re-sending a job Serve refused with back-pressure


class ReplicaLost(Exception):
    """The generator replica running (or about to run) a job died or became unreachable."""


class ReplicaBusy(Exception):
    """Serve refused the job for now (back-pressure); it goes back to the queue."""


class JobCancelled(Exception):
    """Raised from the sampler's step callback when the job was cancelled."""


Dispatch = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def new_record(params: dict[str, Any], owner: str, ttl_s: float) -> dict[str, Any]:
    now = time.time()
    return {
        "id": new_job_id(),
        "object": "video",
        "owner": owner,  # digest of the API key that created it ("" without auth)
        "status": QUEUED,
        "model": params["model"],
        "params": params,
        "progress": {"step": 0, "steps": params["steps"]},
        "created_at": now,
        "started_at": None,
        "finished_at": None,
        "heartbeat_at": None,
        "expires_at": now + ttl_s,
        "attempts": 0,
        "replica": None,
        "error": None,
        "timings": {},
    }


def public_view(rec: dict[str, Any]) -> dict[str, Any]:
    """The record as GET /v1/videos/{id} shows it (no owner; URLs to poll and download)."""
    out = {k: v for k, v in rec.items() if k != "owner"}
    out["status_url"] = f"/v1/videos/{rec['id']}"
    out["content_url"] = f"/v1/videos/{rec['id']}/content" if rec["status"] == SUCCEEDED else None
    return out


def _finished(rec: dict[str, Any], status: str, ttl_s: float, **fields: Any) -> dict[str, Any]:
    now = time.time()
    return {**rec, **fields, "status": status, "finished_at": now, "expires_at": now + ttl_s}


# ---------------------------------------------------------------- ingress side
class JobManager:
    """Queue, dispatch, cancel and supervise jobs (see the module doc)."""

    def __init__(
        self,
        store: JobStore,
        dispatch: Dispatch,
        *,
        max_queued: int,
        max_in_flight: int,
        lease_s: float,
        ttl_s: float,
        metrics: Any = None,
    ) -> None:
        self.store = store
        self._dispatch = dispatch
        self.max_queued = max_queued
        self.max_in_flight = max(1, max_in_flight)
        self.lease_s = lease_s
        self.ttl_s = ttl_s
        self.metrics = metrics or NoMetrics()
        self.waiting: deque[str] = deque()
        self.in_flight: dict[str, asyncio.Task] = {}
        self._lost: dict[str, str] = {}  # in-flight job id -> why its task was cancelled
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task] = []

    # ------------------------------------------------------------ lifecycle
    def ensure_started(self) -> None:
        """Start the dispatcher and maintenance loops on the running event loop (once);
        re-queue the queued jobs found in the store (left by a previous ingress)."""
        if self._tasks:
            return
        self._wake = asyncio.Event()
        found = [r for r in self.store.records() if r["status"] == QUEUED]
        self.waiting.extend(r["id"] for r in sorted(found, key=lambda r: r["created_at"]))
        self._tasks = [
            asyncio.get_running_loop().create_task(self._dispatch_loop()),
            asyncio.get_running_loop().create_task(self._maintain_loop()),
        ]
        self._gauges()

    def _kick(self) -> None:
        if self._wake is not None:
            self._wake.set()
        self._gauges()

    def _gauges(self) -> None:
        self.metrics.queue(len(self.waiting), len(self.in_flight))

    # ------------------------------------------------------------ requests
    def submit(self, params: dict[str, Any], owner: str) -> dict[str, Any]:
        """Queue a validated request; RequestError 503 when the queue is full."""
        self.ensure_started()
        if len(self.waiting) >= self.max_queued:
            self.metrics.job("rejected")
            raise RequestError(
                None,
                f"the job queue is full ({self.max_queued} waiting): retry after the "
                "Retry-After delay",
                503,
                "overloaded",
            )
        rec = new_record(params, owner, self.ttl_s)
        self.store.write(rec)
        self.waiting.append(rec["id"])
        self.metrics.job("submitted")
        self._kick()
        return rec

    def get(self, job_id: str, owner: str) -> dict[str, Any]:
        """The caller's job; 404 for unknown, expired or someone else's jobs alike."""
        rec = self.store.read(job_id)
        if rec is None or rec.get("owner") != owner or rec["expires_at"] < time.time():
            raise RequestError(None, f"no video job '{job_id[:40]}'", 404, "not_found")
        return rec

    def list(self, owner: str, limit: int) -> list[dict[str, Any]]:
        now = time.time()
        mine = [r for r in self.store.records() if r.get("owner") == owner]
        mine = [r for r in mine if r["expires_at"] >= now]
        return sorted(mine, key=lambda r: r["created_at"], reverse=True)[:limit]

    def content(self, job_id: str, owner: str) -> tuple[bytes, str]:
        rec = self.get(job_id, owner)
        if rec["status"] != SUCCEEDED:
            raise RequestError(
                None,
                f"job '{job_id}' is {rec['status']}: the video exists once it has succeeded",
                409,
                "conflict",
            )
        fmt = rec["params"]["format"]
        data = self.store.read_video(job_id, fmt)
        if data is None:
            raise RequestError(None, f"the video of job '{job_id}' is gone", 404, "not_found")
        return data, fmt

    def cancel(self, job_id: str, owner: str) -> dict[str, Any]:
        """Cancel a queued or running job (a finished one is a 409)."""
        self.ensure_started()
        rec = self.get(job_id, owner)
        if rec["status"] in TERMINAL:
            raise RequestError(
                None, f"job '{job_id}' already {rec['status']}: nothing to cancel", 409, "conflict"
            )
        # The marker first: the replica checks it at every step and before its last write.
        self.store.request_cancel(job_id)
        with contextlib.suppress(ValueError):
            self.waiting.remove(job_id)
        rec = _finished(self.store.read(job_id) or rec, CANCELLED, self.ttl_s)
        self.store.write(rec)
        self.metrics.job(CANCELLED)
        task = self.in_flight.get(job_id)
        if task is not None:
            task.cancel()  # serve.app's dispatch cancels the request on the replica
        self._kick()
        return rec

    # ------------------------------------------------------------ dispatch
    async def _dispatch_loop(self) -> None:
        assert self._wake is not None
        while True:
            while self.waiting and len(self.in_flight) < self.max_in_flight:
                job_id = self.waiting.popleft()
                rec = self.store.read(job_id)
                if rec is None or rec["status"] != QUEUED:
                    continue
                rec = {**rec, "attempts": rec["attempts"] + 1}
                self.store.write(rec)
                self.in_flight[job_id] = asyncio.get_running_loop().create_task(self._run(rec))
            self._gauges()
            self._wake.clear()
            await self._wake.wait()

    async def _run(self, rec: dict[str, Any]) -> None:
        job_id = rec["id"]
        try:
            result = await self._dispatch(rec)
            self.metrics.job(result.get("status", "unknown"))
        except asyncio.CancelledError:
            reason = self._lost.pop(job_id, None)
            if reason is not None:  # the lease ran out (cancel() wrote its own outcome)
                self._retry_or_fail(job_id, reason)
        except ReplicaLost as err:
            latest = self.store.read(job_id)
            if latest is not None and latest["status"] == QUEUED:
                await self._requeue(job_id)  # it never started (Serve routed to a dead one)
            else:
                self._retry_or_fail(job_id, str(err))
        except ReplicaBusy:
            await self._requeue(job_id)
        except Exception as err:  # noqa: BLE001 - any other fault fails this job, not the loop
            self._fail(job_id, "internal", f"{type(err).__name__}: {err}")
        finally:
            self.in_flight.pop(job_id, None)
            self._kick()

    async def _requeue(self, job_id: str) -> None:
        """Back to the head of the queue after a pause, without using up an attempt."""
        await asyncio.sleep(BUSY_RETRY_S)
        latest = self.store.read(job_id)
        if latest is not None and latest["status"] == QUEUED:
            self.store.write({**latest, "attempts": latest["attempts"] - 1})
            self.waiting.appendleft(job_id)

    def _fail(self, job_id: str, kind: str, message: str) -> None:
        rec = self.store.read(job_id)
        if rec is None or rec["status"] in TERMINAL:
            return
        error = {"type": kind, "message": message}
        self.store.write(_finished(rec, FAILED, self.ttl_s, error=error))
        self.metrics.job(FAILED)

    def _retry_or_fail(self, job_id: str, reason: str) -> None:
        """A job whose replica is gone: back to the head of the queue once, then failed."""
        rec = self.store.read(job_id)
        if rec is None or rec["status"] in TERMINAL or self.store.cancel_requested(job_id):
            return
        if rec["attempts"] >= MAX_ATTEMPTS:
            self._fail(job_id, "replica_lost", f"{reason} (after {rec['attempts']} attempts)")
            return
        retry = {
            **rec,
            "status": QUEUED,
            "progress": {"step": 0, "steps": rec["params"]["steps"]},
            "started_at": None,
            "heartbeat_at": None,
            "replica": None,
            "last_error": {"type": "replica_lost", "message": reason},
        }
        self.store.write(retry)
        self.waiting.appendleft(job_id)
        self.metrics.job("retried")
        self._kick()

    # ------------------------------------------------------------ supervision
    async def _maintain_loop(self) -> None:
        while True:
            await asyncio.sleep(min(self.lease_s / 2.0, 10.0))
            with contextlib.suppress(Exception):  # a flaky store must not stop supervision
                self.maintain()

    def maintain(self, now: float | None = None) -> None:
        """Retry or fail running jobs past their lease; delete expired jobs."""
        now = time.time() if now is None else now
        for rec in self.store.records():
            job_id, status = rec["id"], rec["status"]
            if status == RUNNING:
                beat = rec.get("heartbeat_at") or rec.get("started_at") or rec["created_at"]
                if now - beat <= self.lease_s:
                    continue
                reason = (
                    f"the generator replica {rec.get('replica')} sent no heartbeat for "
                    f"{now - beat:.0f} s (lease {self.lease_s:g} s): it died or hung"
                )
                task = self.in_flight.get(job_id)
                if task is not None:
                    self._lost[job_id] = reason
                    task.cancel()
                else:
                    self._retry_or_fail(job_id, reason)
            elif status in TERMINAL and rec["expires_at"] < now:
                self.store.delete(job_id, rec["params"]["format"])


# ---------------------------------------------------------------- replica side
class JobRunner:
    """Writes one job's progress, heartbeat and outcome from the replica that runs it."""

    def __init__(self, store: JobStore, record: dict[str, Any], replica: str, ttl_s: float) -> None:
        self.store = store
        self.rec = dict(record)
        self.replica = replica
        self.ttl_s = ttl_s
        self.stop = threading.Event()  # set when the request is cancelled on this replica
        self._lock = threading.Lock()
        self._done = False
        self._last_write = 0.0

    @property
    def job_id(self) -> str:
        return self.rec["id"]

    def _write(self) -> None:
        self.store.write(self.rec)
        self._last_write = time.monotonic()

    def start(self) -> None:
        now = time.time()
        with self._lock:
            self.rec.update(
                status=RUNNING, started_at=now, heartbeat_at=now, replica=self.replica, error=None
            )
            self._write()

    def on_step(self, k: int, n: int) -> None:
        """The sampler's callback (generation thread): progress, or stop if cancelled."""
        if self.stop.is_set() or self.store.cancel_requested(self.job_id):
            raise JobCancelled(self.job_id)
        with self._lock:
            if self._done:
                return
            self.rec["progress"] = {"step": k, "steps": n}
            self.rec["heartbeat_at"] = time.time()
            # the first step at once (the job is seen denoising), then at most every 0.2 s
            if k in (1, n) or time.monotonic() - self._last_write >= 0.2:
                self._write()

    def beat(self) -> None:
        with self._lock:
            if not self._done and self.rec["status"] == RUNNING:
                self.rec["heartbeat_at"] = time.time()
                self._write()

    def finish(self, status: str, **fields: Any) -> str:
        """Write the outcome once; a cancel asked meanwhile wins over success or failure."""
        with self._lock:
            if self._done:
                return self.rec["status"]
            self._done = True
            if status != CANCELLED and self.store.cancel_requested(self.job_id):
                status, fields = CANCELLED, {}
            self.rec = _finished(self.rec, status, self.ttl_s, **fields)
            self._write()
            return status
