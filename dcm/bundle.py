"""Load a diffusers-format model folder into a ``Bundle``: the one loading path for every model.

A bundle folder (DESIGN.md point 10) holds ``model_index.json`` and one sub-folder per
component. The same code loads the bundled tiny shapes teacher, a local Wan2.1 folder and
(only when asked for by hub id) a hub repository. Latent normalisation lives here and only
here (METHOD.md section 1): raw VAE latents are stored; the transformer sees normalised ones.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dcm.backbones.base import Cond
from dcm.config import ConfigError, ModelConfig

_SHAPES = Path(__file__).parent / "shapes"
# Models shipped inside the package: the shapes teacher (a diffusers folder) and the student
# distilled from it by `dcm distill` (an artifact whose base model is 'bundled:shapes').
BUNDLED = {"shapes": _SHAPES / "bundle", "shapes-dcm": _SHAPES / "student"}
# name -> (the file a built model has, the command that builds it)
_BUILT = {
    "shapes": ("model_index.json", "python -m pipelines.pretrain"),
    "shapes-dcm": ("dcm_artifact.json", "make student"),
}
# What generate and Serve use when no model is given (pipelines/args.default_model).
DEFAULT_TEACHER = "bundled:shapes"
DEFAULT_STUDENT = "bundled:shapes-dcm"
COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer")
# Transformer class in model_index.json -> backbone kind.
KINDS = {"WanTransformer3DModel": "wan", "HunyuanVideoTransformer3DModel": "hunyuanvideo"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class BundleError(ConfigError):
    """A model folder is missing, incomplete or malformed; the message names the file."""


# ---------------------------------------------------------------- locating a bundle
def is_hub_id(path: str) -> bool:
    """'owner/name' that is not an existing local path: the only case that may download."""
    return bool(_HUB_ID.match(path)) and not Path(path).expanduser().exists()


def resolve_model_path(path: str | Path) -> Path:
    """'bundled:<name>' -> the folder inside the package; a local folder -> its absolute path.

    A hub id ('owner/name', not an existing path) comes back unchanged as a relative Path;
    ``load_bundle`` passes it to ``from_pretrained`` (the only place that downloads).
    """
    text = str(path)
    if text.startswith("bundled:"):
        name = text.split(":", 1)[1]
        if name not in BUNDLED:
            raise BundleError(
                f"model '{text}' is unknown: bundled models are "
                + ", ".join(f"'bundled:{n}'" for n in BUNDLED)
            )
        folder = BUNDLED[name]
        marker, how = _BUILT[name]
        if not (folder / marker).is_file():
            raise BundleError(
                f"the bundled model '{text}' is not built yet ({folder} has no {marker}): "
                f"run `{how}` or pass --model PATH"
            )
        return folder
    if is_hub_id(text):
        return Path(text)
    local = Path(text).expanduser()
    if not local.exists():
        raise BundleError(
            f"model path '{text}' does not exist: pass a diffusers-format folder, a distilled "
            "artifact folder, 'bundled:shapes' or a hub id 'owner/name'"
        )
    return local.resolve()


def _read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise BundleError(f"'{file}' is missing: the bundle folder is incomplete")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(
            f"'{file}' is not valid JSON ({err}): rebuild or re-download the bundle"
        ) from None
    if not isinstance(data, dict):
        raise BundleError(f"'{file}' must hold a JSON object")
    return data


def _hub_json(repo: str, filename: str) -> dict[str, Any]:
    from huggingface_hub import hf_hub_download

    try:
        local = hf_hub_download(repo, filename)
    except Exception as err:  # noqa: BLE001 - offline, unknown repo, auth: one sentence
        raise BundleError(
            f"could not fetch {filename} of hub model '{repo}' ({type(err).__name__}): check the "
            "id and network access, or download it where there is network and pass its folder "
            "with --model (model.path)"
        ) from None
    return _read_json(Path(local))


def read_model_index(root: Path) -> dict[str, Any]:
    """model_index.json of a local folder or hub id, with a clear error for artifacts."""
    if root.is_absolute() or root.exists():
        if (root / "dcm_artifact.json").is_file() and not (root / "model_index.json").is_file():
            raise BundleError(
                f"'{root}' is a distilled artifact, not a model bundle: load it with "
                "VideoGenerator.load or use the bundle_path in its dcm_artifact.json"
            )
        return _read_json(root / "model_index.json")
    return _hub_json(str(root), "model_index.json")


def component_config(root: Path, name: str) -> dict[str, Any]:
    """A component's config.json (diffusers models) from a folder or hub id."""
    if root.is_absolute() or root.exists():
        return _read_json(root / name / "config.json")
    return _hub_json(str(root), f"{name}/config.json")


# ---------------------------------------------------------------- the bundle
@dataclass
class Bundle:
    """Transformer, VAE, text encoder and tokenizer of one model, plus its latent convention."""

    path: Path
    backbone_kind: str  # "wan" | "hunyuanvideo"
    transformer: Any | None
    vae: Any | None
    text_encoder: Any | None
    tokenizer: Any | None
    vae_config: dict[str, Any]
    transformer_config: dict[str, Any]
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    text_max_length: int = ModelConfig.text_max_length
    # HunyuanVideo only: CLIP text encoder + tokenizer (the pooled text)
    text_encoder_2: Any | None = None
    tokenizer_2: Any | None = None
    _null: Cond | None = field(default=None, repr=False)

    # ------------------------------------------------------------ geometry
    @property
    def latent_channels(self) -> int:
        c = self.vae_config
        return int(c["z_dim"] if self.backbone_kind == "wan" else c["latent_channels"])

    @property
    def spatial_factor(self) -> int:
        c = self.vae_config
        if self.backbone_kind == "wan":
            return int(c.get("scale_factor_spatial") or 2 ** (len(c.get("dim_mult", [1] * 4)) - 1))
        return int(c.get("spatial_compression_ratio", 8))

    @property
    def temporal_factor(self) -> int:
        c = self.vae_config
        if self.backbone_kind == "wan":
            return int(c.get("scale_factor_temporal") or 2 ** sum(c.get("temperal_downsample", [])))
        return int(c.get("temporal_compression_ratio", 4))

    @property
    def patch_size(self) -> tuple[int, int, int]:
        c = self.transformer_config
        if self.backbone_kind == "wan":
            return tuple(int(p) for p in c.get("patch_size", (1, 2, 2)))  # type: ignore[return-value]
        return (
            int(c.get("patch_size_t", 1)),
            int(c.get("patch_size", 2)),
            int(c.get("patch_size", 2)),
        )

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, T, h, w) of the latents of a (num_frames, height, width) video."""
        tf, sf = self.temporal_factor, self.spatial_factor
        return (self.latent_channels, (num_frames - 1) // tf + 1, height // sf, width // sf)

    # ------------------------------------------------------------ text
    @property
    def pooled_dim(self) -> int:
        """Width P of the pooled text (HunyuanVideo's CLIP), 0 for Wan."""
        if self.backbone_kind == "wan":
            return 0
        return int(self.transformer_config.get("pooled_projection_dim", 768))

    def encode_text(self, prompts: list[str], grad: bool = False) -> Cond:
        """Prompts -> Cond(text (B, L, D), mask (B, L)[, pooled (B, P)]), L = text_max_length.

        ``grad=True`` keeps the graph (pretraining trains the text encoder with this same
        encoding); otherwise no gradients are recorded.
        """
        with torch.set_grad_enabled(grad):
            return self._encode_text(prompts)

    def _encode_text(self, prompts: list[str]) -> Cond:
        """The encoding itself (``encode_text``).

        Wan: UMT5 states, zero past each prompt (as ``WanPipeline``). HunyuanVideo: exactly
        ``HunyuanVideoPipeline.encode_prompt``: the Llama states of the third-last layer for
        the prompt inside diffusers' prompt template, the template tokens cropped off, plus
        CLIP's pooled output.
        """
        if self.text_encoder is None or self.tokenizer is None:
            raise BundleError(
                f"bundle '{self.path}' was loaded without a text encoder/tokenizer: load it with "
                "components including 'text_encoder'"
            )
        if isinstance(prompts, str):
            prompts = [prompts]
        if self.backbone_kind == "hunyuanvideo":
            return self._encode_hunyuan(list(prompts))
        tok = self.tokenizer(
            [p.strip() for p in prompts],
            padding="max_length",
            max_length=self.text_max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids = tok.input_ids.to(self.device)  # (B, L)
        mask = tok.attention_mask.to(self.device)  # (B, L), 1 = real token
        hidden = self.text_encoder(ids, mask).last_hidden_state  # (B, L, D)
        # As the Wan pipeline does: states past each prompt's length are exactly zero.
        hidden = hidden * mask.unsqueeze(-1).to(hidden.dtype)
        return Cond(text=hidden.to(self.dtype), mask=mask.long())

    def _encode_hunyuan(self, prompts: list[str]) -> Cond:
        from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import (
            DEFAULT_PROMPT_TEMPLATE,
        )

        if self.text_encoder_2 is None or self.tokenizer_2 is None:
            raise BundleError(
                f"bundle '{self.path}' has no text_encoder_2/tokenizer_2 (CLIP): a HunyuanVideo "
                "bundle needs both for the pooled text"
            )
        template = DEFAULT_PROMPT_TEMPLATE["template"]
        crop = int(DEFAULT_PROMPT_TEMPLATE["crop_start"])  # template tokens before the prompt
        tok = self.tokenizer(
            [template.format(p) for p in prompts],
            padding="max_length",
            max_length=self.text_max_length + crop,
            truncation=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids, mask = tok.input_ids.to(self.device), tok.attention_mask.to(self.device)
        out = self.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        hidden = out.hidden_states[-3][:, crop:]  # (B, L, D): skip the last two layers
        clip_ids = self.tokenizer_2(
            prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)
        pooled = self.text_encoder_2(clip_ids, output_hidden_states=False).pooler_output  # (B, P)
        return Cond(
            text=hidden.to(self.dtype), mask=mask[:, crop:].long(), pooled=pooled.to(self.dtype)
        )

    def null_cond(self, batch: int = 1) -> Cond:
        """The empty prompt's conditioning (computed once, cached), repeated to ``batch`` rows."""
        if self._null is None:
            self._null = self.encode_text([""])
        return self._null.index(torch.zeros(batch, dtype=torch.long, device=self.device))

    # ------------------------------------------------------------ latents
    def _latent_stats(self, z: Tensor) -> tuple[Tensor, Tensor]:
        # channels are dim -4 of both (B, C, T, H, W) batches and (C, T, H, W) latent rows
        shape = (self.latent_channels, 1, 1, 1)
        mean = torch.tensor(self.vae_config["latents_mean"], dtype=torch.float32).view(shape)
        std = torch.tensor(self.vae_config["latents_std"], dtype=torch.float32).view(shape)
        return mean.to(z.device, z.dtype), std.to(z.device, z.dtype)

    def normalize(self, z: Tensor) -> Tensor:
        """RAW VAE latents -> what the transformer sees (METHOD.md section 1)."""
        if self.backbone_kind == "wan":
            mean, std = self._latent_stats(z)
            return (z - mean) / std
        return z * float(self.vae_config["scaling_factor"])

    def denormalize(self, z: Tensor) -> Tensor:
        """Inverse of ``normalize``: transformer latents -> RAW VAE latents."""
        if self.backbone_kind == "wan":
            mean, std = self._latent_stats(z)
            return z * std + mean
        return z / float(self.vae_config["scaling_factor"])

    def _need_vae(self) -> Any:
        if self.vae is None:
            raise BundleError(
                f"bundle '{self.path}' was loaded without its VAE: load it with components "
                "including 'vae'"
            )
        return self.vae

    @torch.no_grad()
    def encode_video(
        self, pixels: Tensor, posterior: str = "sample", generator: torch.Generator | None = None
    ) -> Tensor:
        """pixels (B, 3, F, H, W) in [-1, 1] -> RAW latents (B, C, T, h, w).

        ``posterior`` 'sample' draws from the VAE posterior with ``generator`` (the reference
        does this, METHOD.md section 8); 'mean' takes its mean (deterministic).
        """
        if posterior not in ("sample", "mean"):
            raise ConfigError(f"posterior={posterior!r} is not allowed: choose 'sample' or 'mean'")
        vae = self._need_vae()
        x = pixels.to(self.device, next(vae.parameters()).dtype)
        dist = vae.encode(x).latent_dist
        z = dist.mean if posterior == "mean" else dist.sample(generator=generator)
        return z.float()

    @torch.no_grad()
    def decode(self, z_normalised: Tensor) -> Tensor:
        """Normalised latents (B, C, T, h, w) -> pixels (B, 3, F, H, W) in [-1, 1] (float32).

        Tiling was enabled at load where the VAE supports it; the VAE only tiles inputs
        larger than its tile size, so small videos decode in one pass.
        """
        vae = self._need_vae()
        z = self.denormalize(z_normalised.float()).to(self.device, next(vae.parameters()).dtype)
        return vae.decode(z).sample.float().clamp(-1.0, 1.0)


# ---------------------------------------------------------------- loading
def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__).rstrip(" :,")


def _component_class(index: dict[str, Any], name: str, file: str) -> type:
    entry = index.get(name)
    if not isinstance(entry, (list, tuple)) or len(entry) != 2 or entry[1] is None:
        raise BundleError(f"'{file}' does not list a '{name}' component: the bundle is incomplete")
    library, cls_name = entry
    import diffusers
    import transformers

    module = {"diffusers": diffusers, "transformers": transformers}.get(library)
    cls = getattr(module, cls_name, None) if module is not None else None
    if cls is None:
        raise BundleError(
            f"'{file}' names {library}.{cls_name} for '{name}', which is not available"
        )
    return cls


def _load_tokenizer(root: Path, name: str, local: bool) -> Any:
    from transformers import AutoTokenizer

    if local and not (root / name).is_dir():
        raise BundleError(f"'{root / name}' is missing: the bundle folder is incomplete")
    try:
        return AutoTokenizer.from_pretrained(str(root), subfolder=name)
    except Exception as err:  # noqa: BLE001
        raise BundleError(
            f"could not load the tokenizer in '{root / name}': {_first_line(err)}"
        ) from None


def load_bundle(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    components: tuple[str, ...] | list[str] | None = None,
    text_max_length: int | None = None,
) -> Bundle:
    """Load the components of a diffusers-format bundle (all by default) onto ``device``.

    ``components`` picks a subset of transformer, vae, text_encoder, tokenizer (the text
    encoder brings its tokenizer). The VAE and text encoder are frozen and in eval mode;
    the transformer is left as loaded (training code decides what trains).
    """
    wanted = set(COMPONENTS if components is None else components)
    bad = sorted(wanted - set(COMPONENTS))
    if bad:
        raise ConfigError(f"components {bad} are unknown: choose from {', '.join(COMPONENTS)}")
    if "text_encoder" in wanted:
        wanted.add("tokenizer")
    root = resolve_model_path(path)
    local = root.is_absolute() or root.exists()
    index_file = f"{root}/model_index.json"
    index = read_model_index(root)
    tcls = index.get("transformer", [None, None])
    kind = KINDS.get(tcls[1] if isinstance(tcls, (list, tuple)) and len(tcls) == 2 else None)
    if kind is None:
        raise BundleError(
            f"'{index_file}' names transformer {tcls!r}: supported are {', '.join(KINDS)}"
        )
    device = torch.device(device)
    loaded: dict[str, Any] = {}
    names = ["transformer", "vae", "text_encoder"]
    if kind == "hunyuanvideo" and "text_encoder" in wanted:
        names.append("text_encoder_2")  # CLIP: the pooled text comes with the text encoder
        wanted.add("text_encoder_2")
    for name in names:
        if name not in wanted:
            continue
        cls = _component_class(index, name, index_file)
        if local:
            # Check the folder ourselves so a broken bundle names the file, not a traceback.
            _read_json(root / name / "config.json")
        try:
            model = cls.from_pretrained(str(root), subfolder=name, torch_dtype=dtype)
        except Exception as err:  # noqa: BLE001 - corrupt weights etc.: one sentence, no trace
            raise BundleError(
                f"could not load '{root / name}' as {cls.__name__}: {_first_line(err)}"
            ) from None
        model = model.to(device)
        if name != "transformer":
            model.eval().requires_grad_(False)
        loaded[name] = model
    for tok_name in ("tokenizer", "tokenizer_2"):
        if tok_name == "tokenizer_2" and "text_encoder_2" not in wanted:
            continue
        if "tokenizer" in wanted and tok_name in index:
            loaded[tok_name] = _load_tokenizer(root, tok_name, local)
    vae = loaded.get("vae")
    if vae is not None and hasattr(vae, "enable_tiling"):
        vae.enable_tiling()
    vae_config = dict(vae.config) if vae is not None else component_config(root, "vae")
    tr = loaded.get("transformer")
    tr_config = dict(tr.config) if tr is not None else component_config(root, "transformer")
    if kind == "wan":
        for key in ("latents_mean", "latents_std"):
            values = vae_config.get(key)
            if not isinstance(values, list) or len(values) != vae_config.get("z_dim"):
                raise BundleError(
                    f"'{root / 'vae' / 'config.json'}' needs '{key}' with z_dim="
                    f"{vae_config.get('z_dim')} values (Wan latent normalisation)"
                )
    elif "scaling_factor" not in vae_config:
        raise BundleError(f"'{root / 'vae' / 'config.json'}' needs 'scaling_factor'")
    return Bundle(
        path=root,
        backbone_kind=kind,
        transformer=tr,
        vae=vae,
        text_encoder=loaded.get("text_encoder"),
        tokenizer=loaded.get("tokenizer"),
        text_encoder_2=loaded.get("text_encoder_2"),
        tokenizer_2=loaded.get("tokenizer_2"),
        vae_config=vae_config,
        transformer_config=tr_config,
        device=device,
        dtype=dtype,
        text_max_length=text_max_length or ModelConfig.text_max_length,
    )
