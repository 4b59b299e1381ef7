"""The HTTP layer: a FastAPI app built per ingress replica around a generate callable.

Routes: ``POST /v1/generate`` (video bytes), the job API (``POST /v1/videos`` -> 202 and an
id, ``GET /v1/videos[/{id}[/content]]``, ``DELETE /v1/videos/{id}``; serve.jobs),
``GET /v1/models``, ``GET /healthz``, ``GET /readyz``, ``GET /`` (the web page), ``/docs``
(OpenAPI). A job belongs to the API key that created it: other keys get 404. Errors are always
``{"error": {"type", "field", "message", "request_id"}}``: 400 malformed JSON, 401/403 API
key, 404/405 unknown route, 422 an invalid field (named), 503 + Retry-After when the queue
is full or no replica is up, 504 when generation exceeds ``serve.request_timeout_s``, 500
for a server fault (the traceback is logged).

The video is returned as the raw body (``video/mp4`` or ``image/gif``), not base64 in JSON:
a browser, ``curl -o`` or ``<video src>`` use it as is and nothing is inflated by a third;
metadata travels in headers (X-Request-Id, Server-Timing, X-DCM-*).
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any

from fastapi import Depends, FastAPI, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.jobs import JobManager, public_view
from serve.limits import Limits, RequestError, check_request
from serve.metrics import NoMetrics
from serve.schemas import ErrorBody, GenerateRequest, ModelCard, ModelList, VideoJob, VideoJobList

API_KEY_HEADER = "X-API-Key"
STATIC_DIR = Path(__file__).parent / "static"
CONTENT_TYPES = {"mp4": "video/mp4", "gif": "image/gif"}

GenerateFn = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
ReadyFn = Callable[[], Awaitable[bool]]


@dataclass(frozen=True)
class ApiSettings:
    limits: Limits
    models: tuple[ModelCard, ...]
    # hex digests of the accepted keys; () = no auth (the keys themselves are never kept)
    api_keys_sha256: tuple[str, ...]
    retry_after_s: int


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_digests(keys: str) -> tuple[str, ...]:
    """Digests of a comma-separated list of keys (one per caller; each owns its jobs)."""
    return tuple(key_digest(k.strip()) for k in keys.split(",") if k.strip())


def error_response(
    request: Request, err: RequestError, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = ErrorBody.model_validate(
        {
            "error": {
                "type": err.kind,
                "field": err.field,
                "message": err.message,
                "request_id": getattr(request.state, "request_id", None),
            }
        }
    )
    return JSONResponse(body.model_dump(), status_code=err.status, headers=headers)


def _field_of(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or None


def _safe(text: str) -> str:
    return "".join(c for c in text[:64] if c.isalnum() or c in "-_") or "video"


def server_timing(timings: dict[str, float]) -> str:
    """{"generate": 0.41} -> 'generate;dur=410.0' (the W3C Server-Timing header, in ms)."""
    items = []
    for name, seconds in timings.items():
        token = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
        items.append(f"{token};dur={1000.0 * float(seconds):.1f}")
    return ", ".join(items)


def create_api(
    settings: ApiSettings,
    generate: GenerateFn,
    ready: ReadyFn,
    jobs: JobManager | None = None,
    metrics: Any = None,
) -> FastAPI:
    """The FastAPI app of one ingress replica; ``generate`` gets validated params as a dict,
    ``jobs`` runs the job API (absent: those routes are not mounted)."""
    metrics = metrics or NoMetrics()
    app = FastAPI(
        title="DCM text-to-video",
        version="1",
        description="Few-step video generation with a Dual-Expert Consistency Model. "
        "POST /v1/generate returns the video bytes (video/mp4 or image/gif).",
    )
    key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False)

    @app.middleware("http")
    async def request_id(request: Request, call_next: Callable) -> Response:
        # Serve's proxy puts its id (or the client's X-Request-Id) into the request
        # headers and echoes it in the response; without a proxy we mint and echo one.
        rid = request.headers.get("x-request-id")
        minted = not rid
        request.state.request_id = rid or uuid.uuid4().hex
        response = await call_next(request)
        if minted:
            response.headers["X-Request-Id"] = request.state.request_id
        route = request.scope.get("route")  # the template, e.g. /v1/videos/{job_id}
        metrics.request(getattr(route, "path", "unmatched"), response.status_code)
        return response

    @app.exception_handler(RequestError)
    async def on_request_error(request: Request, err: RequestError) -> JSONResponse:
        headers = {"Retry-After": str(settings.retry_after_s)} if err.status == 503 else None
        if err.status == 401:
            headers = {"WWW-Authenticate": "ApiKey"}
        return error_response(request, err, headers)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        kind, field = first.get("type"), _field_of(tuple(first.get("loc", ())))
        if kind == "json_invalid":
            err = RequestError(None, "request body is not valid JSON", status=400)
        elif kind == "extra_forbidden":
            allowed = ", ".join(GenerateRequest.model_fields)
            err = RequestError(field, f"unknown field '{field}': allowed fields are {allowed}")
        elif field is None:
            err = RequestError(
                None, "request body must be a JSON object (Content-Type: application/json)"
            )
        else:
            err = RequestError(field, f"{field}: {first.get('msg', 'invalid value')}")
        return error_response(request, err)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        err = RequestError(None, str(exc.detail), status=exc.status_code, kind=kind)
        return error_response(request, err)

    @app.exception_handler(Exception)
    async def on_crash(request: Request, exc: Exception) -> JSONResponse:
        # A server fault, not the request's: same JSON shape; the traceback goes to the log.
        rid = getattr(request.state, "request_id", None)
        err = RequestError(
            None, f"internal error (request id {rid}): see the server log", 500, "internal"
        )
        return error_response(request, err)

    def authorize(key: str | None = Security(key_header)) -> str:
        """The caller's identity (its key's digest; "" without auth) or 401/403."""
        if not settings.api_keys_sha256:
            return ""
        if not key:
            raise RequestError(
                None,
                f"missing API key: send it in the {API_KEY_HEADER} header",
                401,
                "unauthorized",
            )
        digest = key_digest(key)
        if not any(hmac.compare_digest(digest, d) for d in settings.api_keys_sha256):
            raise RequestError(None, "the API key is not valid", 403, "forbidden")
        return digest

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse((STATIC_DIR / "index.html").read_text())

    @app.get("/healthz", summary="Liveness: the HTTP server answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: a generator replica has loaded its model")
    async def readyz() -> JSONResponse:
        ok = await ready()
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/v1/models", response_model=ModelList, dependencies=[Depends(authorize)])
    async def models() -> ModelList:
        return ModelList(data=list(settings.models))

    @app.post(
        "/v1/generate",
        dependencies=[Depends(authorize)],
        response_class=Response,
        responses={
            200: {"content": {"video/mp4": {}, "image/gif": {}}, "description": "The video."},
            400: {"model": ErrorBody},
            401: {"model": ErrorBody},
            403: {"model": ErrorBody},
            422: {"model": ErrorBody},
            503: {"model": ErrorBody},
            504: {"model": ErrorBody},
        },
        summary="Generate a video from a prompt",
    )
    async def generate_video(body: GenerateRequest, request: Request) -> Response:
        t0 = perf_counter()
        params = check_request(body, settings.limits)
        result = await generate(params.to_dict())
        timings = {**result["timings"], "total": perf_counter() - t0}
        headers = {
            "Server-Timing": server_timing(timings),
            "X-DCM-Model": result["model"],
            "X-DCM-Seed": str(params.seed),
            "X-DCM-Steps": str(params.steps),
            "X-DCM-Replica": result["replica"],
            "X-DCM-Batch-Size": str(result["batch_size"]),
            # times the answering replica has loaded this model (more than 1: it was evicted
            # by serve.max_models_per_replica and loaded again)
            "X-DCM-Model-Loads": str(result["loads"]),
            "Content-Disposition": f'inline; filename="dcm-{_safe(request.state.request_id)}.{params.format}"',
        }
        return Response(result["video"], media_type=CONTENT_TYPES[params.format], headers=headers)

    if jobs is not None:
        _mount_jobs(app, settings, jobs, authorize)
    return app


def _mount_jobs(app: FastAPI, settings: ApiSettings, jobs: JobManager, authorize: Any) -> None:
    """The job API: submit, poll, download, cancel, list (see serve.jobs)."""
    errors = {s: {"model": ErrorBody} for s in (400, 401, 403, 404, 409, 422, 503)}

    @app.post(
        "/v1/videos",
        status_code=202,
        response_model=VideoJob,
        responses=errors,
        summary="Submit a video job; poll status_url, then download content_url",
    )
    async def submit(body: GenerateRequest, owner: str = Depends(authorize)) -> JSONResponse:
        params = check_request(body, settings.limits)
        view = public_view(jobs.submit(params.to_dict(), owner))
        return JSONResponse(view, status_code=202, headers={"Location": view["status_url"]})

    @app.get("/v1/videos", response_model=VideoJobList, responses=errors, summary="Your jobs")
    async def list_jobs(
        limit: int = Query(20, ge=1, le=1000), owner: str = Depends(authorize)
    ) -> dict[str, Any]:
        return {"object": "list", "data": [public_view(r) for r in jobs.list(owner, limit)]}

    @app.get("/v1/videos/{job_id}", response_model=VideoJob, responses=errors, summary="Job status")
    async def status(job_id: str, owner: str = Depends(authorize)) -> dict[str, Any]:
        return public_view(jobs.get(job_id, owner))

    @app.get(
        "/v1/videos/{job_id}/content",
        response_class=Response,
        responses={200: {"content": {"video/mp4": {}, "image/gif": {}}}, **errors},
        summary="The video of a succeeded job",
    )
    async def content(job_id: str, owner: str = Depends(authorize)) -> Response:
        data, fmt = jobs.content(job_id, owner)
        disposition = f'inline; filename="dcm-{job_id}.{fmt}"'
        return Response(
            data, media_type=CONTENT_TYPES[fmt], headers={"Content-Disposition": disposition}
        )

    @app.delete(
        "/v1/videos/{job_id}",
        response_model=VideoJob,
        responses=errors,
        summary="Cancel a queued or running job",
    )
    async def cancel(job_id: str, owner: str = Depends(authorize)) -> dict[str, Any]:
        return public_view(jobs.cancel(job_id, owner))
