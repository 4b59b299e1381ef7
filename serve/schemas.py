"""HTTP request and response bodies of the endpoint (pydantic models shown in /docs).

Types are strict (a JSON string "4" is not a step count) so that every malformed request
is rejected by validation with the field's name, never coerced into something surprising.
Config-dependent bounds (frames, sizes, steps, prompt length) are checked afterwards by
``serve.limits`` because they are only known when the application is built.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr


class GenerateRequest(BaseModel):
    """Body of ``POST /v1/generate``; omitted fields take the served model's defaults."""

    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr = Field(description="What the video shows.")
    steps: StrictInt | None = Field(
        None, description="Sampling steps (serve.min_steps..max_steps)."
    )
    seed: StrictInt | None = Field(
        None, description="Noise seed in [0, 2^32); random when omitted."
    )
    num_frames: StrictInt | None = Field(None, description="Frames, k * VAE temporal factor + 1.")
    height: StrictInt | None = Field(None, description="Pixels, a multiple of VAE factor x patch.")
    width: StrictInt | None = Field(None, description="Pixels, a multiple of VAE factor x patch.")
    format: Literal["mp4", "gif"] = Field(
        "mp4", description="'mp4' (video/mp4) or 'gif' (image/gif)."
    )
    model: StrictStr | None = Field(None, description="Served model id from GET /v1/models.")


class ErrorDetail(BaseModel):
    type: str = Field(
        description="invalid_request, unauthorized, forbidden, overloaded, timeout, ..."
    )
    field: str | None = Field(None, description="The request field at fault, when there is one.")
    message: str
    request_id: str | None = None


class ErrorBody(BaseModel):
    """Every error response: ``{"error": {...}}`` with a JSON content type."""

    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    path: str
    default: bool


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class JobProgress(BaseModel):
    step: int = Field(description="Sampling steps done.")
    steps: int = Field(description="Sampling steps in all.")


class JobError(BaseModel):
    type: str = Field(description="invalid_request, replica_lost, internal, ...")
    message: str


class VideoJob(BaseModel):
    """A video job (``POST /v1/videos``, ``GET /v1/videos/{id}``)."""

    id: str
    object: Literal["video"] = "video"
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    model: str
    params: dict[str, Any] = Field(description="The validated request (defaults filled in).")
    progress: JobProgress
    created_at: float = Field(description="Unix time.")
    started_at: float | None = None
    finished_at: float | None = None
    heartbeat_at: float | None = Field(None, description="Last sign of life of its replica.")
    expires_at: float = Field(description="Unix time after which the job and video are gone.")
    attempts: int = Field(description="Times it was sent to a replica (a lost replica: +1).")
    replica: str | None = None
    error: JobError | None = Field(None, description="Why it failed.")
    last_error: JobError | None = Field(None, description="Why an earlier attempt was lost.")
    timings: dict[str, float] = Field(description="Seconds per stage once it succeeded.")
    status_url: str
    content_url: str | None = Field(None, description="The video, once succeeded.")


class VideoJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VideoJob]
