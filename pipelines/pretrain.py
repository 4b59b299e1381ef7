"""Train the tiny shapes teacher bundle (VAE, text encoder, transformer) on Ray Train.

    python -m pipelines.pretrain [--out dcm/shapes/bundle] [--minutes 60] [--set train.seed=0]

One TorchTrainer worker (fractional CPUs on the loopback cluster, a GPU when there is one)
runs ``pretrain_loop``, whose phases are top-level functions sharing one ``Worker``:

1. ``start_worker``: a random bundle from ``dcm.tiny.build_tiny_bundle`` with the grammar's
   word vocabulary (or a copy of ``--init``);
2. ``fit_vae``: reconstruction (MSE + L1) + a small KL on freshly rendered clips, then the
   decoder alone on full-length clips;
3. ``encode_clips``: the training clips encoded once (posterior mean and std cached), the
   per-channel latent statistics written into the VAE config (``Bundle.normalize`` reads them);
4. ``fit_flow``: the transformer and the text encoder jointly on ``flow_loss``, rectified
   flow (METHOD.md section 1): x_s = (1 - s) x0 + s eps, target v = eps - x0, s from the
   preset's shifted grid (section 2), 10% empty prompts (data.empty_prompt_prob), EMA weights;
5. ``save_bundle``: the bundle (EMA weights) reported as a Ray checkpoint every few minutes
   and at the end; the driver copies the last one to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dcm.config import Config, ConfigError, from_dict
from dcm.decode import to_pixels
from dcm.ema import Ema
from dcm.schedule import shifted
from dcm.shapes.grammar import VOCAB
from pipelines.args import add_common, resolve, run_main
from pipelines.worker_entry import pretrain_worker

FG_WEIGHT = 10.0  # VAE loss weight of coloured (object) pixels against grey background
LOGVAR_INIT = -8.0  # initial VAE posterior log-variance (std 0.018)
SHARD = "4MB"  # weight files stay small: the bundle is committed to the repository
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "dcm" / "shapes" / "bundle"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainSettings:
    """Sizes and budgets of the teacher pretraining (the model maths come from Config)."""

    vae_steps: int = 600  # VAE optimiser steps (0 with --init: keep its VAE)
    vae_frames: int = 5  # frames per VAE training clip (1 + 4k; the causal VAE runs any length)
    vae_batch: int = 4
    vae_lr: float = 1e-3
    vae_minutes: float = 0.0  # wall-clock cap of the VAE phase (0 = none)
    vae_pool: int = 0  # clips rendered once and sampled by the VAE phase (0 = fresh each step)
    decoder_steps: int = 0  # then the decoder alone on full-length clips (encoder frozen)
    decoder_minutes: float = 0.0  # wall-clock cap of the decoder phase (0 = none)
    kl_weight: float = 1e-6
    init: str = ""  # start from this bundle instead of a random one (its VAE, text encoder, ...)
    clips: int = 1024  # training clips encoded once
    steps: int = 4000  # transformer optimiser steps (upper bound)
    minutes: float = 0.0  # wall-clock cap of the transformer phase (0 = none)
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 100
    ema: float = 0.998
    two_prob: float = 0.15  # share of two-object training clips
    threads: int = 2  # torch threads in the worker
    checkpoint_minutes: float = 10.0
    eval_prompts: int = 24  # held-out captions the finished teacher is scored on (0 = skip)
    eval_cfg: str = ""  # comma-separated CFG scales to score (default: method.cfg_scale)
    log_every: int = 25
    # model sizes for dcm.tiny.build_tiny_bundle
    layers: int = 4
    heads: int = 4
    head_dim: int = 16
    ffn_dim: int = 256
    z_dim: int = 8
    vae_base_dim: int = 8
    text_dim: int = 64
    text_layers: int = 2
    text_ff: int = 128

    def __post_init__(self) -> None:
        if self.vae_steps < 0:
            raise ConfigError("pretrain --vae-steps must be >= 0")
        for name in ("vae_pool", "decoder_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"pretrain --{name.replace('_', '-')} must be >= 0")
        if self.steps == 0 and not self.init:
            raise ConfigError("pretrain --steps 0 keeps a transformer: it needs --init BUNDLE")
        if self.steps < 0:
            raise ConfigError("pretrain --steps must be >= 0")
        for name in ("clips", "batch", "vae_batch", "threads", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"pretrain --{name.replace('_', '-')} must be at least 1")
        if (self.vae_frames - 1) % 4:
            raise ConfigError(f"--vae-frames={self.vae_frames} must be 4k+1 (e.g. 5 or 9)")
        if self.eval_prompts < 0:
            raise ConfigError("pretrain --eval-prompts must be >= 0")
        try:
            [float(w) for w in self.eval_cfg.split(",") if w.strip()]
        except ValueError:
            raise ConfigError(f"--eval-cfg '{self.eval_cfg}' must be numbers, e.g. 5,3") from None
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"--ema={self.ema} must lie in [0, 1)")

    def dims(self) -> dict[str, Any]:
        names = ("layers", "heads", "head_dim", "ffn_dim", "z_dim", "vae_base_dim")
        names += ("text_dim", "text_layers", "text_ff")
        return {n: getattr(self, n) for n in names}


# ---------------------------------------------------------------- shared pieces
def recon_loss(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """VAE reconstruction loss: MSE + 0.1 L1, coloured (object) pixels weighted FG_WEIGHT x.

    Objects cover ~6% of the pixels: unweighted, the VAE first learns backgrounds only and
    stalls near 20 dB with the shapes missing.
    """
    chroma = x.max(dim=1, keepdim=True).values - x.min(dim=1, keepdim=True).values
    weight = 1.0 + (FG_WEIGHT - 1.0) * (chroma > 0.2).float()  # (B, 1, F, H, W)
    err = recon - x
    return (weight * (err.pow(2) + 0.1 * err.abs())).mean() / weight.mean()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two pixel tensors in [-1, 1] (peak-to-peak 2)."""
    mse = (a.clamp(-1, 1) - b.clamp(-1, 1)).pow(2).mean().item()
    return float(10.0 * math.log10(4.0 / max(mse, 1e-12)))


def _lr_factor(step: int, progress: float, warmup: int) -> float:
    """Linear warmup, then cosine from 1 to 0.1 over the run's progress (steps or minutes)."""
    warm = min(1.0, (step + 1) / max(warmup, 1))
    return warm * (0.1 + 0.45 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


# ---------------------------------------------------------------- the worker, in phases
@dataclass
class Worker:
    """What the pretraining phases on the worker share."""

    cfg: Config
    st: PretrainSettings
    dev: torch.device
    rng: np.random.Generator  # clip draws and prompt dropout
    dgen: torch.Generator  # noise, drawn on `dev`
    work: Path  # scratch folder: the starting bundle (init/) and checkpoints being written
    base: Path  # the starting bundle (random, or a copy of --init)
    bundle: Any  # dcm.bundle.Bundle loaded from `base`: the modules this worker trains
    info: dict[str, Any]  # becomes the bundle's pretrain.json
    started: float = field(default_factory=time.time)


@dataclass
class CachedLatents:
    """The training clips encoded once: posterior statistics, captions, normalisation."""

    captions: list[str]
    z_mean: torch.Tensor  # (N, C, T, h, w) raw posterior means, on the device
    z_std: torch.Tensor  # (N, C, T, h, w) posterior stds (zeros for data.posterior=mean)
    norm_mean: torch.Tensor  # (1, C, 1, 1, 1) per-channel latent mean (Bundle.normalize)
    norm_std: torch.Tensor  # (1, C, 1, 1, 1)


@dataclass
class FlowProgress:
    """Where the transformer phase stands (what a bundle checkpoint records)."""

    ema: Ema
    step: int = 0
    losses: list[torch.Tensor] = field(default_factory=list)
    started: float = field(default_factory=time.time)


def start_worker(config: dict[str, Any]) -> Worker:
    """Phase 1: seeds, device, and the starting bundle, a random one with the grammar's word
    vocabulary or a copy of ``--init``, loaded by the library's loader."""
    from dcm.bundle import load_bundle, resolve_model_path
    from dcm.tiny import build_tiny_bundle

    cfg: Config = from_dict(config["cfg"])
    st = PretrainSettings(**config["settings"])
    torch.set_num_threads(st.threads)
    torch.manual_seed(cfg.train.seed)
    rng = np.random.default_rng(cfg.train.seed)
    use_cuda = torch.cuda.is_available() and cfg.train.use_gpu is not False
    dev = torch.device("cuda" if use_cuda else "cpu")
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on a GPU (cuDNN convs default to it)
    dgen = torch.Generator(device=dev).manual_seed(cfg.train.seed)
    started = time.time()
    info: dict[str, Any] = {"settings": dataclasses.asdict(st), "device": str(dev)}
    if use_cuda:  # the card the worker trained on (the driver's host may have none)
        info["gpu"] = torch.cuda.get_device_name(dev)
    work = Path(tempfile.mkdtemp(prefix="dcm-pretrain-"))
    if st.init:
        base = Path(shutil.copytree(resolve_model_path(st.init), work / "init"))
        if (base / "pretrain.json").is_file():  # the run this one continues
            info["init_run"] = json.loads((base / "pretrain.json").read_text())
    else:
        base = build_tiny_bundle(
            work / "init",
            vocab=list(VOCAB),
            seed=cfg.train.seed,
            shift=cfg.method.shift,
            vae_spatial_factor=cfg.model.vae_spatial_factor,
            patch_size=tuple(cfg.model.patch_size),
            **st.dims(),
        )
    bundle = load_bundle(base, device=dev, text_max_length=cfg.model.text_max_length)
    return Worker(cfg, st, dev, rng, dgen, work, base, bundle, info, started)


def render(
    w: Worker, n: int, seed: int, frames: int, split: str = "train"
) -> tuple[list[str], torch.Tensor]:
    """``n`` fresh shapes clips: captions and pixels (n, 3, frames, H, W) in [-1, 1]."""
    from dcm.shapes.dataset import iter_clips

    d = w.cfg.data
    pairs = list(iter_clips(n, seed, split, w.st.two_prob, frames, d.height, d.width))
    return [s.caption() for s, _ in pairs], to_pixels(np.stack([f for _, f in pairs]))


def vae_summary(recon: torch.Tensor, captions: list[str]) -> float:
    """The shapes summary of VAE reconstructions (B, 3, F, H, W) in [-1, 1] of clips with
    these captions: the most a flow model decoded through this VAE can score."""
    from dcm.generate import to_uint8
    from dcm.shapes.metrics import score_batch

    return float(score_batch(to_uint8(recon), captions)["summary"])


def init_vae_logvar(w: Worker) -> None:
    """A fresh VAE starts with posterior std ~1, which drowns its small latent means: the
    decoder then learns the average clip and stalls (~19 dB). Start the log-variance at
    LOGVAR_INIT so samples carry the mean from step one; the KL still regularises it."""
    vae = w.bundle.vae
    with torch.no_grad():
        z = vae.config.z_dim
        vae.quant_conv.weight[z:].zero_()  # output channels z.. are the log-variance
        vae.quant_conv.bias[z:].fill_(LOGVAR_INIT)


def fit_vae(
    w: Worker, tag: str, steps: int, minutes: float, frames: int, decoder_only: bool
) -> int:
    """Phase 2: the VAE (MSE + L1 reconstruction and a small KL, on clips never reused), or
    its decoder alone, for ``steps`` / ``minutes``; returns the steps done."""
    import ray.train

    st, vae, dev = w.st, w.bundle.vae, w.dev
    vae.train().requires_grad_(not decoder_only)
    if decoder_only:
        vae.decoder.requires_grad_(True)
        vae.post_quant_conv.requires_grad_(True)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=st.vae_lr, weight_decay=0.0)
    # A GPU steps faster than one CPU thread renders: there, sample from a clip pool.
    pool = render(w, st.vae_pool, 10_000, frames)[1] if steps and st.vae_pool else None
    seed0 = 30_000_000 if decoder_only else 10_000
    t0, step = time.time(), -1
    for step in range(steps):
        used = (time.time() - t0) / 60
        if minutes and used >= minutes:
            break
        if pool is not None:
            x = pool[torch.from_numpy(w.rng.integers(0, len(pool), st.vae_batch))]
        else:
            x = render(w, st.vae_batch, seed0 + step, frames)[1]
        x = x.to(dev)  # (B, 3, F, H, W)
        with torch.set_grad_enabled(not decoder_only):
            post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample(generator=None)).sample
        rec = recon_loss(recon, x)
        loss = rec
        if not decoder_only:
            loss = loss + st.kl_weight * post.kl().mean() / post.mean[0].numel()
        progress = max(step / steps, used / minutes if minutes else 0.0)
        for g in opt.param_groups:
            g["lr"] = st.vae_lr * _lr_factor(step, progress, 50)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % st.log_every == 0 or step == steps - 1:
            metrics = {"phase": tag, "step": step, "loss": rec.item(), "psnr": psnr(recon, x)}
            ray.train.report(metrics)
            log.info("%s %d/%d %s", tag, step, steps, metrics)
    vae.eval().requires_grad_(False)
    return step + 1


@torch.no_grad()
def encode_clips(w: Worker) -> CachedLatents:
    """Phase 3: the VAE's PSNR on held-out renders, then the training clips encoded once and
    the per-channel latent statistics written into the VAE config (``Bundle.normalize``
    reads them). With --steps 0 the transformer of --init is kept, and so are its statistics."""
    st, vae, dev, d = w.st, w.bundle.vae, w.dev, w.cfg.data
    caps_val, x_val = render(w, 16, 999, d.num_frames, "heldout")
    x_val = x_val.to(dev)
    recon = vae.decode(vae.encode(x_val).latent_dist.mode()).sample
    w.info["vae_psnr"] = psnr(recon, x_val)
    # the teacher's ceiling: a perfect flow model still decodes through this VAE
    w.info["vae_summary"] = vae_summary(recon, caps_val)
    captions, means, stds = [], [], []
    for start in range(0, st.clips if st.steps else 16, 16):
        caps, x = render(w, min(16, st.clips - start), 20_000 + start, d.num_frames)
        post = vae.encode(x.to(dev)).latent_dist
        captions += caps
        means.append(post.mean.cpu())
        stds.append(post.std.cpu())
    z_mean, z_std = torch.cat(means).to(dev), torch.cat(stds).to(dev)  # (N, C, T, h, w) raw
    ch_mean = z_mean.mean(dim=(0, 2, 3, 4))
    ch_std = z_mean.std(dim=(0, 2, 3, 4)).clamp_min(1e-3)
    # posterior noise relative to the latent spread: small means 'sample' ~ 'mean'
    w.info["posterior_std_ratio"] = float((z_std.mean(dim=(0, 2, 3, 4)) / ch_std).mean())
    ch_mean, ch_std = ch_mean.cpu(), ch_std.cpu()
    if d.posterior == "mean":
        z_std = torch.zeros_like(z_std)
    if st.steps:
        vae.register_to_config(latents_mean=ch_mean.tolist(), latents_std=ch_std.tolist())
    else:
        ch_mean = torch.tensor(vae.config.latents_mean)
        ch_std = torch.tensor(vae.config.latents_std)
    w.info["encode_minutes"] = (time.time() - w.started) / 60
    log.info(
        "vae psnr %.2f dB, reconstructions score %.3f, posterior std ratio %.3f; %d clips encoded",
        w.info["vae_psnr"], w.info["vae_summary"], w.info["posterior_std_ratio"], len(captions),
    )  # fmt: skip
    shape = (1, -1, 1, 1, 1)
    return CachedLatents(
        captions, z_mean, z_std, ch_mean.view(shape).to(dev), ch_std.view(shape).to(dev)
    )


def flow_loss(w: Worker, lat: CachedLatents) -> torch.Tensor:
    """Rectified flow on one batch of cached clips (METHOD.md section 1): a posterior sample,
    normalised; x_s = (1 - s) x0 + s eps, s from the preset's shifted grid (section 2),
    target v = eps - x0; ``data.empty_prompt_prob`` of the prompts empty."""
    st, dev, rng, dgen = w.st, w.dev, w.rng, w.dgen
    idx = rng.integers(0, len(lat.captions), st.batch)
    rows = torch.from_numpy(idx).to(dev)
    std = lat.z_std[rows]
    z = lat.z_mean[rows] + std * torch.randn(std.shape, generator=dgen, device=dev)
    x0 = (z - lat.norm_mean) / lat.norm_std  # (B, C, T, h, w)
    drop = w.cfg.data.empty_prompt_prob
    prompts = ["" if rng.random() < drop else lat.captions[i] for i in idx]
    cond = w.bundle.encode_text(prompts, grad=True)
    u = torch.rand(st.batch, generator=dgen, device=dev)
    sigma = shifted(u, w.cfg.method.shift)
    eps = torch.randn(x0.shape, generator=dgen, device=dev)
    s = sigma.view(-1, 1, 1, 1, 1)
    xs = (1 - s) * x0 + s * eps
    v = w.bundle.transformer(
        xs, timestep=1000.0 * sigma, encoder_hidden_states=cond.text, return_dict=False
    )[0]
    return (v.float() - (eps - x0)).pow(2).mean()


def fit_flow(w: Worker, lat: CachedLatents) -> FlowProgress:
    """Phase 4: the transformer and the text encoder jointly on ``flow_loss``, EMA weights
    kept; a bundle checkpoint every ``checkpoint_minutes``."""
    st = w.st
    transformer, text_encoder = w.bundle.transformer, w.bundle.text_encoder
    transformer.train().requires_grad_(True)
    text_encoder.train().requires_grad_(True)
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=st.lr, betas=(0.9, 0.99), weight_decay=1e-4)
    flow = FlowProgress(Ema([transformer, text_encoder], st.ema))
    last_ckpt = time.time()
    while flow.step < st.steps:
        minutes = (time.time() - flow.started) / 60
        if st.minutes and minutes >= st.minutes:
            break
        progress = max(flow.step / st.steps, minutes / st.minutes if st.minutes else 0.0)
        loss = flow_loss(w, lat)
        for g in opt.param_groups:
            g["lr"] = st.lr * _lr_factor(flow.step, progress, st.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        flow.ema.update()
        flow.losses.append(loss.detach())
        flow.step += 1
        if flow.step % st.log_every == 0:
            recent = torch.stack(flow.losses[-st.log_every :]).mean()
            log.info("flow %d loss %.4f %.1f min", flow.step, recent, minutes)
        if st.checkpoint_minutes and time.time() - last_ckpt > 60 * st.checkpoint_minutes:
            save_bundle(w, flow, f"step{flow.step}")
            last_ckpt = time.time()
    return flow


def save_bundle(w: Worker, flow: FlowProgress, tag: str) -> None:
    """Phase 5: the bundle (EMA weights of the transformer and text encoder) with its
    pretrain.json, reported as a Ray Train checkpoint."""
    import ray.train

    out = w.work / tag
    shutil.copytree(w.base, out, dirs_exist_ok=True)
    with flow.ema.applied():
        w.bundle.transformer.save_pretrained(out / "transformer", max_shard_size=SHARD)
        w.bundle.text_encoder.save_pretrained(out / "text_encoder")
    w.bundle.vae.save_pretrained(out / "vae", max_shard_size=SHARD)
    w.info.update(
        steps=flow.step,
        flow_minutes=(time.time() - flow.started) / 60,
        total_minutes=(time.time() - w.started) / 60,
        loss=float(torch.stack(flow.losses[-100:]).mean()) if flow.losses else None,
    )
    (out / "pretrain.json").write_text(json.dumps(w.info, indent=2) + "\n")
    metrics = {"phase": "flow", "step": flow.step, "loss": w.info["loss"] or 0.0}
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(out)))
    shutil.rmtree(out, ignore_errors=True)


def pretrain_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: the pretraining phases in order, reporting bundle checkpoints."""
    if not logging.getLogger().handlers:  # INFO lines on the worker's stderr (Ray forwards it)
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    w = start_worker(config)
    st, d = w.st, w.cfg.data
    if st.vae_steps and not st.init:
        init_vae_logvar(w)
    w.info["vae_steps_done"] = fit_vae(w, "vae", st.vae_steps, st.vae_minutes, st.vae_frames, False)
    # the decoder alone on clips of the preset's length. The causal VAE decodes a clip
    # chunk by chunk with cached features; trained on short clips it has never seen a
    # steady-state chunk and garbles later frames. The encoder stays frozen, so latents
    # (and a transformer trained on them) stay valid.
    w.info["decoder_steps_done"] = fit_vae(
        w, "decoder", st.decoder_steps, st.decoder_minutes, d.num_frames, True
    )
    latents = encode_clips(w)
    flow = fit_flow(w, latents)
    save_bundle(w, flow, "final")
    shutil.rmtree(w.work, ignore_errors=True)


# ---------------------------------------------------------------- the driver
def located(settings: PretrainSettings) -> PretrainSettings:
    """``settings`` with a local ``--init`` made absolute; a missing one is a BundleError now.

    Ray Train runs the worker in a working directory of its own, where a relative path
    names nothing; checking here fails before Ray starts. ``bundled:`` names and hub ids
    are kept as given (they are recorded in pretrain.json).
    """
    from dcm.bundle import resolve_model_path

    if not settings.init or settings.init.startswith("bundled:"):
        return settings
    path = resolve_model_path(settings.init)  # hub ids come back relative, unchanged
    return dataclasses.replace(settings, init=str(path)) if path.is_absolute() else settings


def run_pretrain(
    cfg: Config, settings: PretrainSettings, out: str | Path, workdir: str | Path
) -> Path:
    """Fit the pretraining on Ray Train and copy the final bundle to ``out``."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.cluster import init_ray

    given_init = settings.init  # recorded as given, not as this machine's absolute path
    settings = located(settings)
    init_ray(cfg.ray, quiet=True)
    use_gpu = cfg.train.use_gpu is True or (
        cfg.train.use_gpu == "auto" and torch.cuda.is_available()
    )
    trainer = TorchTrainer(
        pretrain_worker,  # pretrain_loop, by way of a module the controller imports cheaply
        train_loop_config={"cfg": cfg.to_dict(), "settings": dataclasses.asdict(settings)},
        scaling_config=ScalingConfig(
            num_workers=1,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=f"pretrain-{int(time.time())}", storage_path=str(Path(workdir).resolve())
        ),
    )
    started = time.time()
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"pretraining ended without a checkpoint: {result.error}")
    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(result.checkpoint.to_directory(tmp))
        info = json.loads((folder / "pretrain.json").read_text())
        info["wall_minutes"] = (time.time() - started) / 60
        info["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}"
        info["command"] = "python -m pipelines.pretrain " + " ".join(sys.argv[1:])
        info["settings"]["init"] = given_init
        (folder / "pretrain.json").write_text(json.dumps(info, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(folder, out)
    return out


def evaluate_teacher(cfg: Config, settings: PretrainSettings, bundle: str | Path) -> dict[str, Any]:
    """Score the teacher (sample.teacher_steps Euler steps + CFG) on held-out captions.

    One entry per CFG scale of ``settings.eval_cfg``; recorded in the bundle's pretrain.json.
    """
    from dcm.evaluation import evaluate
    from dcm.generate import VideoGenerator
    from dcm.shapes.grammar import all_captions

    torch.set_num_threads(settings.threads)
    device = "cuda" if cfg.train.use_gpu is not False and torch.cuda.is_available() else "cpu"
    prompts = all_captions("heldout")[: settings.eval_prompts]
    scales = [float(w) for w in settings.eval_cfg.split(",") if w.strip()]
    results: dict[str, Any] = {"prompts": len(prompts), "seeds": list(cfg.sample.seeds)}
    for w in scales or [cfg.method.cfg_scale]:
        c = cfg.replace(**{"method.cfg_scale": w})
        gen = VideoGenerator.load(str(bundle), device=device, cfg=c)
        res = evaluate(gen, prompts, cfg.sample.seeds, [], c.sample.teacher_steps)
        row = res["methods"][f"teacher@{c.sample.teacher_steps}"]
        results[f"cfg_{w:g}"] = {k: v for k, v in row.items() if k != "samples"}
        log.info("held-out teacher, cfg %g: summary %.3f", w, row["summary"])
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.pretrain", description="Train the tiny shapes teacher bundle."
    )
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="bundle folder to write")
    parser.add_argument("--workdir", default="runs/pretrain", help="Ray Train storage folder")
    parser.add_argument(
        "--evaluate-only",
        action="store_true",
        help="do not train: score the bundle at --out and update its pretrain.json",
    )
    for f in dataclasses.fields(PretrainSettings):
        parser.add_argument(
            f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default
        )
    return add_common(parser)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = resolve(args)
    names = [f.name for f in dataclasses.fields(PretrainSettings)]
    settings = PretrainSettings(**{n: getattr(args, n) for n in names})
    out = Path(args.out)
    if not args.evaluate_only:
        out = run_pretrain(cfg, settings, out, args.workdir)
    info_file = out / "pretrain.json"
    if not info_file.is_file():
        raise ConfigError(f"'{info_file}' is missing: --out must be a bundle written by pretrain")
    info = json.loads(info_file.read_text())
    if settings.eval_prompts:
        info["heldout_eval"] = evaluate_teacher(cfg, settings, out)
        info_file.write_text(json.dumps(info, indent=2) + "\n")
    print(
        f"[pretrain] bundle in {out}: VAE PSNR {info['vae_psnr']:.2f} dB, {info['steps']} flow "
        f"steps, {info['wall_minutes']:.1f} min"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
