"""`dcm sweep`: Ray Tune over config keys; every trial is a distillation run.

    python -m pipelines.sweep --config pipelines/configs/sweep-shapes.yaml [--set ...] [--dry-run]
    python -m pipelines.sweep --config ... --resume   # continue an interrupted sweep
    python -m pipelines.sweep report RUN_DIR

``sweep.space`` maps dotted config keys (``method.split`` = the expert boundary b,
``method.tc_weight``, ``train.lr_semantic``, ``lora.rank``, ...) to a grid, a choice or a
range; ``sweep.variants`` adds named override sets (the ablation's model variants) as one
more dimension. Searchers: grid, random, or Optuna's TPE (model-based); ASHA stops weak
trials early on ``sweep.metric``.

Ray 2.60 / Train V2 (RUNTIME.md): a trial is a driver function holding 0.01 CPU that runs
each stage through ``pipelines.distill.run_stage`` (the runner of ``dcm distill``) with a
``TuneReportCallback``; Tune never wraps a trainer. MLflow goes through
``pipelines.tracking``. ASHA needs the dashboard on (without it
a stopped trial's workers are never released).

Run directory ``<train.out>/<run name>/``: ``trials/<run name>-<trial id>/`` (each trial's
distill run dir), ``tune-*/`` (Tune's state), ``mlflow.db`` (default store), ``sweep.json``
(parent run, metric, the Tune folder that ``--resume`` restores), ``trials.json`` (every
trial's params, status and metric history), ``best.yaml`` (the best configuration as a
distill config) and ``report/``.
MLflow: one parent run per sweep; each trial is a child run, its stages nested below it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pipelines.args
from dcm.config import Config, ConfigError, SweepConfig, all_keys, explain, from_dict
from dcm.files import is_remote, write_atomic, write_json

VARIANT = "variant"  # the Tune parameter that selects one of sweep.variants
TRIAL, SWEEP = "trial", "sweep"  # dcm_stage tags of a trial's run and the parent run
KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
SWEEP_FILE = "sweep.json"
TRIALS_FILE = "trials.json"
# What a trial's Tune function (which only starts Ray Train and waits) holds beside its workers.
TRIAL_DRIVER_CPUS = 0.01
BEST_FILE = "best.yaml"


# ---------------------------------------------------------------- search space
@dataclass(frozen=True)
class Dimension:
    """One searched key: ``kind`` in KINDS, ``values`` the list (grid/choice) or (lo, hi)."""

    key: str
    kind: str
    values: tuple[Any, ...]


def parse_space(cfg: Config) -> list[Dimension]:
    """``sweep.space`` + ``sweep.variants`` as checked dimensions (bad input: ConfigError).

    Every key must be a config key, and every listed value and range end must give a valid
    config (so a split outside the grid fails here, not in trial 7).
    """
    keys = set(all_keys())
    dims: list[Dimension] = []
    for key, spec in cfg.sweep.space.items():
        where = f"sweep.space.{key}"
        if key not in keys:
            raise ConfigError(f"{where}: '{key}' is not a config key (see --dry-run --explain)")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
            raise ConfigError(
                f"{where} must be one of {{{': ..}, {'.join(KINDS)}: ..}}, got {spec!r}"
            )
        kind, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.{kind} must be a non-empty list, got {values!r}")
        if kind in ("uniform", "loguniform", "randint"):
            if len(values) != 2 or not all(isinstance(v, (int, float)) for v in values):
                raise ConfigError(f"{where}.{kind} must be [lo, hi] numbers, got {values!r}")
            lo, hi = values
            if not lo < hi or (kind == "loguniform" and lo <= 0):
                raise ConfigError(
                    f"{where}.{kind}={values!r} needs lo < hi (and lo > 0 for loguniform)"
                )
            if kind == "randint" and not all(isinstance(v, int) for v in values):
                raise ConfigError(f"{where}.randint={values!r} must be two integers")
        for value in values:
            _check(cfg, {key: value}, f"{where}: value {value!r}")
        dims.append(Dimension(key, kind, tuple(values)))
    if cfg.sweep.variants:
        for name, overrides in cfg.sweep.variants.items():
            bad = [k for k in overrides if k not in keys]
            if bad:
                raise ConfigError(f"sweep.variants.{name}: '{bad[0]}' is not a config key")
            _check(cfg, overrides, f"sweep.variants.{name}")
        dims.append(Dimension(VARIANT, "grid", tuple(cfg.sweep.variants)))
    if not dims:
        raise ConfigError(
            "sweep.space and sweep.variants are both empty: give at least one key to search"
        )
    return dims


def _check(cfg: Config, dotted: dict[str, Any], where: str) -> None:
    try:
        cfg.replace(**dotted)
    except ConfigError as err:
        raise ConfigError(f"{where} is invalid: {err}") from None


def tune_space(dims: list[Dimension], searcher: str) -> dict[str, Any]:
    """Tune domains. Grid dimensions stay grids only for the grid searcher (random and
    Optuna draw them as choices); ranges are sampled ``num_samples`` times."""
    from ray import tune

    space: dict[str, Any] = {}
    for d in dims:
        if d.kind == "grid" and searcher == "grid":
            space[d.key] = tune.grid_search(list(d.values))
        elif d.kind in ("grid", "choice"):
            space[d.key] = tune.choice(list(d.values))
        elif d.kind == "uniform":
            space[d.key] = tune.uniform(*d.values)
        elif d.kind == "loguniform":
            space[d.key] = tune.loguniform(*d.values)
        else:  # randint, hi inclusive
            space[d.key] = tune.randint(d.values[0], d.values[1] + 1)
    return space


def trial_config(base: Config, params: dict[str, Any], run_name: str) -> Config:
    """The config of one trial: base <- its variant's overrides <- its sampled params."""
    params = dict(params)
    overrides: dict[str, Any] = {}
    if VARIANT in params:
        overrides.update(base.sweep.variants[params.pop(VARIANT)])
    overrides.update(params)
    overrides["train.run_name"] = run_name
    return base.replace(**overrides)


def best_config(base: Config, params: dict[str, Any]) -> Config:
    """The best trial's configuration as a plain distill config (no sweep, own run name)."""
    data = trial_config(base, params, f"{base.run_name}-best").to_dict()
    data["sweep"] = dataclasses.asdict(SweepConfig())
    return from_dict(data)


# ---------------------------------------------------------------- paths and files
def sweep_dir(cfg: Config) -> Path:
    """Where the sweep's own files live (local; a remote train.out keeps them under ./runs)."""
    root = cfg.train.out if not is_remote(cfg.train.out) else "runs"
    return Path(root).expanduser().resolve() / cfg.run_name


def storage_root(cfg: Config) -> str:
    """Where Tune and the trials' Ray Train runs keep their state (local dir or URI)."""
    if is_remote(cfg.train.out):
        return f"{cfg.train.out.rstrip('/')}/{cfg.run_name}"
    return str(sweep_dir(cfg))


# ---------------------------------------------------------------- one trial
def _report_callback(metric: str, stage: str) -> Any:
    """TuneReportCallback that forwards only reports carrying ``metric``, tagged with the stage.

    The train loop reports losses every log step and validation metrics at checkpoints;
    Tune rejects results without the metric it optimises, and ASHA's rungs should count
    validations, not log lines.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    class _ValidationReport(TuneReportCallback):
        def after_report(self, run_context: Any, metrics: list[dict], checkpoint: Any) -> None:
            if metrics and metric in metrics[0]:
                tagged = [{**metrics[0], "stage": stage}, *metrics[1:]]
                super().after_report(run_context, tagged, checkpoint)

    return _ValidationReport()


def run_trial(params: dict[str, Any], base: dict[str, Any], parent_run_id: str | None) -> None:
    """Tune's function trainable: one distill run (one stage or both) as an MLflow child run.

    Each stage goes through ``pipelines.distill.run_stage``, the runner of ``dcm distill``,
    with a Tune report callback added.
    """
    from ray import tune

    from pipelines.distill import run_dir, run_stage, training_data, validation_inputs
    from pipelines.tracking import Tracker

    base_cfg = from_dict(base)
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(base_cfg, params, f"{base_cfg.run_name}-{trial_id}")
    tracker = Tracker(cfg, run_dir(cfg))
    trial = tracker.open_run(
        TRIAL, parent_run_id, name=cfg.run_name, tags={"dcm_trial": trial_id},
        params={f"sweep/{k}": v for k, v in params.items()},
    )  # fmt: skip
    stages = ("semantic", "detail") if cfg.train.stage == "both" else (cfg.train.stage,)
    init, summary = None, {}
    # An exception is left to the driver (`_collect`), which closes the run as FAILED from
    # Tune's record of the error. Closing it here raced with ASHA: a stopped trial's actor
    # raises out of fit() as it dies, after the driver closed the run as KILLED (CI,
    # 2026-12-03).
    dataset = training_data(cfg)
    val = validation_inputs(cfg, dataset)
    for stage in stages:
        callback = _report_callback(cfg.sweep.metric, stage)
        result = run_stage(
            cfg, stage, tracker, trial.run_id, init, dataset=dataset, val=val,
            callbacks=[callback], close_on_error=False,
        )  # fmt: skip
        init = result.checkpoint
        scores = {k: v for k, v in result.metrics.items() if k.startswith("val/")}
        summary.update({f"{stage}/{k}": v for k, v in scores.items()})
        summary.update(scores)
    trial.log_metrics(summary, step=0)
    trial.set_tags({"dcm_checkpoint": init.path})
    tracker.close_run(trial)


# ---------------------------------------------------------------- the sweep
@dataclass
class SweepResult:
    run_dir: Path
    best_config: Path | None  # best.yaml, loadable by `python -m pipelines.distill --config`
    best_params: dict[str, Any]
    best_value: float | None
    parent_run_id: str | None
    trials: list[dict[str, Any]]


def _searcher(cfg: Config) -> Any:
    s = cfg.sweep
    if s.searcher != "optuna":
        return None  # grid and random: Tune's variant generator
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    return ConcurrencyLimiter(OptunaSearch(seed=cfg.train.seed), max_concurrent=s.max_concurrent)


def _scheduler(cfg: Config) -> Any:
    if not cfg.sweep.asha:
        return None
    from ray.tune.schedulers import ASHAScheduler

    # Time unit = validation reports, at most one per step. ASHA stops a trial that reaches
    # max_t, so max_t lies beyond the last report: a trial always ends by itself.
    max_t = cfg.train.steps_semantic + cfg.train.steps_detail + 1
    return ASHAScheduler(
        time_attr="training_iteration", max_t=max_t,
        grace_period=min(cfg.sweep.grace_period, max_t),
        reduction_factor=cfg.sweep.reduction_factor,
    )  # fmt: skip


def check_sweep(cfg: Config) -> list[Dimension]:
    """Everything about a sweep config that can be checked without a cluster."""
    s = cfg.sweep
    if s.trial_gpus not in (0.0, 1.0):
        raise ConfigError(
            f"sweep.trial_gpus={s.trial_gpus:g} is not supported: Train workers take 0 or 1 GPU each "
            "(use train.num_workers for more GPUs per trial)"
        )
    if s.asha and not cfg.ray.dashboard and not cfg.ray.address:
        raise ConfigError(
            "sweep.asha needs ray.dashboard=true: without the dashboard Ray 2.60 never releases "
            "a stopped trial's workers (RUNTIME.md)"
        )
    from pipelines.checkpoints import check_detail_start

    check_detail_start(cfg.train.stage, cfg.train.init_from)
    return parse_space(cfg)


def check_room_for_data(cfg: Config, cluster_cpus: float) -> None:
    """Concurrent trials must leave one whole CPU free: every trial's Ray Data read tasks ask
    for 1 CPU, and while the trials hold the rest those tasks never start and the sweep
    waits forever. A trial holds its workers' CPUs plus its Tune driver's TRIAL_DRIVER_CPUS:
    2 trials x (0.5 + 0.01) on 2 cores left 0.98 CPU and hung the ablation, as 3 x 0.5 did
    before. GPU trials read from the CPUs the GPU workers do not hold: the same rule."""
    per_trial = cfg.train.num_workers * cfg.sweep.trial_cpus + TRIAL_DRIVER_CPUS
    held = round(cfg.sweep.max_concurrent * per_trial, 4)  # Ray counts CPUs in 1e-4 units
    if cluster_cpus - held < 1.0:
        raise ConfigError(
            f"sweep.max_concurrent={cfg.sweep.max_concurrent} trials x (train.num_workers="
            f"{cfg.train.num_workers} x sweep.trial_cpus={cfg.sweep.trial_cpus:g} + "
            f"{TRIAL_DRIVER_CPUS:g} for the trial's driver) hold {held:g} of the cluster's "
            f"{cluster_cpus:g} CPUs, leaving no whole CPU for the trials' data reads: lower "
            "sweep.max_concurrent or sweep.trial_cpus"
        )


def resume_record(cfg: Config) -> dict[str, Any]:
    """The interrupted sweep's ``sweep.json`` that ``--resume`` continues: it must exist, name
    its Tune state, and have searched the same space (trials keep the parameters they were
    drawn with; a different space would mix two sweeps in one table)."""
    file = sweep_dir(cfg) / SWEEP_FILE
    if not file.is_file():
        raise ConfigError(
            f"--resume: there is no sweep '{cfg.run_name}' to resume ({file} is missing); "
            "check --out and name, or start it without --resume"
        )
    try:
        info = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"--resume: {file} is not valid JSON ({err.msg}, line {err.lineno}); restore it "
            "from a copy, or start the sweep again without --resume"
        ) from None
    if not isinstance(info, dict) or not info.get("tune_dir"):
        raise ConfigError(
            f"--resume: {file} does not name its Tune state (written by an older dcm); "
            "start the sweep again without --resume"
        )
    then = info.get("config", {}).get("sweep", {})
    now = json.loads(json.dumps(cfg.to_dict()["sweep"], default=str))  # as sweep.json holds it
    for key in ("space", "variants", "searcher", "metric", "mode", "num_samples"):
        if then.get(key) != now.get(key):
            raise ConfigError(
                f"--resume: sweep.{key} is {now.get(key)!r} here but {then.get(key)!r} in the "
                f"interrupted sweep ({file}); resume with its config, or give the new sweep "
                "another name"
            )
    return info


def run_sweep(cfg: Config, resume: bool = False) -> SweepResult:
    """Run the whole sweep, write trials.json, best.yaml and the report; return the summary.

    ``resume``: continue the interrupted sweep of this name (``dcm sweep --resume``). Tune
    restores its state: finished trials are kept, unfinished and errored ones run again
    under their own trial ids, so each rerun finds its distill run folder and MLflow runs.
    There a finished stage is skipped and an interrupted one resumes from its last
    checkpoint (``pipelines.distill.run_stage``). The parent MLflow run is the one recorded.
    """
    from ray import tune

    from pipelines.args import absolute_paths
    from pipelines.cluster import cluster_cpus, init_ray, shutdown
    from pipelines.tracking import Tracker

    cfg = absolute_paths(cfg)  # trials run in their own working directories
    dims = check_sweep(cfg)
    recorded = resume_record(cfg) if resume else None
    out = sweep_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(cfg, out)
    # Trials log into the sweep's store, even where the default is their own run dir.
    uri = tracker.uri or ""
    base = cfg.replace(**{
        "train.out": f"{storage_root(cfg)}/trials",
        "train.cpus_per_worker": cfg.sweep.trial_cpus,
        "train.use_gpu": bool(cfg.sweep.trial_gpus),
        "tracking.uri": uri if cfg.tracking.enabled else cfg.tracking.uri,
    })  # fmt: skip
    ctx = init_ray(cfg.ray)
    try:
        check_room_for_data(cfg, cluster_cpus())  # before any run or file is opened
        if recorded is not None:
            parent, tune_dir = recorded["parent_run_id"], recorded["tune_dir"]
            tracker.reopen(parent)
        else:
            tune_dir = f"tune-{time.strftime('%Y%m%d-%H%M%S')}"
            parent = tracker.open_run(
                SWEEP,
                name=cfg.run_name,
                params=_sweep_params(cfg, dims),
                config=False,
                resume=False,
            ).run_id
            write_json(out / SWEEP_FILE, default=str, data={
                "name": cfg.run_name, "parent_run_id": parent, "tracking_uri": uri,
                "metric": cfg.sweep.metric, "mode": cfg.sweep.mode,
                "searcher": cfg.sweep.searcher, "dimensions": [d.key for d in dims],
                "tune_dir": tune_dir, "config": cfg.to_dict(),
            })  # fmt: skip
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, base=base.to_dict(), parent_run_id=parent),
            {"cpu": TRIAL_DRIVER_CPUS},
        )
        if recorded is not None:
            tuner = _restored_tuner(f"{storage_root(cfg)}/{tune_dir}", trainable)
        else:
            search = _searcher(cfg)
            tuner = tune.Tuner(
                trainable,
                param_space=tune_space(dims, cfg.sweep.searcher),
                tune_config=tune.TuneConfig(
                    metric=cfg.sweep.metric, mode=cfg.sweep.mode, search_alg=search,
                    scheduler=_scheduler(cfg), num_samples=cfg.sweep.num_samples,
                    max_concurrent_trials=None if search else cfg.sweep.max_concurrent,
                ),
                run_config=tune.RunConfig(
                    name=tune_dir, storage_path=storage_root(cfg), verbose=1
                ),
            )  # fmt: skip
        grid = tuner.fit()
        baseline = teacher_baseline(base) if cfg.sweep.teacher_baseline else {}
    finally:
        shutdown(ctx)
    trials = _collect(grid, cfg, tracker, parent)
    write_json(out / TRIALS_FILE, trials, default=str)
    if baseline:
        info = json.loads((out / SWEEP_FILE).read_text())
        write_json(out / SWEEP_FILE, default=str, data={**info, "baseline": baseline})
        tracker.logger(parent).log_metrics({f"teacher/{cfg.sweep.metric}": baseline["value"]}, 0)
    return _finish(cfg, out, trials, tracker, parent)


def _restored_tuner(path: str, trainable: Any) -> Any:
    """Tune's state at ``path`` restored: unfinished and errored trials run again."""
    from ray import tune

    if not tune.Tuner.can_restore(path):
        raise ConfigError(
            f"--resume: no Tune state to restore in {path} (the sweep stopped before its "
            "first trial started); start it again without --resume"
        )
    return tune.Tuner.restore(
        path, trainable, resume_unfinished=True, resume_errored=True, restart_errored=False
    )


def teacher_baseline(cfg: Config) -> dict[str, Any]:
    """The teacher's score at ``sample.teacher_steps`` on the trials' validation prompts and
    seeds (the ablation's reference; METHOD.md section 9 compares every variant with it).

    Scored like the trials' ``val/score`` on the shapes world (dcm.shapes.metrics summary),
    with the teacher on its own scheduler (``sampler`` names it). Elsewhere ``val/score`` is
    the PSNR to this very teacher, so there is no baseline value to draw: ``{}``.
    """
    from dcm.evaluation import is_shapes
    from dcm.generate import VideoGenerator
    from dcm.shapes.metrics import score_batch
    from pipelines.distill import training_data, validation_inputs

    captions = validation_inputs(cfg, training_data(cfg)).captions
    steps = cfg.sample.teacher_steps
    if not is_shapes(captions):
        return {}
    gen = VideoGenerator.load(cfg.model.path, cfg=cfg)
    videos = [
        v for seed in cfg.sample.seeds
        for v in gen.generate(captions, teacher=True, teacher_steps=steps, seed=seed)
    ]  # fmt: skip
    res = score_batch(videos, captions * len(cfg.sample.seeds))
    return {"value": float(res["summary"]), "teacher_steps": steps, "scored": "shapes",
            "sampler": gen.teacher_description(steps),
            "adherence": float(res["adherence"]), "quality": float(res["quality"])}  # fmt: skip


def _sweep_params(cfg: Config, dims: list[Dimension]) -> dict[str, Any]:
    """What the parent MLflow run records of the sweep itself."""
    return {
        "searcher": cfg.sweep.searcher, "metric": cfg.sweep.metric, "mode": cfg.sweep.mode,
        "asha": cfg.sweep.asha, "num_samples": cfg.sweep.num_samples,
        "space": json.dumps({d.key: {d.kind: list(d.values)} for d in dims}),
    }  # fmt: skip


def _collect(grid: Any, cfg: Config, tracker: Any, parent: str | None) -> list[dict[str, Any]]:
    """One record per trial: params, status, final and best metric, metric history."""
    from pipelines.sweep_curves import metric_curve
    from pipelines.train_loop import STAGES

    metric, sign = cfg.sweep.metric, 1 if cfg.sweep.mode == "max" else -1
    children = {r.data.tags["dcm_trial"]: r for r in tracker.child_runs(parent, TRIAL)}
    trials = []
    for result in grid:
        history: list[list[float]] = []
        frame = result.metrics_dataframe
        if frame is not None and metric in frame:
            rows = frame[["training_iteration", metric]].dropna()
            history = [[float(i), float(v)] for i, v in rows.itertuples(index=False)]
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
        run = children.get(trial_id)
        if run is not None:
            # Tune restarts a resumed trial with an empty record, so its history holds only
            # the reports after the resume; the stage runs hold the whole curve. Their first
            # point is the untrained start (step 0), which never reaches Tune.
            logged = metric_curve(tracker.uri, run.info.run_id, metric)[1:]
            if len(logged) > len(history):
                history = [[float(i), v] for i, (_, v) in enumerate(logged, 1)]
        values = [v for _, v in history if math.isfinite(v)]
        logger = tracker.logger(run.info.run_id if run else None)
        status = "error" if result.error else "finished"
        if run is not None and run.info.status == "RUNNING":
            # The trial raised (Tune holds the error), or ASHA stopped it: the trial leaves
            # its run and its stage runs open for this driver to close.
            status = "error" if result.error else "stopped"
            ending = "FAILED" if result.error else "KILLED"
            for stage in STAGES:
                for child in tracker.child_runs(run.info.run_id, stage):
                    if child.info.status == "RUNNING":
                        tracker.close_run(tracker.logger(child.info.run_id), ending)
            tracker.close_run(logger, ending)
        if values:
            logger.log_metrics({"sweep/best": sign * max(sign * v for v in values)}, step=0)
        trials.append({
            "trial_id": trial_id, "params": dict(result.config), "status": status,
            "error": str(result.error).splitlines()[0][:500] if result.error else "",
            "iterations": len(history), "last": values[-1] if values else None,
            "best": sign * max(sign * v for v in values) if values else None,
            "history": history, "mlflow_run_id": run.info.run_id if run else None,
        })  # fmt: skip
    return trials


def _finish(
    cfg: Config, out: Path, trials: list[dict[str, Any]], tracker: Any, parent: str | None
) -> SweepResult:
    from pipelines.sweep_report import write_report

    sign = 1 if cfg.sweep.mode == "max" else -1
    scored = [t for t in trials if t["best"] is not None]
    best = max(scored, key=lambda t: sign * t["best"]) if scored else None
    best_file = None
    if best is not None:
        best_file = out / BEST_FILE
        chosen = best_config(cfg, best["params"])
        header = (
            f"# Best configuration of sweep '{cfg.run_name}': trial {best['trial_id']}, "
            f"{cfg.sweep.metric} = {best['best']:.6g} ({cfg.sweep.mode}).\n"
            f"# Searched: {json.dumps(best['params'], sort_keys=True)}\n"
            f"#   python -m pipelines.distill --config {best_file}\n"
        )
        write_atomic(best_file, header + chosen.to_yaml())
    logger = tracker.logger(parent)
    if best is not None:
        logger.log_metrics({f"best/{cfg.sweep.metric}": best["best"]}, step=0)
        logger.log_artifact(best_file)
    stopped = sum(t["status"] == "stopped" for t in trials)
    logger.log_metrics({"trials": len(trials), "trials_stopped": stopped}, step=0)
    write_report(out)  # table + plots, logged to the parent run
    tracker.close_run(logger, "FINISHED" if best else "FAILED")
    return SweepResult(
        out, best_file, best["params"] if best else {}, best["best"] if best else None,
        parent, trials,
    )  # fmt: skip


# ---------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        from pipelines.sweep_report import main as report_main

        return report_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="dcm sweep", description=__doc__.split("\n")[0],
        epilog="Compare finished trials with: dcm sweep report RUN_DIR",
    )  # fmt: skip
    parser.add_argument("--data", help="ingest folder (parquet) or raw videos, as for dcm distill")
    parser.add_argument("--out", help="root of run directories (train.out)")
    parser.add_argument(
        "--resume", action="store_true",
        help="continue the interrupted sweep of this name: finished trials are kept, the "
        "others run again from their last checkpoints (same config)",
    )  # fmt: skip
    pipelines.args.add_common(parser)
    args = parser.parse_args(argv)
    dry_run, args.dry_run = args.dry_run, False
    cfg = pipelines.args.resolve(
        args, **pipelines.args.data_keys(args.data), **{"train.out": args.out}
    )
    check_sweep(cfg)  # a bad space fails the dry run too
    if dry_run:
        print(explain() if args.explain else cfg.to_yaml(), end="")
        return 0
    result = run_sweep(cfg, resume=args.resume)
    print(json.dumps({
        "run_dir": str(result.run_dir), "best_config": str(result.best_config or ""),
        "best_params": result.best_params, cfg.sweep.metric: result.best_value,
        "trials": len(result.trials), "mlflow_parent_run_id": result.parent_run_id,
    }, default=str))  # fmt: skip
    return 0 if result.best_config else 1


if __name__ == "__main__":
    sys.exit(pipelines.args.run_main(main))
