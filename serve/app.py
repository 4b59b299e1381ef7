"""The Ray Serve application: a FastAPI ingress in front of an autoscaling generator.

    HTTP -> Ingress (FastAPI, validation, auth, timeout, 503 on a full queue; the job
            queue and dispatcher of /v1/videos, serve.jobs)
         -> Generator replicas (model loaded and warmed up once per replica, GPU when the
            cluster has one; same-shape requests batched; detail-expert variants multiplexed
            by the request's ``model`` field; jobs report each step to the job store)

``build_app(args)`` is the builder ``serve run serve/config.yaml`` / ``serve deploy`` call
with the file's ``args``; ``app_from_config(cfg)`` is what ``dcm serve`` calls. Every number
(limits, replicas, batching, queues, timeouts) comes from the ``serve`` section of
``dcm.config``, through ``serve.settings`` (one owner; a Serve file written by
``dcm serve --write-config`` carries no copy of them).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import Counter
from pathlib import Path
from time import perf_counter
from typing import Any

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)
from ray.serve.handle import DeploymentHandle

from dcm.bundle import is_hub_id, resolve_model_path
from dcm.config import Config, ConfigError, ServeConfig, from_dict
from serve.api import ApiSettings, create_api, key_digests
from serve.batching import generate_group, group_by_shape
from serve.jobs import (
    CANCELLED,
    FAILED,
    SUCCEEDED,
    JobCancelled,
    JobManager,
    JobRunner,
    ReplicaBusy,
    ReplicaLost,
)
from serve.limits import DEFAULT_MODEL, Limits, RequestError
from serve.metrics import make_metrics
from serve.schemas import ModelCard
from serve.settings import GENERATOR, AppArgs, generator_options
from serve.store import JobStore

INGRESS = "Ingress"


def build_app(args: AppArgs | dict[str, Any] | None = None) -> serve.Application:
    """Serve's application builder: ``import_path: serve.app:build_app``."""
    if not isinstance(args, AppArgs):
        args = AppArgs.parse(args)
    return app_from_config(args.resolve())


def app_from_config(cfg: Config) -> serve.Application:
    """Bind the ingress and the generator with the options of ``cfg.serve``."""
    if DEFAULT_MODEL in cfg.serve.variants:
        raise ConfigError(f"serve.variants must not use the reserved name '{DEFAULT_MODEL}'")
    variants = {n: _model_path(p, f"serve.variants.{n}") for n, p in cfg.serve.variants.items()}
    try:  # one absolute location for every replica; a bad URI fails here, in one sentence
        store = JobStore(cfg.serve.job_store)
    except (OSError, ValueError) as err:
        raise ConfigError(f"serve.job_store '{cfg.serve.job_store}': {err}") from None
    cfg = cfg.replace(
        **{
            "model.path": _model_path(cfg.model.path, "model.path"),
            "serve.variants": variants,
            "serve.job_store": store.uri if "://" in store.uri else store.root,
            "serve.replica_gpus": replica_gpus(cfg.serve),
        }
    )
    s = cfg.serve
    digests: tuple[str, ...] = ()
    if s.api_key_env:
        digests = key_digests(os.environ.get(s.api_key_env, ""))
        if not digests:
            raise ConfigError(
                f"serve.api_key_env names '{s.api_key_env}' but that environment variable is "
                "empty: export the key (several callers: comma-separated keys) or clear "
                "serve.api_key_env"
            )
    cfg_dict = cfg.to_dict()
    generator = Generator.options(**generator_options(s)).bind(cfg_dict)
    ingress_cap = (s.max_ongoing_requests + s.max_queued) * s.max_replicas + 16
    return Ingress.options(
        max_ongoing_requests=ingress_cap,
        max_queued_requests=ingress_cap,
        backpressure_config={"retry_after_s": s.retry_after_s},
        ray_actor_options={"num_cpus": 0},
    ).bind(generator, cfg_dict, digests)


def replica_gpus(s: ServeConfig) -> float:
    """serve.replica_gpus: 'auto' is one GPU per replica when the cluster has one, else 0
    (the rule of every per-actor GPU setting, ``pipelines.cluster.actor_gpus``)."""
    from pipelines.cluster import actor_gpus

    return actor_gpus(s.replica_gpus)


def _model_path(path: str, field: str) -> str:
    """Check a model path where the app is built; make local paths absolute for replicas."""
    try:
        resolved = resolve_model_path(path)
    except ConfigError as err:
        raise ConfigError(f"{field}: {err}") from None
    if path.startswith("bundled:") or is_hub_id(path):
        return path
    return str(Path(resolved))


def _device(s: ServeConfig) -> str:
    """'auto': CUDA when Ray gave this replica a GPU (num_gpus from the config or the
    Serve YAML's ray_actor_options), else the CPU."""
    if s.device != "auto":
        return s.device
    import ray
    import torch

    return "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"


class GenerationCancelled(Exception):
    """Raised from the sampler's step callback when no request of a batch is waited for."""


# ---------------------------------------------------------------- generator replicas
@serve.deployment(name=GENERATOR)
class Generator:
    """Holds the default model (loaded once per replica) and multiplexed variants."""

    def __init__(self, cfg_dict: dict[str, Any]) -> None:
        from dcm.generate import VideoGenerator

        # imageio-ffmpeg starts ffmpeg with preexec_fn=os.setpgrp, which forces a fork()
        # that runs Python in the child of this multi-threaded (gRPC) process; that child
        # can abort ("epoll_wait error: Bad file descriptor"). Without preexec_fn Python
        # uses vfork + exec, which is safe (the abort was seen here in a benchmark run).
        os.environ["IMAGEIO_FFMPEG_NO_PREVENT_SIGINT"] = "1"
        self._cfg = cfg = from_dict(cfg_dict)
        self._device = _device(cfg.serve)
        self._models = {DEFAULT_MODEL: VideoGenerator.load(cfg.model.path, self._device, cfg)}
        check_geometry(cfg, self._models[DEFAULT_MODEL], cfg.model.path)
        self._replica = serve.get_replica_context().replica_id.unique_id
        # How often this replica has loaded each model: a variant evicted by the LRU of
        # max_models_per_replica and asked for again is loaded again (X-DCM-Model-Loads).
        self._loads: Counter[str] = Counter({DEFAULT_MODEL: 1})
        self._store = JobStore(cfg.serve.job_store)
        # One generation at a time per replica: the Wan VAE keeps its causal-conv caches on
        # the module, so two concurrent decodes corrupt each other (frames lost or doubled).
        # Batches of same-shape requests are the way to use a replica's parallelism.
        self._gen_lock = threading.Lock()
        self._metrics = make_metrics()
        self.warmup_s = warm_up(cfg, self._models[DEFAULT_MODEL])  # before Serve calls it ready
        self._batched.set_max_batch_size(cfg.serve.max_batch_size)
        self._batched.set_batch_wait_timeout_s(cfg.serve.batch_wait_timeout_s)

        async def load_variant_model(model_id: str) -> Any:
            path = cfg.serve.variants[model_id]
            model = await asyncio.to_thread(VideoGenerator.load, path, self._device, cfg)
            check_geometry(cfg, model, path)
            self._loads[model_id] += 1
            return model

        # LRU cache of variants per replica; Serve routes a model id to replicas holding it.
        self._load_variant = serve.multiplexed(
            max_num_models_per_replica=cfg.serve.max_models_per_replica
        )(load_variant_model)

    async def ready(self) -> bool:
        return True

    async def run_job(self, record: dict[str, Any]) -> dict[str, Any]:
        """Run one /v1/videos job: progress and outcome go to the job store (serve.jobs)."""
        runner = JobRunner(self._store, record, self._replica, self._cfg.serve.job_ttl_s)
        if self._store.cancel_requested(runner.job_id):
            return {"status": CANCELLED}
        params = record["params"]
        beat = asyncio.get_running_loop().create_task(self._heartbeat(runner))
        t0 = perf_counter()
        try:
            if params["model"] == DEFAULT_MODEL:
                model = self._models[DEFAULT_MODEL]
            else:
                model = await self._load_variant(params["model"])
            load_s = perf_counter() - t0
            item = {**params, "_arrived": t0}
            out = await asyncio.to_thread(self._run_job, model, item, runner)
        except asyncio.CancelledError:
            # DELETE (cancel marker written): stop at the next step and say so. Without the
            # marker the caller went away: the ingress's lease check retries or fails it.
            runner.stop.set()
            if self._store.cancel_requested(runner.job_id):
                await asyncio.to_thread(runner.finish, CANCELLED)
            raise
        except JobCancelled:
            return {"status": await asyncio.to_thread(runner.finish, CANCELLED)}
        except ValueError as err:  # a broken variant or a size the model refuses
            error = {"type": "invalid_request", "message": str(err)}
            return {"status": await asyncio.to_thread(runner.finish, FAILED, error=error)}
        except Exception as err:  # noqa: BLE001 - the job fails with the reason, not the replica
            error = {"type": "internal", "message": f"{type(err).__name__}: {err}"}
            return {"status": await asyncio.to_thread(runner.finish, FAILED, error=error)}
        finally:
            beat.cancel()
        timings = {"queue": record_wait(runner.rec), "load": load_s, **out["timings"]}
        status = await asyncio.to_thread(runner.finish, SUCCEEDED, timings=timings)
        return {"status": status}

    def _run_job(self, model: Any, item: dict[str, Any], runner: JobRunner) -> dict[str, Any]:
        """Worker thread: wait for the model (the job stays queued), then run and store it."""
        while not self._gen_lock.acquire(timeout=0.25):
            if runner.stop.is_set() or self._store.cancel_requested(runner.job_id):
                raise JobCancelled(runner.job_id)
        try:
            if runner.stop.is_set():
                raise JobCancelled(runner.job_id)
            runner.start()
            (out,) = self._generate_group(model, [item], runner.on_step)
        finally:
            self._gen_lock.release()
        self._store.write_video(runner.job_id, item["format"], out["video"])
        return out

    async def _heartbeat(self, runner: JobRunner) -> None:
        """Sign of life every quarter lease, also while one long step runs."""
        while True:
            await asyncio.sleep(self._cfg.serve.job_lease_s / 4.0)
            await asyncio.to_thread(runner.beat)

    async def generate(self, params: dict[str, Any]) -> dict[str, Any]:
        """One validated request -> {video, timings, model, replica, batch_size, loads} or
        {error}. Cancelled (the ingress's 504, a client gone): its batch stops at the next
        step once none of its requests is waited for, so the replica is free again."""
        stop = threading.Event()
        try:
            return await self._batched({**params, "_arrived": perf_counter(), "_stop": stop})
        except asyncio.CancelledError:
            stop.set()
            raise

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.0)  # resized from config in __init__
    async def _batched(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = [{} for _ in items]
        for group in group_by_shape(items):
            first = items[group[0]]
            t0 = perf_counter()
            try:
                if first["model"] == DEFAULT_MODEL:
                    model = self._models[DEFAULT_MODEL]
                else:
                    model = await self._load_variant(first["model"])
            except ValueError as err:  # a broken variant folder: the server's fault, say which
                msg = f"model '{first['model']}' could not be loaded: {err}"
                for i in group:
                    results[i] = {"error": {"field": None, "message": msg, "status": 500}}
                continue
            load_s = perf_counter() - t0
            try:
                outs = await asyncio.to_thread(self._run_group, model, [items[i] for i in group])
            except ValueError as err:  # ConfigError and friends: the request, not the server
                outs = [{"error": {"field": None, "message": str(err)}} for _ in group]
            except GenerationCancelled as err:  # nobody waits for these results
                outs = [{"error": {"field": None, "message": str(err), "status": 499}}] * len(group)
            for i, out in zip(group, outs, strict=True):
                if "timings" in out:
                    out["timings"] = {
                        "queue": t0 - items[i]["_arrived"],
                        "load": load_s,
                        **out["timings"],
                    }
                    out.update(
                        model=items[i]["model"],
                        replica=self._replica,
                        batch_size=len(group),
                        loads=self._loads[items[i]["model"]],
                    )
                results[i] = out
        return results

    def _run_group(self, model: Any, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Generate one same-shape group in a worker thread, then encode each video; stop
        at the next step when every request of the group was cancelled."""

        def check(k: int, n: int) -> None:
            if all(it["_stop"].is_set() for it in items):
                raise GenerationCancelled(f"cancelled at step {k} of {n}: no request waits")

        with self._gen_lock:
            if all(it["_stop"].is_set() for it in items):  # cancelled while waiting
                raise GenerationCancelled("cancelled before it started")
            return self._generate_group(model, items, check)

    def _generate_group(
        self, model: Any, items: list[dict[str, Any]], callback: Any = None
    ) -> list[dict[str, Any]]:
        """_run_group's work; the caller holds ``_gen_lock``."""
        from dcm.video import video_bytes

        t0 = perf_counter()
        frames, stages = generate_group(model, items, callback)  # uint8 (B, F, H, W, 3)
        gen_s = perf_counter() - t0
        nfe = model.last_timings.get("nfe", 0.0) * len(items)
        denoise_s = max(model.last_timings.get("denoise_s", 0.0), 1e-9)
        self._metrics.generation(gen_s, items[0]["steps"], items[0]["model"], nfe / denoise_s)
        outs = []
        for it, clip in zip(items, frames, strict=True):
            t1 = perf_counter()
            data = video_bytes(clip, self._cfg.model.fps, fmt=it["format"])
            timings = {**stages, "generate": gen_s, "video": perf_counter() - t1}
            outs.append({"video": data, "timings": timings})
        return outs


def record_wait(record: dict[str, Any]) -> float:
    """Seconds a job waited between submission and its start on a replica."""
    started = record.get("started_at") or record["created_at"]
    return max(0.0, float(started) - float(record["created_at"]))


def warm_up(cfg: Config, model: Any) -> float:
    """One smallest generation (1 frame, one patch, fewest steps) so that the first request
    does not pay for lazy initialisation (CUDA context, kernels, allocator); seconds taken."""
    m = cfg.model
    t0 = perf_counter()
    model.generate(
        ["warm-up"],
        steps=cfg.serve.min_steps,
        seed=0,
        num_frames=1,
        height=m.vae_spatial_factor * m.patch_size[1],
        width=m.vae_spatial_factor * m.patch_size[2],
    )
    return perf_counter() - t0


def check_geometry(cfg: Config, model: Any, name: str) -> None:
    """The request limits use the config's VAE factors and patch: they must be the model's."""
    b, m = model.bundle, cfg.model
    mine = (m.vae_temporal_factor, m.vae_spatial_factor, tuple(m.patch_size))
    theirs = (b.temporal_factor, b.spatial_factor, tuple(b.patch_size))
    if mine != theirs:
        raise ConfigError(
            f"model '{name}' has VAE temporal/spatial factors and patch {theirs} but the config "
            f"says {mine}: set model.vae_temporal_factor, model.vae_spatial_factor and "
            "model.patch_size to match (or use the model's preset)"
        )


# ---------------------------------------------------------------- HTTP ingress
@serve.deployment(name=INGRESS)
@serve.ingress()
class Ingress:
    """FastAPI front end; the app is built per replica by ``__serve_build_asgi_app__``."""

    def __init__(
        self, generator: DeploymentHandle, cfg_dict: dict[str, Any], keys_sha256: tuple[str, ...]
    ) -> None:
        cfg = from_dict(cfg_dict)
        s = cfg.serve
        self._generator = generator
        self._timeout = s.request_timeout_s
        self._metrics = make_metrics()
        self._jobs = JobManager(
            JobStore(s.job_store),
            self._dispatch_job,
            max_queued=s.max_queued_jobs,
            max_in_flight=s.max_replicas * s.max_ongoing_requests,
            lease_s=s.job_lease_s,
            ttl_s=s.job_ttl_s,
            metrics=self._metrics,
        )
        cards = [ModelCard(id=DEFAULT_MODEL, path=cfg.model.path, default=True)]
        cards += [
            ModelCard(id=n, path=p, default=False) for n, p in sorted(cfg.serve.variants.items())
        ]
        self._settings = ApiSettings(
            limits=Limits.from_config(cfg),
            models=tuple(cards),
            api_keys_sha256=tuple(keys_sha256),
            retry_after_s=cfg.serve.retry_after_s,
        )

    def __serve_build_asgi_app__(self) -> Any:
        return create_api(self._settings, self._generate, self._ready, self._jobs, self._metrics)

    async def check_health(self) -> None:
        # Serve calls this periodically: it also starts the job loops (re-queueing the
        # queued jobs a previous ingress left) without waiting for the first job request.
        self._jobs.ensure_started()

    async def _generate(self, params: dict[str, Any]) -> dict[str, Any]:
        return await call_generator(self._generator, params, self._timeout)

    async def _dispatch_job(self, record: dict[str, Any]) -> dict[str, Any]:
        return await dispatch_job(self._generator, record)

    async def _ready(self) -> bool:
        try:
            return bool(await asyncio.wait_for(_wait(self._generator.ready.remote()), timeout=5.0))
        except Exception:  # noqa: BLE001 - any failure means "not ready yet"
            return False


async def _wait(response: Any) -> Any:
    return await response


async def dispatch_job(handle: Any, record: dict[str, Any]) -> dict[str, Any]:
    """Send a job to a generator replica and wait for its outcome (the replica writes it to
    the store); Serve's failures become ReplicaLost / ReplicaBusy for the JobManager."""
    model = record["params"]["model"]
    if model != DEFAULT_MODEL:
        handle = handle.options(multiplexed_model_id=model)
    response = handle.run_job.remote(record)
    try:
        return await _wait(response)
    except asyncio.CancelledError:
        response.cancel()  # DELETE or an expired lease: stop it on the replica too
        raise
    except BackPressureError:
        raise ReplicaBusy() from None
    except (RayActorError, DeploymentUnavailableError, ReplicaUnavailableError) as err:
        raise ReplicaLost(
            f"the generator replica running the job died or became unreachable "
            f"({type(err).__name__})"
        ) from None


async def call_generator(handle: Any, params: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Send validated params to a generator replica; map Serve's failures onto HTTP errors.

    The variant goes by multiplexed model id (Serve routes to replicas that hold it). A
    full queue is 503 (BackPressureError: max_queued_requests reached), a dead or missing
    replica 503, a slow one 504 after ``timeout_s`` (and the request is cancelled).
    """
    if params["model"] != DEFAULT_MODEL:
        handle = handle.options(multiplexed_model_id=params["model"])
    response = handle.generate.remote(params)
    try:
        result = await asyncio.wait_for(_wait(response), timeout=timeout_s)
    except asyncio.TimeoutError:
        response.cancel()
        raise RequestError(
            None,
            f"generation took longer than serve.request_timeout_s={timeout_s:g} s: ask for "
            "fewer steps, frames or pixels, or submit a job to /v1/videos",
            504,
            "timeout",
        ) from None
    except BackPressureError:
        raise RequestError(
            None,
            "the generation queue is full: retry after the Retry-After delay",
            503,
            "overloaded",
        ) from None
    except (RayActorError, DeploymentUnavailableError, ReplicaUnavailableError):
        raise RequestError(
            None, "no generator replica is available right now: retry shortly", 503, "unavailable"
        ) from None
    if "error" in result:
        err = result["error"]
        status = err.get("status", 422)
        raise RequestError(
            err["field"], err["message"], status, "invalid_request" if status < 500 else "internal"
        )
    return result
