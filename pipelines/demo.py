"""`dcm demo`: the whole platform end to end on one machine.

    local Ray -> shapes videos -> Ray Data ingest (parquet latents) -> semantic stage ->
    detail stage -> teacher (50 steps + CFG), the fresh student, the bundled student and the
    untrained student at 2 and 4 steps -> Serve + one HTTP request -> report

The clips are encoded once: the demo trains for many epochs over 64 clips, where online
streaming (``data.mode: online``, for a single pass over a large corpus) would re-decode and
re-encode every clip each epoch.

Every stage records what it produced in ``<out>/state.json``; a re-run skips finished
stages unless ``--fresh`` is given. MLflow records the distillation (sqlite in ``<out>``).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pipelines.args
from dcm.config import Config
from dcm.files import write_json

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"
STATE = "state.json"


class Demo:
    """The demo's stages, run in order, each skipped when ``state.json`` says it finished."""

    def __init__(self, cfg: Config, out: Path, num_videos: int, num_prompts: int) -> None:
        self.cfg, self.out = cfg, out
        self.num_videos, self.num_prompts = num_videos, num_prompts
        self.state: dict[str, Any] = self._load_state()

    # ------------------------------------------------------------ bookkeeping
    def _load_state(self) -> dict[str, Any]:
        path = self.out / STATE
        return json.loads(path.read_text()) if path.is_file() else {}

    def _save_state(self) -> None:
        write_json(self.out / STATE, self.state, default=str)

    def stage(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        done = self.state.get(name)
        if done and done.get("done"):
            log.info(
                "%s: already done (%.0f s), skipping; --fresh re-runs it", name, done["seconds"]
            )
            return done["result"]
        log.info("%s: running", name)
        start = time.perf_counter()
        result = fn()
        took = time.perf_counter() - start
        self.state[name] = {"done": True, "seconds": took, "result": result}
        self._save_state()
        log.info("%s: done in %.0f s", name, took)
        return result

    # ------------------------------------------------------------ stages
    def data(self) -> dict[str, Any]:
        from dcm.shapes.dataset import write_dataset
        from dcm.shapes.grammar import all_captions

        d = self.cfg.data
        manifest = write_dataset(
            self.out / "data",
            n=self.num_videos,
            seed=self.cfg.train.seed,
            split="train",
            num_frames=d.num_frames,
            height=d.height,
            width=d.width,
            fps=self.cfg.model.fps,
        )
        prompts = all_captions("heldout")[: self.num_prompts]
        return {"manifest": str(manifest), "prompts": prompts, "videos": self.num_videos}

    def ingest(self, manifest: str) -> dict[str, Any]:
        import dataclasses

        from pipelines.ingest import run_ingest

        cfg = self.cfg.replace(**{"data.input": manifest, "ingest.out": str(self.out / "latents")})
        return dataclasses.asdict(run_ingest(cfg))

    def distill(self, latents: str) -> dict[str, Any]:
        from pipelines.distill import run_distill

        cfg = self.cfg.replace(
            **{
                "data.latents": latents,
                "data.mode": "parquet",
                "train.out": str(self.out / "train"),
            }
        )
        result = run_distill(cfg)
        # a stable place for the final artifact (the checkpoint folder name has a timestamp)
        artifact = self.out / "artifact"
        if artifact.exists():
            shutil.rmtree(artifact)
        shutil.copytree(result.artifact_dir, artifact)
        return {
            "artifact": str(artifact),
            "checkpoint_artifact": str(result.artifact_dir),
            "mlflow_run_id": result.mlflow_run_id,
            "tracking_uri": tracking_uri(cfg),
            "stages": {
                name: {"artifact": str(r.artifact_dir), "run_id": r.mlflow_run_id}
                for name, r in (result.stages or {result.stage: result}).items()
            },
        }

    def evaluate(self, artifact: str, prompts: list[str]) -> dict[str, Any]:
        from pipelines.report import evaluate_models

        return evaluate_models(self.cfg, artifact, prompts, self.out / "eval")

    def serve(self, artifact: str, prompt: str) -> dict[str, Any]:
        import requests

        from pipelines import serve as serve_stage

        cfg = self.cfg.replace(
            **{"model.path": artifact, "serve.min_replicas": 1, "serve.max_replicas": 1}
        )
        url = serve_stage.start(cfg, name="demo")
        try:
            body = {"prompt": prompt, "steps": self.cfg.sample.steps, "seed": 0, "format": "mp4"}
            start = time.perf_counter()
            resp = requests.post(f"{url}/v1/generate", json=body, timeout=600)
            took = time.perf_counter() - start
            if resp.status_code != 200:
                raise RuntimeError(f"Serve answered {resp.status_code}: {resp.text[:300]}")
            path = self.out / "serve_sample.mp4"
            path.write_bytes(resp.content)
            headers = {k: v for k, v in resp.headers.items() if k.lower().startswith("x-")}
            return {"video": str(path), "seconds": took, "url": url, "headers": headers}
        finally:
            serve_stage.stop()

    def report(self) -> dict[str, Any]:
        from pipelines.report import write_report

        paths = write_report(self.out, self.state)
        return {k: str(v) for k, v in paths.items()}


def tracking_uri(cfg: Config) -> str:
    from pipelines.distill import run_dir
    from pipelines.tracking import tracking_uri as uri

    return uri(cfg, run_dir(cfg))


def run_demo(
    cfg: Config, out: Path, fresh: bool = False, num_videos: int = 64, num_prompts: int = 16
) -> dict[str, Any]:
    """Run every stage (skipping finished ones) and return the final state."""
    from pipelines.cluster import init_ray, shutdown

    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    demo = Demo(cfg, out, num_videos, num_prompts)
    ctx = init_ray(cfg.ray)
    try:
        data = demo.stage("data", demo.data)
        latents = demo.stage("ingest", lambda: demo.ingest(data["manifest"]))
        dist = demo.stage("distill", lambda: demo.distill(str(latents["out"])))
        demo.stage("evaluate", lambda: demo.evaluate(dist["artifact"], data["prompts"]))
        demo.stage("serve", lambda: demo.serve(dist["artifact"], data["prompts"][0]))
        report = demo.stage("report", demo.report)
    finally:
        shutdown(ctx)
    print(f"Report:         {report['html']} (and {report['md']})")
    print(
        f"MLflow UI:      .venv/bin/mlflow ui --backend-store-uri {dist['tracking_uri']} --host 127.0.0.1 --port 5000"
    )
    print(
        "Ray dashboard:  http://127.0.0.1:8265 while a stage runs (start one with `ray start --head --dashboard-host 127.0.0.1`)"
    )
    return demo.state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dcm demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--fresh", action="store_true", help="re-run every stage from scratch")
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--videos", type=int, default=64, help="shapes videos to generate")
    parser.add_argument("--prompts", type=int, default=16, help="held-out prompts to evaluate")
    pipelines.args.add_common(parser)
    args = parser.parse_args(argv)
    if not args.config and not args.preset:
        args.config = str(DEFAULT_CONFIG)
    cfg = pipelines.args.resolve(args)
    run_demo(cfg, Path(args.out), args.fresh, args.videos, args.prompts)
    return 0


if __name__ == "__main__":
    sys.exit(pipelines.args.run_main(main))
