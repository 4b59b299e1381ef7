"""Random tiny diffusers-format bundles for tests and for pretraining the shapes teacher.

A bundle is the folder layout every real model uses (DESIGN.md point 10): ``model_index.json``
plus ``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/`` and ``scheduler/``. The tiny
one is sized for the ``shapes-tiny`` preset: 17 frames of 64x64 -> latents (C, 5, 16, 16) with
a VAE of spatial factor 4 and temporal factor 4, and a 1x2x2-patch transformer (320 tokens).
Everything is built from a seed and offline (the tokenizer is a word-level vocabulary).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dcm.config import ConfigError

# Words of the synthetic shapes world and a few common ones; anything else maps to <unk>.
DEFAULT_VOCAB: tuple[str, ...] = (
    "a", "an", "the", "and", "on", "in", "of", "with", "to", "from", "is", "at", "over",
    "red", "green", "blue", "yellow", "purple", "orange", "white", "black", "gray", "cyan",
    "magenta", "pink", "brown",
    "circle", "square", "triangle", "star", "ring", "cross", "diamond", "shape", "ball", "box",
    "small", "big", "large", "tiny", "medium",
    "moves", "moving", "slides", "bounces", "spins", "grows", "shrinks", "stays", "still",
    "left", "right", "up", "down", "across", "around", "diagonally", "slowly", "quickly",
    "background", "dark", "light", "plain", "striped", "frame", "video", "scene",
)  # fmt: skip
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"

# Default sizes (hidden sizes 16-64); each may be overridden through **dims.
WAN_DIMS: dict[str, Any] = {
    "layers": 2,
    "heads": 2,
    "head_dim": 16,
    "ffn_dim": 64,
    "freq_dim": 32,
    "patch_size": (1, 2, 2),
    "z_dim": 8,
    "vae_base_dim": 8,
    "vae_spatial_factor": 4,
    "text_dim": 32,
    "text_layers": 2,
    "text_heads": 2,
    "text_ff": 64,
    "shift": 3.0,
}
HUNYUAN_DIMS: dict[str, Any] = {
    "layers": 1,
    "single_layers": 2,
    "refiner_layers": 1,
    "heads": 2,
    "head_dim": 16,
    "rope_axes_dim": (4, 6, 6),
    "patch_size": (1, 2, 2),
    "z_dim": 8,
    "vae_channels": (8, 16, 32, 32),
    "text_dim": 32,
    "text_layers": 3,
    "text_heads": 2,
    "text_ff": 64,
    "pooled_dim": 16,
    "clip_layers": 1,
    "clip_heads": 2,
    "clip_ff": 32,
    # FlowMatchEulerDiscreteScheduler shift of the released HunyuanVideo scheduler config
    "shift": 7.0,
}


def _dims(defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ConfigError(
            f"build_tiny_bundle got unknown size(s) {', '.join(unknown)}: "
            f"allowed are {', '.join(sorted(defaults))}"
        )
    return {**defaults, **given}


def build_tokenizer(out_dir: Path, vocab: list[str] | tuple[str, ...] | None = None) -> Any:
    """An offline word-level tokenizer (lower-cased, whitespace split, </s> appended)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = [w for w in dict.fromkeys(w.lower() for w in (vocab or DEFAULT_VOCAB))]
    words = [w for w in words if w not in (PAD, EOS, UNK)]
    table = {PAD: 0, EOS: 1, UNK: 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=table, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # T5-style: every prompt, the empty one included, ends with </s> (never zero tokens).
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK, padding_side="right"
    )
    fast.save_pretrained(out_dir)
    return fast


def _write_index(out: Path, backbone: str, parts: dict[str, tuple[str, str]]) -> None:
    import diffusers

    pipeline = "WanPipeline" if backbone == "wan" else "HunyuanVideoPipeline"
    index = {"_class_name": pipeline, "_diffusers_version": diffusers.__version__}
    index.update({name: list(lib_cls) for name, lib_cls in parts.items()})
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def _scheduler(out: Path, shift: float) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    FlowMatchEulerDiscreteScheduler(shift=shift).save_pretrained(out / "scheduler")


def _build_wan(out: Path, vocab: Any, d: dict[str, Any]) -> None:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = build_tokenizer(out / "tokenizer", vocab)
    text_cfg = UMT5Config(
        vocab_size=len(tokenizer),
        d_model=d["text_dim"],
        d_kv=d["text_dim"] // d["text_heads"],
        d_ff=d["text_ff"],
        num_layers=d["text_layers"],
        num_heads=d["text_heads"],
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
    )
    UMT5EncoderModel(text_cfg).save_pretrained(out / "text_encoder")
    # log2(spatial factor) downsamples, the last two also temporal (factor 4), as in Wan's
    # [1, 2, 4, 4] / [False, True, True]. Factor 4 keeps 16x16 latents of a 64x64 frame: an
    # 8x-compressing tiny VAE stalled near 18 dB on the shapes world. The config carries
    # per-channel latent statistics (METHOD.md section 1), identity for a random VAE.
    z, stages = d["z_dim"], {4: 2, 8: 3}.get(d["vae_spatial_factor"])
    if stages is None:
        raise ConfigError(f"vae_spatial_factor={d['vae_spatial_factor']} must be 4 or 8")
    AutoencoderKLWan(
        base_dim=d["vae_base_dim"],
        z_dim=z,
        dim_mult=[1, 2, 4, 4][: stages + 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True][-stages:],
        scale_factor_spatial=d["vae_spatial_factor"],
        latents_mean=[0.0] * z,
        latents_std=[1.0] * z,
    ).save_pretrained(out / "vae")
    WanTransformer3DModel(
        patch_size=tuple(d["patch_size"]),
        num_attention_heads=d["heads"],
        attention_head_dim=d["head_dim"],
        in_channels=z,
        out_channels=z,
        text_dim=d["text_dim"],
        freq_dim=d["freq_dim"],
        ffn_dim=d["ffn_dim"],
        num_layers=d["layers"],
        rope_max_seq_len=256,
    ).save_pretrained(out / "transformer")
    _scheduler(out, d["shift"])
    _write_index(
        out,
        "wan",
        {
            "transformer": ("diffusers", "WanTransformer3DModel"),
            "vae": ("diffusers", "AutoencoderKLWan"),
            "text_encoder": ("transformers", "UMT5EncoderModel"),
            "tokenizer": ("transformers", "PreTrainedTokenizerFast"),
            "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
        },
    )


def _word_tokenizer(
    out_dir: Path,
    words: list[str],
    specials: dict[str, int],
    split: str,
    template: str | None,
    **tokens: str,
) -> Any:
    """A lower-cased word-level ``PreTrainedTokenizerFast`` saved to ``out_dir``.

    ``specials``: special token -> id (ids 0..k-1); ``split``: regex of the pieces a text is
    cut into (after dropping spaces); ``template``: the post-processor's single-sequence
    template (None: no tokens added); ``tokens``: pad_token, eos_token, ... for transformers.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    table = dict(specials)
    for w in dict.fromkeys(w.lower() for w in words):
        table.setdefault(w, len(table))
    tok = Tokenizer(models.WordLevel(vocab=table, unk_token=tokens["unk_token"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[ \t]+"), behavior="removed"),
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
        ]
    )
    if template is not None:
        used = sorted({t for t in template.split() if t in specials})
        tok.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[(t, specials[t]) for t in used]
        )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="right", **tokens)
    fast.add_special_tokens(
        {"additional_special_tokens": [t for t in specials if t not in tokens.values()]}
    )
    fast.save_pretrained(out_dir)
    return fast


def hunyuan_template() -> dict[str, Any]:
    """diffusers' HunyuanVideo prompt template (its ``crop_start`` is 95 template tokens)."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    return dict(DEFAULT_PROMPT_TEMPLATE)


# Llama-3 header tokens of the HunyuanVideo prompt template; the tiny Llama tokenizer cuts
# words, single punctuation marks and single newlines, so the template before the prompt
# is 95 tokens, the crop_start diffusers uses for the real tokenizer.
LLAMA_SPECIALS = ("<pad>", "<unk>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
LLAMA_SPLIT = r"\w+|[^\w\s]|\n"
CLIP_SPECIALS = ("<|startoftext|>", "<|endoftext|>", "<unk>")


def _template_words() -> list[str]:
    import re

    text = hunyuan_template()["template"].replace("{}", " ")
    for special in LLAMA_SPECIALS:
        text = text.replace(special, " ")
    return re.findall(LLAMA_SPLIT, text)


def _build_hunyuan(out: Path, vocab: Any, d: dict[str, Any]) -> None:
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoTransformer3DModel
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    z = d["z_dim"]
    pt, ph, pw = d["patch_size"]
    if ph != pw:
        raise ConfigError(
            f"HunyuanVideo needs a square spatial patch, got patch_size={d['patch_size']}"
        )
    words = list(vocab or DEFAULT_VOCAB)
    # 1. Llama text encoder (hidden states of its third-last layer are the text tokens)
    llama_tok = _word_tokenizer(
        out / "tokenizer",
        [*_template_words(), *words],
        {t: i for i, t in enumerate(LLAMA_SPECIALS)},
        LLAMA_SPLIT,
        None,  # no BOS/EOS: the template carries the structure, as crop_start assumes
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|eot_id|>",
    )
    LlamaModel(
        LlamaConfig(
            vocab_size=len(llama_tok),
            hidden_size=d["text_dim"],
            intermediate_size=d["text_ff"],
            num_hidden_layers=d["text_layers"],
            num_attention_heads=d["text_heads"],
            num_key_value_heads=d["text_heads"],
            max_position_embeddings=1024,
            pad_token_id=0,
            bos_token_id=None,
            eos_token_id=LLAMA_SPECIALS.index("<|eot_id|>"),
        )
    ).save_pretrained(out / "text_encoder")
    # 2. CLIP text encoder: its pooled output (at the first <|endoftext|>) is the pooled text
    clip_specials = {t: i for i, t in enumerate(CLIP_SPECIALS)}
    clip_tok = _word_tokenizer(
        out / "tokenizer_2",
        words,
        clip_specials,
        r"\w+|[^\w\s]",
        "<|startoftext|> $A <|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
    )
    CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tok),
            hidden_size=d["pooled_dim"],
            intermediate_size=d["clip_ff"],
            projection_dim=d["pooled_dim"],
            num_hidden_layers=d["clip_layers"],
            num_attention_heads=d["clip_heads"],
            max_position_embeddings=77,
            pad_token_id=clip_specials["<|endoftext|>"],
            bos_token_id=clip_specials["<|startoftext|>"],
            eos_token_id=clip_specials["<|endoftext|>"],
        )
    ).save_pretrained(out / "text_encoder_2")
    # 3. transformer with embedded guidance (HunyuanVideo-T2V), VAE (spatial 8, temporal 4)
    HunyuanVideoTransformer3DModel(
        in_channels=z,
        out_channels=z,
        num_attention_heads=d["heads"],
        attention_head_dim=d["head_dim"],
        num_layers=d["layers"],
        num_single_layers=d["single_layers"],
        num_refiner_layers=d["refiner_layers"],
        patch_size=ph,
        patch_size_t=pt,
        text_embed_dim=d["text_dim"],
        pooled_projection_dim=d["pooled_dim"],
        rope_axes_dim=tuple(d["rope_axes_dim"]),
        guidance_embeds=True,
    ).save_pretrained(out / "transformer")
    channels = tuple(d["vae_channels"])
    AutoencoderKLHunyuanVideo(
        latent_channels=z,
        block_out_channels=channels,
        down_block_types=("HunyuanVideoDownBlock3D",) * len(channels),
        up_block_types=("HunyuanVideoUpBlock3D",) * len(channels),
        layers_per_block=1,
        norm_num_groups=min(channels[0], 8),
        mid_block_add_attention=False,
    ).save_pretrained(out / "vae")
    _scheduler(out, d["shift"])
    _write_index(
        out,
        "hunyuanvideo",
        {
            "transformer": ("diffusers", "HunyuanVideoTransformer3DModel"),
            "vae": ("diffusers", "AutoencoderKLHunyuanVideo"),
            "text_encoder": ("transformers", "LlamaModel"),
            "tokenizer": ("transformers", "PreTrainedTokenizerFast"),
            "text_encoder_2": ("transformers", "CLIPTextModel"),
            "tokenizer_2": ("transformers", "PreTrainedTokenizerFast"),
            "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
        },
    )


def build_tiny_bundle(
    out_dir: str | Path,
    backbone: str = "wan",
    vocab: list[str] | tuple[str, ...] | None = None,
    seed: int = 0,
    **dims: Any,
) -> Path:
    """Write a random tiny diffusers-format bundle to ``out_dir`` and return its path.

    Wan: transformer, VAE, UMT5 text encoder, word-level tokenizer over ``vocab`` and
    scheduler. HunyuanVideo: transformer, VAE, Llama text encoder + tokenizer (the prompt
    template's words included), CLIP text encoder + tokenizer and scheduler. Both load with
    the stock ``WanPipeline`` / ``HunyuanVideoPipeline.from_pretrained``.
    ``dims`` overrides sizes in ``WAN_DIMS`` / ``HUNYUAN_DIMS``; weights come from ``seed``.
    """
    if backbone not in ("wan", "hunyuanvideo"):
        raise ConfigError(f"backbone={backbone!r} is not allowed: choose 'wan' or 'hunyuanvideo'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Seed the global generator only for the build, then restore the caller's state.
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        if backbone == "wan":
            _build_wan(out, vocab, _dims(WAN_DIMS, dims))
        else:
            _build_hunyuan(out, vocab, _dims(HUNYUAN_DIMS, dims))
    finally:
        torch.random.set_rng_state(state)
    return out
