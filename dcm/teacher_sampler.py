"""The teacher's own sampler: the baseline every teacher-vs-DCM comparison runs against.

A diffusers model folder names how its model is meant to be sampled in
``scheduler/scheduler_config.json`` (Wan2.1-Diffusers: ``UniPCMultistepScheduler`` with flow
sigmas and ``flow_shift`` 3; HunyuanVideo: ``FlowMatchEulerDiscreteScheduler`` shift 7). The
distillation grid (shift 17, METHOD.md section 2) packs 16 of 50 steps above sigma 0.975, so
sampling the teacher on it weakens the baseline; this module samples it the way the stock
diffusers pipeline does instead:

- the sigma list and the model's time inputs come from the scheduler class itself
  (``from_config`` + ``set_timesteps(n)``), so they equal the folder's scheduler exactly;
- a plain flow-matching Euler scheduler runs through ``dcm.sampler.teacher_sample`` (the one
  pure sampler) on that sigma list; any other solver (UniPC, DPM-Solver) runs its own
  ``step`` rule on the guided velocity (``dcm.guidance.teacher_velocity``);
- a folder without ``scheduler/`` falls back to Euler on the distillation grid, and the
  description says so.

``describe(n, method)`` names the sampler for every table, e.g.
"teacher, FlowMatchEuler shift 3.0, 50 steps + CFG w=5".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dcm.config import ConfigError, MethodConfig
from dcm.guidance import teacher_velocity
from dcm.sampler import teacher_sample
from dcm.schedule import Schedule

SCHEDULER_JSON = Path("scheduler") / "scheduler_config.json"
EULER = "FlowMatchEulerDiscreteScheduler"


@dataclass(frozen=True)
class TeacherSampler:
    """How the teacher is sampled: a diffusers scheduler config, or the distillation grid.

    config: the scheduler's ``scheduler_config.json`` (``_class_name`` included), or ``{}``
    for the grid fallback; grid: the distillation ``Schedule`` (used only by the fallback);
    source: where the config came from (for logs).
    """

    config: dict[str, Any] = field(default_factory=dict)
    grid: Schedule | None = None
    source: str = ""

    # ------------------------------------------------------------ construction
    @classmethod
    def from_bundle(cls, path: str | Path, grid: Schedule | None = None) -> TeacherSampler:
        """The sampler of the model folder ``path`` ('bundled:shapes' and hub ids allowed).

        Without ``scheduler/scheduler_config.json`` (and a ``grid`` given) the teacher is
        sampled with Euler on ``grid``; without either, a ConfigError names the file.
        """
        from dcm.bundle import is_hub_id, resolve_model_path

        root = resolve_model_path(path)
        file = root / SCHEDULER_JSON
        config: dict[str, Any] | None = None
        if file.is_file():
            try:
                config = json.loads(file.read_text())
            except json.JSONDecodeError as err:
                raise ConfigError(f"'{file}' is not valid JSON ({err}): fix or remove it") from None
        elif is_hub_id(str(path)):
            config = _hub_config(str(path))
        if config is None:
            if grid is None:
                raise ConfigError(
                    f"'{file}' does not exist: the model folder needs its scheduler/ to sample "
                    "the teacher the way its pipeline does"
                )
            return cls({}, grid, source="distillation grid (no scheduler/ in the model folder)")
        sampler = cls(dict(config), grid, source=str(file))
        sampler.scheduler(2)  # fail now, with the file named, on a config we cannot use
        return sampler

    # ------------------------------------------------------------ the schedule
    @property
    def class_name(self) -> str:
        return str(self.config.get("_class_name", "")) if self.config else ""

    def scheduler(self, steps: int) -> Any:
        """A fresh diffusers scheduler (they keep per-run state) set to ``steps`` steps."""
        if not self.config:
            raise ConfigError("this teacher sampler has no scheduler config (grid fallback)")
        import diffusers

        name = self.class_name
        klass = getattr(diffusers, name, None) if name else None
        if klass is None or not hasattr(klass, "set_timesteps"):
            raise ConfigError(
                f"'{self.source}': _class_name '{name}' is not a diffusers scheduler: "
                "use the scheduler config the model was released with"
            )
        if self.config.get("use_dynamic_shifting"):
            raise ConfigError(
                f"'{self.source}' uses use_dynamic_shifting, which needs an image-size "
                "dependent mu that video pipelines do not pass: set it to false"
            )
        sched = klass.from_config(self.config)
        try:
            sched.set_timesteps(int(steps))
        except (ValueError, TypeError) as err:
            raise ConfigError(f"'{self.source}': set_timesteps({steps}) failed: {err}") from None
        return sched

    def sigmas(self, steps: int) -> list[float]:
        """Descending sigma list of ``steps`` steps ending with the final sigma (0 for the
        stock Wan/HunyuanVideo schedulers), exactly the scheduler's ``sigmas``."""
        _check_steps(steps)
        if not self.config:
            return self.grid.teacher_sigmas(int(steps))
        return [float(s) for s in self.scheduler(steps).sigmas]

    def timesteps(self, steps: int) -> list[float]:
        """The model's time input at each step (the scheduler's ``timesteps``)."""
        _check_steps(steps)
        if not self.config:
            return [1000.0 * s for s in self.sigmas(steps)[:-1]]
        return [float(t) for t in self.scheduler(steps).timesteps]

    def plain_euler(self, steps: int) -> bool:
        """True when the scheduler's step is Euler at t = 1000 sigma (dcm.sampler applies)."""
        if not self.config:
            return True
        if self.class_name != EULER or self.config.get("stochastic_sampling"):
            return False
        sched = self.scheduler(steps)
        expected = sched.sigmas[:-1].float() * 1000.0
        return bool(torch.equal(sched.timesteps.float(), expected)) and float(sched.sigmas[-1]) == 0

    # ------------------------------------------------------------ sampling
    @staticmethod
    def nfe(steps: int, method: MethodConfig) -> int:
        """Network evaluations of a guided teacher run (CFG: two per step)."""
        return int(steps) * (2 if method.guidance == "cfg" else 1)

    def describe(self, steps: int, method: MethodConfig) -> str:
        """The sampler in words for tables, e.g. 'teacher, UniPCMultistep flow_shift 3.0,
        50 steps + CFG w=5'."""
        if method.guidance == "cfg":
            guide = f"CFG w={method.cfg_scale:g}"
        else:
            guide = f"embedded guidance {method.embedded_guidance:g}"
        if not self.config:
            solver = f"Euler on the distillation grid shift {self.grid.shift:g}"
        else:
            name = self.class_name.replace("Scheduler", "").replace("Discrete", "")
            key = "flow_shift" if "flow_shift" in self.config else "shift"
            shift = self.config.get(key)
            solver = f"{name} {key} {float(shift):.1f}" if shift is not None else name
        return f"teacher, {solver}, {int(steps)} steps + {guide}"

    @torch.no_grad()
    def sample(
        self,
        teacher: Any,
        noise: Tensor,
        cond: Any,
        null_cond: Any,
        steps: int,
        method: MethodConfig,
    ) -> Tensor:
        """Guided teacher sample from ``noise`` (B, C, T, H, W) at the first sigma: float32
        normalised latents at the final sigma. ``teacher(x, t, cond)`` -> velocity."""
        _check_steps(steps)
        if self.plain_euler(steps):
            return teacher_sample(teacher, noise, cond, null_cond, self.sigmas(steps), method)
        sched = self.scheduler(steps)
        x = noise.float()
        bsz = x.shape[0]
        for t in sched.timesteps:
            tt = torch.full((bsz,), float(t), dtype=torch.float32, device=x.device)
            v = teacher_velocity(teacher, x, tt, cond, null_cond, method).float()
            x = sched.step(v, t, x, return_dict=False)[0].float()
        return x


def _check_steps(steps: int) -> None:
    if int(steps) < 1:
        raise ConfigError(f"sample.teacher_steps={steps} must be at least 1")


def _hub_config(repo: str) -> dict[str, Any] | None:
    """A hub model's scheduler config from the local Hugging Face cache (never downloads)."""
    try:
        from huggingface_hub import hf_hub_download

        file = hf_hub_download(repo, str(SCHEDULER_JSON), local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached: the caller falls back or names the file
        return None
    return json.loads(Path(file).read_text())
