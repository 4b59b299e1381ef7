"""Prompt-agnostic video metrics from decoded pixels, written in torch.

Every function takes uint8 videos (F, H, W, 3) as numpy arrays (what ``VideoGenerator``
returns) and returns a float; none needs a caption grammar, so they score any model on any
prompt. Fidelity compares a video with the 50-step teacher's video of the same prompt and
seed (same noise):

- ``psnr``: 10 log10(1 / MSE) over all pixels in [0, 1] (capped at 100 dB for identical
  videos);
- ``ssim``: Wang et al. 2004 with an 11x11 Gaussian window (sigma 1.5), K1 0.01, K2 0.03,
  per RGB channel and frame, averaged ("valid" windows, no padding);
- ``Lpips``: LPIPS (Zhang et al. 2018) with the AlexNet trunk, only from weights the user
  gives (``--lpips PATH``); we never download them.

Quality of one video alone:

- ``temporal_flicker``: VBench's temporal-flickering formula, 1 - mean |f_t+1 - f_t| / 255
  (VBench applies it to static-camera videos; here to every video, so motion lowers it too);
- ``motion_smoothness``: 1 - mean |f_t - (f_t-1 + f_t+1) / 2| / 255, how well each inner
  frame is predicted from its neighbours (VBench uses a learned interpolator; we use the
  linear one, so it measures jitter, not motion);
- ``edge_sharpness``: RMS luminance gradient in grey levels per pixel (blur lowers it);
- ``ClipScore``: 100 x cosine between a transformers CLIP model's text embedding of the
  prompt and its image embeddings of up to 8 evenly spaced frames, averaged (CLIP-T).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dcm.config import ConfigError

PSNR_CAP = 100.0
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03
LUMA = (0.299, 0.587, 0.114)
CLIP_FRAMES = 8
# OpenAI CLIP preprocessing, used when the folder has no preprocessor_config.json
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _float(video: np.ndarray) -> Tensor:
    """uint8 (F, H, W, 3) -> float32 (F, 3, H, W) in [0, 1]."""
    v = np.asarray(video)
    if v.ndim != 4 or v.shape[-1] != 3 or v.dtype != np.uint8:
        raise ValueError(f"video must be uint8 (F, H, W, 3), got {v.dtype} {v.shape}")
    return torch.from_numpy(np.ascontiguousarray(v)).permute(0, 3, 1, 2).float() / 255.0


def _same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if np.shape(a) != np.shape(b):
        raise ValueError(f"videos differ in shape: {np.shape(a)} vs {np.shape(b)}")


# ---------------------------------------------------------------- fidelity
def psnr(video: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of ``video`` against ``reference`` (same shape)."""
    _same_shape(video, reference)
    mse = float((_float(video) - _float(reference)).pow(2).mean())
    return PSNR_CAP if mse <= 10 ** (-PSNR_CAP / 10) else 10.0 * float(np.log10(1.0 / mse))


def _gaussian(size: int, sigma: float) -> Tensor:
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2.0
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(video: np.ndarray, reference: np.ndarray) -> float:
    """Mean structural similarity over frames and RGB channels, in [-1, 1]."""
    _same_shape(video, reference)
    x, y = _float(video), _float(reference)  # (F, 3, H, W)
    size = min(SSIM_WINDOW, x.shape[-2], x.shape[-1])
    size -= 1 - size % 2  # odd
    g = _gaussian(size, SSIM_SIGMA * size / SSIM_WINDOW)
    win = (g[:, None] * g[None, :]).expand(3, 1, size, size).contiguous()  # depthwise

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, win, groups=3)

    c1, c2 = SSIM_K1**2, SSIM_K2**2
    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cov = blur(x * y) - mx * my
    num = (2 * mx * my + c1) * (2 * cov + c2)
    den = (mx * mx + my * my + c1) * (vx + vy + c2)
    return float((num / den).mean())


# ---------------------------------------------------------------- quality of one video
def temporal_flicker(video: np.ndarray) -> float:
    """1 - mean absolute change between consecutive frames / 255 (1 = no change)."""
    x = _float(video)
    if x.shape[0] < 2:
        return 1.0
    return 1.0 - float((x[1:] - x[:-1]).abs().mean())


def motion_smoothness(video: np.ndarray) -> float:
    """1 - mean |f_t - (f_t-1 + f_t+1) / 2| / 255 over inner frames (1 = perfectly linear)."""
    x = _float(video)
    if x.shape[0] < 3:
        return 1.0
    return 1.0 - float((x[1:-1] - 0.5 * (x[:-2] + x[2:])).abs().mean())


def edge_sharpness(video: np.ndarray) -> float:
    """RMS luminance gradient in grey levels (0-255) per pixel, over all frames."""
    x = _float(video) * 255.0
    lum = torch.einsum("fchw,c->fhw", x, torch.tensor(LUMA))
    gx = (lum[:, :, 1:] - lum[:, :, :-1]).pow(2).mean()
    gy = (lum[:, 1:, :] - lum[:, :-1, :]).pow(2).mean()
    return float(torch.sqrt(gx + gy))


def quality(video: np.ndarray) -> dict[str, float]:
    """The single-video quality metrics by name."""
    return {
        "temporal_flicker": temporal_flicker(video),
        "motion_smoothness": motion_smoothness(video),
        "edge_sharpness": edge_sharpness(video),
    }


def fidelity(video: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """PSNR and SSIM of ``video`` against the reference video of the same prompt and seed."""
    return {"psnr": psnr(video, reference), "ssim": ssim(video, reference)}


# ---------------------------------------------------------------- LPIPS (user's weights)
_ALEX = (
    (3, 64, 11, 4, 2),
    (64, 192, 5, 1, 2),
    (192, 384, 3, 1, 1),
    (384, 256, 3, 1, 1),
    (256, 256, 3, 1, 1),
)  # fmt: skip  (in, out, kernel, stride, padding)
_ALEX_INDEX = (0, 3, 6, 8, 10)  # torchvision alexnet.features indices of the convs
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)


class Lpips(nn.Module):
    """LPIPS-Alex distance (lower = closer), from a state dict the user provides.

    ``path``: a file (.pth/.pt/.safetensors) or a folder of such files whose tensors together
    hold the AlexNet trunk (``features.{0,3,6,8,10}.weight/bias``, torchvision names, an
    optional ``net.`` prefix allowed) and the five linear heads (``lin{0..4}.model.1.weight``,
    the ``lpips`` package's alex.pth).
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        super().__init__()
        state = _load_tensors(Path(path), "--lpips")
        self.convs = nn.ModuleList(nn.Conv2d(i, o, k, s, p) for i, o, k, s, p in _ALEX)
        self.lins = nn.ModuleList(nn.Conv2d(o, 1, 1, bias=False) for _, o, *_ in _ALEX)
        for n, (conv, lin) in enumerate(zip(self.convs, self.lins, strict=True)):
            idx = _ALEX_INDEX[n]
            conv.weight.data.copy_(_pick(state, f"features.{idx}.weight", path))
            conv.bias.data.copy_(_pick(state, f"features.{idx}.bias", path))
            lin.weight.data.copy_(_pick(state, f"lin{n}.model.1.weight", path))
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1))
        self.to(device).eval().requires_grad_(False)

    def _taps(self, x: Tensor) -> list[Tensor]:
        taps = []
        for n, conv in enumerate(self.convs):
            if n in (1, 2):  # max-pool before the 2nd and 3rd convs (alexnet.features)
                x = F.max_pool2d(x, 3, 2)
            x = F.relu(conv(x))
            taps.append(x)
        return taps

    @torch.no_grad()
    def forward(self, video: np.ndarray, reference: np.ndarray) -> float:
        """Mean LPIPS over frames of two uint8 videos (F, H, W, 3)."""
        _same_shape(video, reference)
        dev = self.shift.device
        a = (_float(video).to(dev) * 2 - 1 - self.shift) / self.scale
        b = (_float(reference).to(dev) * 2 - 1 - self.shift) / self.scale
        total = torch.zeros(a.shape[0], device=dev)
        for fa, fb, lin in zip(self._taps(a), self._taps(b), self.lins, strict=True):
            na = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            nb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total += lin((na - nb).pow(2)).mean((1, 2, 3))
        return float(total.mean())


def _load_tensors(path: Path, flag: str) -> dict[str, Tensor]:
    files = [path] if path.is_file() else sorted(
        p for p in path.glob("*") if p.suffix in (".pth", ".pt", ".safetensors", ".bin")
    )  # fmt: skip
    if not files:
        raise ConfigError(f"{flag} '{path}' holds no .pth/.pt/.safetensors weights")
    state: dict[str, Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            part = load_file(str(file))
        else:
            part = torch.load(file, map_location="cpu", weights_only=True)
        if isinstance(part, dict) and "state_dict" in part:
            part = part["state_dict"]
        state.update({k.removeprefix("net.").removeprefix("module."): v for k, v in part.items()})
    return state


def _pick(state: dict[str, Tensor], key: str, path: Any) -> Tensor:
    if key not in state:
        raise ConfigError(
            f"--lpips '{path}' has no tensor '{key}': give torchvision's AlexNet weights and "
            "the lpips package's alex.pth (one file or a folder of both)"
        )
    return state[key].float()


# ---------------------------------------------------------------- CLIP text-video score
class ClipScore:
    """CLIP-T: 100 x cosine(text, frame) averaged over up to 8 frames, with a transformers
    ``CLIPModel`` from a local folder (or a hub id already in the local cache)."""

    def __init__(self, path_or_id: str, device: str | torch.device = "cpu") -> None:
        from transformers import AutoTokenizer, CLIPModel

        try:
            self.model = CLIPModel.from_pretrained(path_or_id).to(device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(path_or_id)
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(
                f"--clip '{path_or_id}' is not a loadable transformers CLIP model ({first}): "
                "pass a folder with config.json, the weights and a tokenizer"
            ) from None
        self.model.requires_grad_(False)
        self.device = torch.device(device)
        self.size = int(self.model.config.vision_config.image_size)
        mean, std = CLIP_MEAN, CLIP_STD
        pre = Path(path_or_id) / "preprocessor_config.json"
        if pre.is_file():
            conf = json.loads(pre.read_text())
            mean, std = conf.get("image_mean", mean), conf.get("image_std", std)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.max_len = int(self.model.config.text_config.max_position_embeddings)
        self._text: dict[str, Tensor] = {}

    def _frames(self, video: np.ndarray) -> Tensor:
        """Up to 8 evenly spaced frames, shorter side resized to the model's size (bicubic),
        centre-cropped and normalised: (K, 3, S, S)."""
        x = _float(video)
        idx = np.unique(np.linspace(0, x.shape[0] - 1, min(CLIP_FRAMES, x.shape[0])).round())
        x = x[torch.as_tensor(idx, dtype=torch.long)]
        h, w = x.shape[-2:]
        scale = self.size / min(h, w)
        nh, nw = max(self.size, round(h * scale)), max(self.size, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False).clamp(0, 1)
        top, left = (nh - self.size) // 2, (nw - self.size) // 2
        x = x[..., top : top + self.size, left : left + self.size]
        return ((x - self.mean) / self.std).to(self.device)

    def _text_embedding(self, prompt: str) -> Tensor:
        if prompt not in self._text:
            tok = self.tokenizer(
                [prompt], padding=True, truncation=True, max_length=self.max_len,
                return_tensors="pt",
            )  # fmt: skip
            tok = {
                k: v.to(self.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")
            }
            emb = _embedding(self.model.get_text_features(**tok))
            self._text[prompt] = F.normalize(emb.float(), dim=-1)[0]
        return self._text[prompt]

    @torch.no_grad()
    def __call__(self, video: np.ndarray, prompt: str) -> float:
        img = _embedding(self.model.get_image_features(pixel_values=self._frames(video)))
        img = F.normalize(img.float(), dim=-1)  # (K, D)
        return 100.0 * float((img @ self._text_embedding(prompt)).mean())


def _embedding(out: Any) -> Tensor:
    """get_*_features returns a tensor (older transformers) or an output with pooler_output."""
    if isinstance(out, Tensor):
        return out
    return out.pooler_output if getattr(out, "pooler_output", None) is not None else out[0]
