"""The MLflow ``pyfunc`` flavour of a distilled model: prompts in, uint8 videos out.

The logged model's one artifact, ``model``, is the exported diffusers folder
(``dcm.export.export_diffusers``), so the registered model is also a plain diffusers
pipeline. ``predict`` runs ``dcm.generate.VideoGenerator`` on it:

    model = mlflow.pyfunc.load_model("models:/dcm-shapes/1")
    videos = model.predict(["a red circle moves left"], params={"steps": 4, "seed": 0})
    # uint8 (B, F, H, W, 3)

Inputs: a list of prompts, one prompt, a pandas DataFrame with a ``prompt`` column, or a
dict ``{"prompt": [...]}``. Params (all optional, 0 = the model's default): steps, seed,
num_frames, height, width.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import numpy as np

ARTIFACT_KEY = "model"
PARAMS = ("steps", "seed", "num_frames", "height", "width")


def prompts_of(model_input: Any) -> list[str]:
    """The prompt list of any accepted input; one sentence naming the problem otherwise."""
    from dcm.config import ConfigError

    data = model_input
    if hasattr(data, "columns"):  # pandas DataFrame
        if "prompt" not in data.columns:
            if len(data.columns) != 1:
                raise ConfigError("the input DataFrame needs a 'prompt' column")
            data = data[data.columns[0]]
        else:
            data = data["prompt"]
        data = data.tolist()
    elif isinstance(data, dict):
        if "prompt" not in data:
            raise ConfigError("the input dict needs a 'prompt' key with a prompt or a list")
        data = data["prompt"]
    if isinstance(data, str):
        data = [data]
    if isinstance(data, np.ndarray):
        data = data.reshape(-1).tolist()
    if not isinstance(data, (list, tuple)) or not all(isinstance(p, str) for p in data):
        raise ConfigError("the input must be prompts: a string, a list of strings or a DataFrame")
    return list(data)


def signature() -> Any:
    """Prompts (strings) in, uint8 videos (B, F, H, W, 3) out; params default to 0 = the
    model's own default (seed 0 is seed 0)."""
    from mlflow.models import infer_signature

    video = np.zeros((1, 1, 8, 8, 3), dtype=np.uint8)
    return infer_signature(["a prompt"], video, params=dict.fromkeys(PARAMS, 0))


class DCMVideoModel(mlflow.pyfunc.PythonModel):
    """Loads the exported folder once; ``predict`` returns uint8 videos (B, F, H, W, 3)."""

    def load_context(self, context: Any) -> None:
        import torch

        from dcm.generate import VideoGenerator

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.generator = VideoGenerator.load(context.artifacts[ARTIFACT_KEY], device=device)

    # No type hints here: MLflow would read them as an input schema; signature() is it.
    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        from dcm.config import ConfigError

        params = dict(params or {})
        unknown = sorted(set(params) - set(PARAMS))
        if unknown:
            raise ConfigError(f"unknown params {unknown}: allowed are {', '.join(PARAMS)}")
        gen = self.generator
        kw = {k: int(v) for k, v in params.items() if v not in (None, 0)}
        steps = kw.pop("steps", gen.cfg.sample.steps)
        return gen.generate(prompts_of(model_input), steps=steps, **kw)
