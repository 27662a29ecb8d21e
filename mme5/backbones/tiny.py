"""Tiny randomly initialised backbones of each family, built offline and saved like a real checkpoint.

    python -m mme5.backbones.tiny --family qwen2_vl --out runs/tiny-qwen2-vl --seed 0 --preset demo-video

The folder loads back through `load_backbone(out)`, the code path of a real checkpoint. `--out` is claimed
(`mme5.files.claim_folder`): the same family, preset, seed and corpus again says the backbone is there (an
interrupted build is built again), other settings are refused unless `--overwrite`. Presets:
"test" is as small as possible (unit tests); "demo" is the tiny Mllama that learned best on 2 CPU cores
(shared/reference/stack.md: 1 tile of 64 px, patch 8, vision 128 wide with 2 local + 1 global layers, text
128 wide with 4 layers, cross-attention at layers 1 and 3), the same sizes for the other families;
"demo-vision" is "demo" with 16 px patches, which learns grey handwritten digits where "demo" learns colour
only (benchmarks/README.md, own_data_digits.py; train it at lr 3e-4 as configs/own_data.yaml does);
"demo-video" is "demo" with a 4096-token BPE vocabulary, the `make demo` Qwen2-VL (see PRESETS).
"""

import argparse
import hashlib
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForImageTextToText,
    Gemma3Config,
    Gemma3Processor,
    LlavaConfig,
    LlavaOnevisionConfig,
    LlavaProcessor,
    MllamaConfig,
    MllamaProcessor,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2VLConfig,
    Qwen3_5Config,
    Qwen3VLConfig,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)
from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from mme5.backbones.llava_onevision import LlavaOnevisionFramesProcessor
from mme5.backbones.qwen2_5_vl import Qwen2_5_VLFramesProcessor
from mme5.backbones.qwen2_vl import Qwen2VLFramesProcessor
from mme5.backbones.qwen3_vl import Qwen3VLFramesProcessor
from mme5.backbones.tokenizer import BUILTIN_CORPUS, train_bpe
from mme5.files import OutputFolderError, claim_folder
from mme5.settings import command_parser, utf8_path

COMMAND = "mme5.backbones.tiny"


@dataclass(frozen=True)
class Sizes:
    """Dimensions of a tiny backbone (vision tower `v_*`, language model `t_*`)."""

    vocab: int
    image: int  # image side in pixels (one Mllama tile)
    patch: int
    v_hidden: int
    v_layers: int
    v_heads: int
    v_mlp: int
    t_hidden: int
    t_layers: int
    t_heads: int
    t_kv_heads: int
    t_mlp: int
    # Optional (benchmarks build larger Mllamas with them; the defaults are the presets' layout).
    v_global_layers: int = 1  # Mllama's global vision layers, after the `v_layers` local ones
    v_intermediate: tuple[int, ...] = (0,)  # Mllama: local layers whose output joins the vision features
    cross_first: int = 1  # Mllama: cross-attention layers are range(cross_first, t_layers, cross_stride)
    cross_stride: int = 2
    max_positions: int = 1024


PRESETS = {
    "test": Sizes(vocab=400, image=32, patch=8, v_hidden=16, v_layers=2, v_heads=2, v_mlp=32,
                  t_hidden=32, t_layers=2, t_heads=2, t_kv_heads=1, t_mlp=64),
    "demo": Sizes(vocab=512, image=64, patch=8, v_hidden=128, v_layers=2, v_heads=4, v_mlp=256,
                  t_hidden=128, t_layers=4, t_heads=4, t_kv_heads=2, t_mlp=256),
}
# Image content beyond colour (benchmarks/own_data_digits.py): "demo" with patches of 16 px. Each text token's
# cross-attention starts near uniform, i.e. a mean over the patches; over 64 patches of 8 px a thin grey
# stroke averages away (different digits embed at cosine 0.998), over 16 patches it survives.
PRESETS["demo-vision"] = replace(PRESETS["demo"], patch=16)
# The `make demo` backbone, a Qwen2-VL (it reads the demo's clips): image tokens sit in the text sequence, so
# the pooled last token must learn to attend to them. With 512 BPE tokens an instruction is ~20 tokens of
# characters beside an image's 16; 4096 tokens make the texts short (configs/demo.yaml).
PRESETS["demo-video"] = replace(PRESETS["demo"], vocab=4096)


@dataclass(frozen=True)
class TokenizerSpec:
    """The special tokens of a family's real tokenizer that prompts use (bos, pad, image tokens, ...)."""

    bos: str | None
    eos: str
    pad: str
    extra: tuple[str, ...]
    add_bos: bool  # whether the real tokenizer prepends bos itself
    named: dict[str, str] = field(default_factory=dict)  # tokenizer attributes the processor reads


TOKENIZERS = {
    # Llama-3.2-Vision's tokenizer adds no bos (transformers' MllamaConverter: a ByteLevel post-processor
    # only): MllamaProcessor and the mmE5 collator write <|begin_of_text|> into the prompt.
    "mllama": TokenizerSpec(
        "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", ("<|python_tag|>", "<|image|>"),
        False,
    ),
    "qwen2_vl": TokenizerSpec(
        None, "<|im_end|>", "<|endoftext|>",
        ("<|im_start|>", "<|video_pad|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"), False,
    ),
    "llava": TokenizerSpec("<s>", "</s>", "<pad>", ("<unk>", "<image>"), True),
}
# Gemma 3's processor reads its image markers from the tokenizer's boi/eoi/image token attributes.
TOKENIZERS["gemma3"] = TokenizerSpec("<bos>", "<eos>", "<pad>", (), True, named={
    "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"})
TOKENIZERS["qwen2_5_vl"] = TOKENIZERS["qwen2_vl"]  # Qwen2.5-VL kept Qwen2-VL's special tokens
TOKENIZERS["qwen3_vl"] = TOKENIZERS["qwen2_vl"]  # so did Qwen3-VL
TOKENIZERS["qwen3_5"] = TOKENIZERS["qwen2_vl"]  # and Qwen3.5 (eos <|im_end|>, pad <|endoftext|>)
# LLaVA-OneVision's Qwen2 tokenizer (llava-hf): Qwen's chat markers plus its own image and video tokens
TOKENIZERS["llava_onevision"] = TokenizerSpec(
    None, "<|im_end|>", "<|endoftext|>", ("<|im_start|>", "<image>", "<video>"), False,
)


def tiny_tokenizer(family: str, vocab: int, texts: list[str]) -> PreTrainedTokenizerFast:
    """Byte-level BPE with the family's special tokens."""
    spec = TOKENIZERS[family]
    specials = [t for t in (spec.pad, spec.bos, spec.eos, *spec.extra, *spec.named.values()) if t]
    return train_bpe(
        texts, list(dict.fromkeys(specials)), vocab, spec.bos, spec.eos, spec.pad, add_bos=spec.add_bos,
        named_tokens=spec.named,
    )


def _text(s: Sizes, tok: PreTrainedTokenizerFast, **extra: Any) -> dict[str, Any]:
    """The language-model config shared by all families (plus family-specific `extra`)."""
    return dict(
        vocab_size=len(tok), hidden_size=s.t_hidden, num_hidden_layers=s.t_layers,
        num_attention_heads=s.t_heads, num_key_value_heads=s.t_kv_heads, intermediate_size=s.t_mlp,
        max_position_embeddings=s.max_positions, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, **extra,
    )


def _mllama(s: Sizes, tok: PreTrainedTokenizerFast) -> tuple[PretrainedConfig, Any]:
    processor = MllamaProcessor(
        MllamaImageProcessorPil(size={"height": s.image, "width": s.image}, max_image_tiles=1), tok
    )
    vision = dict(
        hidden_size=s.v_hidden, num_hidden_layers=s.v_layers, num_global_layers=s.v_global_layers,
        attention_heads=s.v_heads, intermediate_size=s.v_mlp,
        intermediate_layers_indices=list(s.v_intermediate),
        vision_output_dim=(1 + len(s.v_intermediate)) * s.v_hidden,
        image_size=s.image, patch_size=s.patch, max_num_tiles=1, supported_aspect_ratios=[[1, 1]],
    )  # vision_output_dim = hidden * (1 + len(intermediate_layers_indices))
    text = _text(s, tok, cross_attention_layers=list(range(s.cross_first, s.t_layers, s.cross_stride)))
    config = MllamaConfig(vision_config=vision, text_config=text, image_token_index=processor.image_token_id)
    return config, processor


def _qwen_vl(config_class: type[PretrainedConfig], processor_class: type, vision: dict[str, Any], s: Sizes,
             tok: PreTrainedTokenizerFast, image_extra: dict[str, Any] | None = None,
             text_extra: dict[str, Any] | None = None, rope_extra: dict[str, Any] | None = None,
             rotary_dim: int | None = None) -> tuple[PretrainedConfig, Any]:
    """What the Qwen-VL families share: the image processor, the text config with its 3-D rope, the
    vision token ids; `vision` is the family's vision-tower config, the `*_extra` its additions
    to the image processor's, the text config's and the rope's settings; `rotary_dim` the rotated part of
    each attention head (None: all of `t_hidden // t_heads`)."""
    pixels = s.image * s.image  # min = max: every square image becomes exactly image x image
    processor = processor_class(
        Qwen2VLImageProcessorPil(
            min_pixels=pixels, max_pixels=pixels, patch_size=s.patch, merge_size=2, temporal_patch_size=2,
            **(image_extra or {}),
        ),
        tok,
    )
    rotary_dim = rotary_dim or s.t_hidden // s.t_heads
    half, third = rotary_dim // 2, rotary_dim // 6
    mrope = [half - 2 * third, third, third]  # (temporal, height, width) rotary dims, summing to rotary_dim/2
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope, **(rope_extra or {})}
    config = config_class(
        vision_config=vision, text_config=_text(s, tok, rope_parameters=rope, **(text_extra or {})),
        image_token_id=processor.image_token_id, video_token_id=processor.video_token_id,
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
    )
    return config, processor


def _qwen2_vl(s: Sizes, tok: PreTrainedTokenizerFast) -> tuple[PretrainedConfig, Any]:
    vision = dict(
        depth=s.v_layers, embed_dim=s.v_hidden, hidden_size=s.t_hidden, num_heads=s.v_heads,
        mlp_ratio=s.v_mlp // s.v_hidden, patch_size=s.patch, spatial_merge_size=2, temporal_patch_size=2,
    )
    return _qwen_vl(Qwen2VLConfig, Qwen2VLFramesProcessor, vision, s, tok)


def _qwen2_5_vl(s: Sizes, tok: PreTrainedTokenizerFast) -> tuple[PretrainedConfig, Any]:
    # Windows of 2x2 merged patches (the real 112 px are 4x4 of 28 px), full attention in the last layer
    # (the real model's every 8th): a test image is one window, a wide or tall one is several. The tower's
    # width is `hidden_size` here, the language model's `out_hidden_size` (Qwen2-VL: embed_dim, hidden_size).
    vision = dict(
        depth=s.v_layers, hidden_size=s.v_hidden, out_hidden_size=s.t_hidden, num_heads=s.v_heads,
        intermediate_size=s.v_mlp, patch_size=s.patch, spatial_merge_size=2, temporal_patch_size=2,
        window_size=2 * 2 * s.patch, fullatt_block_indexes=[s.v_layers - 1],
    )
    return _qwen_vl(Qwen2_5_VLConfig, Qwen2_5_VLFramesProcessor, vision, s, tok)


def _qwen3_vl(s: Sizes, tok: PreTrainedTokenizerFast) -> tuple[PretrainedConfig, Any]:
    # Deepstack: each vision layer but the last also feeds, through its own merger, one of the first
    # language layers at the image positions (the real model: vision layers 8/16/24 of 27 → layers 0-2).
    side = s.image // s.patch
    vision = dict(
        depth=s.v_layers, hidden_size=s.v_hidden, intermediate_size=s.v_mlp, num_heads=s.v_heads,
        patch_size=s.patch, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=s.t_hidden,
        num_position_embeddings=side * side, deepstack_visual_indexes=list(range(s.v_layers - 1)),
    )  # learned positions on a square grid, interpolated to each image's grid
    # pixels normalised with mean = std = 0.5 (Qwen2-VL: CLIP's statistics); head_dim explicit (the config's
    # default is the real 128)
    return _qwen_vl(Qwen3VLConfig, Qwen3VLFramesProcessor, vision, s, tok,
                    image_extra={"image_mean": [0.5] * 3, "image_std": [0.5] * 3},
                    text_extra={"head_dim": s.t_hidden // s.t_heads},
                    rope_extra={"mrope_interleaved": True})


def _qwen3_5(s: Sizes, tok: PreTrainedTokenizerFast) -> tuple[PretrainedConfig, Any]:
    # Qwen3-VL's processor and vision tower without deepstack, in front of a hybrid language model: Gated
    # DeltaNet (linear attention) layers, the last one full attention, as the real model's every 4th (test:
    # 1 linear + 1 full; demo: 3 + 1, the real pattern). Every dimension whose default is the real one is
    # set: full attention's head_dim (twice the hidden width per head, so that a quarter of it, the real
    # partial_rotary_factor, still has a rotary pair each for time, height and width), the linear attention's
    # key and value heads (value heads twice the key heads, as the real 16/32) and head dims, its conv kernel.
    side = s.image // s.patch
    vision = dict(
        depth=s.v_layers, hidden_size=s.v_hidden, intermediate_size=s.v_mlp, num_heads=s.v_heads,
        patch_size=s.patch, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=s.t_hidden,
        num_position_embeddings=side * side,
    )
    head_dim, partial_rotary = 2 * s.t_hidden // s.t_heads, 0.25
    text = dict(
        head_dim=head_dim, layer_types=["linear_attention"] * (s.t_layers - 1) + ["full_attention"],
        linear_num_key_heads=s.t_heads, linear_num_value_heads=2 * s.t_heads,
        linear_key_head_dim=s.t_hidden // s.t_heads, linear_value_head_dim=s.t_hidden // s.t_heads,
        linear_conv_kernel_dim=4,
    )
    return _qwen_vl(Qwen3_5Config, Qwen3VLFramesProcessor, vision, s, tok,
                    image_extra={"image_mean": [0.5] * 3, "image_std": [0.5] * 3}, text_extra=text,
                    rope_extra={"mrope_interleaved": True, "partial_rotary_factor": partial_rotary},
                    rotary_dim=int(head_dim * partial_rotary))


def _llava(s: Sizes, tok: PreTrainedTokenizerFast) -> tuple[PretrainedConfig, Any]:
    square = {"height": s.image, "width": s.image}
    # "default" feature selection drops CLIP's CLS token: one <image> token per patch
    processor = LlavaProcessor(
        CLIPImageProcessorPil(size={"shortest_edge": s.image}, crop_size=square), tok,
        patch_size=s.patch, num_additional_image_tokens=1, vision_feature_select_strategy="default",
    )
    vision = dict(
        model_type="clip_vision_model", hidden_size=s.v_hidden, num_hidden_layers=s.v_layers,
        num_attention_heads=s.v_heads, intermediate_size=s.v_mlp, image_size=s.image, patch_size=s.patch,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=_text(s, tok, model_type="llama"),
        image_token_index=processor.image_token_id, image_seq_length=(s.image // s.patch) ** 2,
    )
    return config, processor


def _siglip(s: Sizes) -> dict[str, Any]:
    """A SigLIP vision tower without its attention-pooling head: the families read the patch states (an unused
    head would get no gradient and stall DDP)."""
    return dict(
        model_type="siglip_vision_model", hidden_size=s.v_hidden, num_hidden_layers=s.v_layers,
        num_attention_heads=s.v_heads, intermediate_size=s.v_mlp, image_size=s.image, patch_size=s.patch,
        vision_use_head=False,
    )


def _llava_onevision(s: Sizes, tok: PreTrainedTokenizerFast) -> tuple[PretrainedConfig, Any]:
    # An anyres grid of 1x1 to 3x3 tiles of the tile size (the real one: 1x1 to 6x6 of 384 px), so that a
    # square test image is one tile plus the whole image, and a wide one is several tiles. SigLIP has no CLS
    # token: every patch of a tile is an image token ("full"); SigLIP's pixel statistics (mean = std = 0.5).
    grid = [[rows * s.image, cols * s.image] for rows in (1, 2, 3) for cols in (1, 2, 3)]
    processor = LlavaOnevisionFramesProcessor(
        LlavaOnevisionImageProcessorPil(size={"height": s.image, "width": s.image}, image_grid_pinpoints=grid,
                                        image_mean=[0.5] * 3, image_std=[0.5] * 3),
        tok, num_image_tokens=(s.image // s.patch) ** 2, vision_feature_select_strategy="full",
    )
    vision = _siglip(s)
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=_text(s, tok, model_type="qwen2"), image_grid_pinpoints=grid,
        image_token_index=processor.image_token_id, video_token_index=processor.video_token_id,
        vision_feature_select_strategy="full", vision_feature_layer=-1,
    )
    return config, processor


def _gemma3(s: Sizes, tok: PreTrainedTokenizerFast) -> tuple[PretrainedConfig, Any]:
    # The projector average-pools 2x2 patches into one soft token (the real 896 px: 64x64 patches of 14 px,
    # pooled 4x4 into 256). Sliding-window layers with the last one global (the real model: 5 local, then 1
    # global), the window 4 image sequences long as the real 1024 tokens are to its 256.
    tokens = (s.image // s.patch // 2) ** 2
    processor = Gemma3Processor(
        Gemma3ImageProcessorPil(size={"height": s.image, "width": s.image}), tok, image_seq_length=tokens
    )
    vision = _siglip(s)
    head_dim = s.t_hidden // s.t_heads  # explicit, as query_pre_attn_scalar: the defaults are the real 256
    text = _text(s, tok, head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=4 * tokens,
                 layer_types=["sliding_attention"] * (s.t_layers - 1) + ["full_attention"])
    config = Gemma3Config(
        vision_config=vision, text_config=text, mm_tokens_per_image=tokens, boi_token_index=tok.boi_token_id,
        eoi_token_index=tok.eoi_token_id, image_token_index=tok.image_token_id,
    )
    return config, processor


BUILDERS: dict[str, Callable[[Sizes, PreTrainedTokenizerFast], tuple[PretrainedConfig, Any]]] = {
    "mllama": _mllama,
    "qwen2_vl": _qwen2_vl,
    "qwen2_5_vl": _qwen2_5_vl,
    "qwen3_vl": _qwen3_vl,
    "qwen3_5": _qwen3_5,
    "llava": _llava,
    "llava_onevision": _llava_onevision,
    "gemma3": _gemma3,
}


def make_tiny(
    family: str, seed: int = 0, preset: str = "test", corpus: str | Path | None = None,
    sizes: Sizes | None = None, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, Any]:
    """A tiny random (model, processor) of `family`; same seed, same weights.

    `sizes`, if given, replaces the preset's dimensions (e.g. a benchmark's larger model); `dtype` and
    `device` create the weights directly in that dtype and on that device (a large model then never exists
    in float32 on the CPU). Same seed, sizes and device: same weights.

    The image path starts open where transformers starts it closed (`open_image_path`).
    """
    if family not in BUILDERS or (sizes is None and preset not in PRESETS):
        raise ValueError(f"family must be one of {sorted(BUILDERS)} and preset one of {sorted(PRESETS)}; "
                         f"got family={family!r}, preset={preset!r}")
    sizes = sizes or PRESETS[preset]
    text = Path(corpus).read_text(encoding="utf-8") if corpus else BUILTIN_CORPUS
    tok = tiny_tokenizer(family, sizes.vocab, [line for line in text.splitlines() if line.strip()])
    config, processor = BUILDERS[family](sizes, tok)
    with torch.random.fork_rng():  # seed the weights without touching the caller's random state
        torch.manual_seed(seed)  # seeds the CUDA generators too
        with torch.device(device) if device is not None else nullcontext():
            model = AutoModelForImageTextToText.from_config(config, **({"dtype": dtype} if dtype else {}))
        open_image_path(model)
    return model, processor


@torch.no_grad()
def open_image_path(model: PreTrainedModel) -> None:
    """Open what transformers initialises shut between the pixels and the language model: Mllama's
    cross-attention gates (0, tanh(0) = 0) to 1, Gemma 3's projection into the language model (zeros) to
    random. A random model then depends on the pixels, so tests see image misalignment and training need
    not first open the path."""
    for name, param in model.named_parameters():
        if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
            param.fill_(1.0)
        elif name.endswith("multi_modal_projector.mm_input_projection_weight"):
            param.normal_(std=model.config.initializer_range)


def build_tiny(
    family: str, out_dir: str | Path, seed: int = 0, preset: str = "test", corpus: str | Path | None = None,
    sizes: Sizes | None = None,
) -> Path:
    """Build a tiny backbone (see `make_tiny`), `save_pretrained` it to `out_dir` and return that folder."""
    model, processor = make_tiny(family, seed, preset, corpus, sizes=sizes)
    out = Path(out_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"built tiny {family} ({preset}, seed {seed}): {n_params / 1e6:.3f}M parameters")
    return out


def utf8_bytes(path: Path) -> bytes:
    """The bytes of a UTF-8 text file; another encoding is refused naming the file and its first bad byte
    (checked before --out is claimed: the build would fail after it)."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8: byte {error.start} (0x{data[error.start]:02x}) cannot be "
                         "decoded; save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
    return data


def tiny_identity(family: str, seed: int, preset: str, corpus: Path | None) -> dict[str, Any]:
    """What defines a tiny backbone folder: family, seed, the preset's sizes and the BPE corpus (by content,
    so a corpus rewritten with the same text, as a rebuilt demo world's, is the same)."""
    text = utf8_bytes(corpus) if corpus else BUILTIN_CORPUS.encode("utf-8")
    return {"family": family, "seed": seed, "preset": preset, **asdict(PRESETS[preset]),
            "corpus": str(corpus.resolve()) if corpus else "built-in",
            "corpus_sha1": hashlib.sha1(text).hexdigest()[:16]}


def main(argv: list[str] | None = None) -> int:
    parser = command_parser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", required=True, choices=sorted(BUILDERS))
    parser.add_argument("--out", required=True, type=utf8_path,
                        help="folder to save model and processor into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="test", choices=sorted(PRESETS))
    parser.add_argument("--corpus", type=Path, help="UTF-8 text, one sentence a line, to train the BPE on")
    parser.add_argument("--overwrite", action="store_true", help="replace a backbone of other settings")
    args = parser.parse_args(argv)
    try:
        identity = tiny_identity(args.family, args.seed, args.preset, args.corpus)
        with claim_folder(args.out, COMMAND, identity, overwrite=args.overwrite,
                          inputs=[args.corpus] if args.corpus else [],
                          ways_out="pass --overwrite to build it again, or choose another --out") as folder:
            if folder.was_complete:
                folder.complete()
                print(f"{args.out} already holds the tiny {args.family} of these settings: nothing to do")
                return 0
            build_tiny(args.family, folder.work, seed=args.seed, preset=args.preset, corpus=args.corpus)
            folder.complete()
    except (OutputFolderError, OSError, ValueError) as error:  # OSError, ValueError: an unreadable --corpus
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"saved -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
