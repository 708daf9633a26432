"""The embedded default: a tiny SDXL-shaped pipeline and a captioned shapes dataset, generated once.

``python -m trainer.sdxl_lora`` with no model or dataset trains on these. They are written to disk in
exactly the layouts a real run reads (``StableDiffusionXLPipeline.save_pretrained`` for the model, the
parquet layout of Ascend's README for the dataset), and the trainer then loads them through the same
``from_pretrained`` / ``load_dataset`` code as ``stabilityai/stable-diffusion-xl-base-1.0`` and
``lambdalabs/pokemon-blip-captions``: the default run exercises the real loading path, not a mock.

Everything is built from configs with a fixed seed, so the assets are identical on every machine, and
cached (see :func:`cache_root`) so only the first run pays for generating them.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

# Bump when anything generated below changes: the cache is keyed by it, so stale assets are never reused.
ASSETS_VERSION = "v1"
SEED = 1234

# ----------------------------------------------------------------------------- sizes
IMAGE_RESOLUTION = 64  # training resolution of the embedded run; latents are 8x8 (VAE factor 8, as SDXL)
TEXT_HIDDEN_SIZE = 32  # both tiny CLIP encoders; the UNet's cross_attention_dim is their sum
TEXT_PROJECTION_DIM = 32  # pooled text_embeds of the second encoder, as SDXL's 1280
ADDITION_TIME_EMBED_DIM = 8  # SDXL: 256
MODEL_MAX_LENGTH = 77  # CLIP's context, kept so prompts tokenize exactly as with SDXL

# ----------------------------------------------------------------------------- dataset contents
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
# Source images are not square (as pokemon/real data often are not), so resize + crop and the
# original-size / crop-top-left time ids are exercised by the default run.
IMAGE_SIZES = ((80, 64), (64, 80), (72, 72))  # (width, height)
NUM_IMAGES = 48

VALIDATION_PROMPTS = ("a red circle on a blue background", "a yellow triangle on a black background")

#: Hyper-parameters the embedded run uses instead of diffusers' SDXL-sized defaults, applied only to
#: flags the user did not pass (see ``trainer.args``). Sized so the run takes well under a minute on a
#: 2-core CPU.
EMBEDDED_OVERRIDES: dict[str, Any] = {
    "resolution": IMAGE_RESOLUTION,
    "train_batch_size": 4,
    "max_train_steps": 60,
    "learning_rate": 5e-3,  # a tiny random UNet needs a large step to show learning in 60 steps
    "rank": 8,
    "random_flip": True,
    "seed": 42,
    "output_dir": "sdxl-lora-output",
    "validation_prompts": list(VALIDATION_PROMPTS),
    "num_validation_images": 1,
    # Validation runs after epoch 0 (diffusers validates when epoch % validation_epochs == 0) and at the end:
    # a "before" and an "after" picture without paying for one per epoch.
    "validation_epochs": 1000,
    "validation_inference_steps": 10,
}


@dataclasses.dataclass(frozen=True)
class EmbeddedAssets:
    """Where the generated pipeline and dataset live."""

    model_dir: Path  # diffusers layout: unet/, vae/, text_encoder(_2)/, tokenizer(_2)/, scheduler/
    dataset_dir: Path  # Ascend README layout: README.MD, dataset_infos.json, data/*.parquet


def cache_root() -> Path:
    """Directory for the generated assets: ``$NPU_KERNELS_CACHE``, else ``$XDG_CACHE_HOME/npu_kernels``,
    else ``~/.cache/npu_kernels``."""
    if os.environ.get("NPU_KERNELS_CACHE"):
        return Path(os.environ["NPU_KERNELS_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "npu_kernels"


def ensure_assets(root: Path | None = None) -> EmbeddedAssets:
    """Return the embedded assets, generating them on first use.

    Generation writes to a private temporary directory that is renamed into place, so concurrent
    processes (several devices starting together) never see a half-written cache: the first rename wins
    and the others discard their copy.
    """
    base = (root or cache_root()) / f"embedded_sdxl_{ASSETS_VERSION}"
    assets = EmbeddedAssets(model_dir=base / "model", dataset_dir=base / "dataset")
    if (base / "COMPLETE").exists():
        return assets

    base.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".embedded_sdxl_", dir=base.parent))
    try:
        build_pipeline().save_pretrained(staging / "model", safe_serialization=True)
        _write_tokenizer_sources(staging / "model")
        write_parquet_dataset(staging / "dataset", build_samples())
        (staging / "COMPLETE").write_text(ASSETS_VERSION + "\n")
        if base.exists():  # a leftover without COMPLETE: an interrupted earlier generation
            shutil.rmtree(base, ignore_errors=True)
        try:
            os.replace(staging, base)
        except OSError:
            if not (base / "COMPLETE").exists():  # lost the race to a process that then failed: surface it
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return assets


# ----------------------------------------------------------------------------- tokenizer
def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (GPT-2's) reversible byte -> printable unicode table; BPE symbols are built from it."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def _apply_bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Plain BPE: repeatedly merge the lowest-ranked adjacent pair (what the CLIP tokenizer does)."""
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2 :]
    return symbols


def tokenizer_vocab_and_merges(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """A CLIP BPE vocabulary in which each of ``words`` is a single token.

    Layout as CLIP's: the 256 byte symbols, the same with the end-of-word marker ``</w>``, merge results,
    then ``<|startoftext|>`` and ``<|endoftext|>``. Merges are appended only when BPE with the merges so
    far does not already reduce a word to one token, and always at the lowest priority, so a later word's
    merges can never change how an earlier word splits.
    """
    base = list(_bytes_to_unicode().values())
    vocab = base + [symbol + "</w>" for symbol in base]
    known = set(vocab)
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    byte_map = _bytes_to_unicode()
    for word in sorted(set(words)):
        encoded = [byte_map[b] for b in word.encode("utf-8")]
        symbols = encoded[:-1] + [encoded[-1] + "</w>"]
        while len(pieces := _apply_bpe(symbols, ranks)) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            if pair[0] + pair[1] not in known:
                known.add(pair[0] + pair[1])
                vocab.append(pair[0] + pair[1])
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(vocab)}, [f"{a} {b}" for a, b in merges]


def caption_words() -> list[str]:
    """Every word of every caption and validation prompt the embedded run uses."""
    words = {"a", "an", "on", "background", *COLORS, *SHAPES}
    for prompt in VALIDATION_PROMPTS:
        words.update(prompt.split())
    return sorted(words)


def _write_tokenizer_files(directory: Path) -> tuple[Path, Path]:
    vocab, merges = tokenizer_vocab_and_merges(caption_words())
    directory.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = directory / "vocab.json", directory / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_file, merges_file


def build_tokenizers() -> tuple[Any, Any]:
    """The two CLIP tokenizers. As in SDXL base, the second pads with ``!`` instead of ``<|endoftext|>``."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = _write_tokenizer_files(Path(tmp))
        # Positional: the parameters are (vocab, merges) in transformers 5, (vocab_file, merges_file) in 4.x.
        files = (str(vocab_file), str(merges_file))
        tokenizer_one = CLIPTokenizer(*files, model_max_length=MODEL_MAX_LENGTH)
        tokenizer_two = CLIPTokenizer(*files, model_max_length=MODEL_MAX_LENGTH, pad_token="!")
    return tokenizer_one, tokenizer_two


def _write_tokenizer_sources(model_dir: Path) -> None:
    """Also store vocab.json/merges.txt beside tokenizer.json: transformers 4.x (the slow CLIPTokenizer
    that ``use_fast=False`` picks there) reads only those."""
    for sub in ("tokenizer", "tokenizer_2"):
        _write_tokenizer_files(model_dir / sub)


# ----------------------------------------------------------------------------- models
def build_pipeline() -> Any:
    """A randomly initialised, SDXL-shaped ``StableDiffusionXLPipeline`` (fixed seed)."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer_one, tokenizer_two = build_tokenizers()
    vocab_size = len(tokenizer_one)
    specials = dict(
        bos_token_id=tokenizer_one.bos_token_id,
        eos_token_id=tokenizer_one.eos_token_id,
        pad_token_id=tokenizer_one.pad_token_id,
    )
    # SDXL: CLIP ViT-L (quick_gelu) and OpenCLIP bigG (gelu, with projection). Three layers each so the
    # penultimate hidden state the trainer uses is a real intermediate layer.
    text_config = dict(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        projection_dim=TEXT_PROJECTION_DIM,
        **specials,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        text_encoder = CLIPTextModel(CLIPTextConfig(hidden_act="quick_gelu", **text_config))
        text_encoder_2 = CLIPTextModelWithProjection(
            CLIPTextConfig(hidden_act="gelu", **{**text_config, "pad_token_id": tokenizer_two.pad_token_id})
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 32, 32),  # SDXL: (128, 256, 512, 512)
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=IMAGE_RESOLUTION,
            scaling_factor=0.13025,  # SDXL's
            force_upcast=True,
        )
        unet = UNet2DConditionModel(
            sample_size=IMAGE_RESOLUTION // 8,
            in_channels=4,
            out_channels=4,
            # SDXL's block structure: no attention at the highest resolution, two cross-attention levels.
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64, 128),  # SDXL: (320, 640, 1280)
            layers_per_block=2,
            transformer_layers_per_block=(1, 1, 2),  # SDXL: (1, 2, 10)
            attention_head_dim=(2, 4, 8),  # SDXL: (5, 10, 20), i.e. heads of 64 channels; here 16
            norm_num_groups=8,
            cross_attention_dim=2 * TEXT_HIDDEN_SIZE,  # both encoders' penultimate states, concatenated
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=ADDITION_TIME_EMBED_DIM,
            # 6 time ids (original size, crop top-left, target size) + the pooled text embedding.
            projection_class_embeddings_input_dim=6 * ADDITION_TIME_EMBED_DIM + TEXT_PROJECTION_DIM,
        )
    scheduler = EulerDiscreteScheduler(  # SDXL base's scheduler config
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        interpolation_type="linear",
        use_karras_sigmas=False,
        steps_offset=1,
        timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer_one,
        tokenizer_2=tokenizer_two,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


# ----------------------------------------------------------------------------- dataset
def _draw(shape: str, color: tuple[int, int, int], background: tuple[int, int, int], size: tuple[int, int], rng: random.Random):
    from PIL import Image, ImageDraw

    width, height = size
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    # Big and near the centre, so any 64x64 crop of the resized image still shows the shape.
    radius = rng.uniform(0.26, 0.34) * min(width, height)
    cx = width / 2 + rng.uniform(-0.06, 0.06) * width
    cy = height / 2 + rng.uniform(-0.06, 0.06) * height
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=color)
    return image


def build_samples(num_images: int = NUM_IMAGES, seed: int = SEED) -> list[tuple[Any, str]]:
    """``num_images`` (PIL image, caption) pairs such as ("a red circle on a blue background")."""
    rng = random.Random(seed)
    combos = [(s, c, b) for s in SHAPES for c in COLORS for b in COLORS if b != c]
    rng.shuffle(combos)
    samples = []
    for i in range(num_images):
        shape, color, background = combos[i % len(combos)]
        image = _draw(shape, COLORS[color], COLORS[background], IMAGE_SIZES[i % len(IMAGE_SIZES)], rng)
        samples.append((image, f"a {color} {shape} on a {background} background"))
    return samples


def write_parquet_dataset(directory: Path, samples: list[tuple[Any, str]], name: str = "embedded-shapes") -> Path:
    """Write ``samples`` in the local layout Ascend's README documents for pokemon-blip-captions::

        README.MD
        dataset_infos.json
        data/dataset_infos.json
        data/train-00000-of-00001.parquet      (columns: image, text)

    The parquet file is written by ``datasets`` (PNG bytes in an ``Image`` feature), as the hub copy was.
    """
    from datasets import Dataset, Features, Image, Value

    features = Features({"image": Image(), "text": Value("string")})

    def png(image: Any) -> dict[str, Any]:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    dataset = Dataset.from_dict(
        {"image": [png(image) for image, _ in samples], "text": [text for _, text in samples]}, features=features
    )
    data_dir = directory / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    parquet = data_dir / "train-00000-of-00001.parquet"
    dataset.to_parquet(str(parquet))

    infos = {
        name: {
            "description": "Generated shapes with captions that describe them (npu-kernels embedded default).",
            "citation": "",
            "homepage": "",
            "license": "",
            "features": features.to_dict(),
            "splits": {"train": {"name": "train", "num_bytes": parquet.stat().st_size, "num_examples": len(samples)}},
            "download_size": parquet.stat().st_size,
            "dataset_size": parquet.stat().st_size,
        }
    }
    for path in (directory / "dataset_infos.json", data_dir / "dataset_infos.json"):
        path.write_text(json.dumps(infos, indent=2) + "\n", encoding="utf-8")
    (directory / "README.MD").write_text(
        f"# {name}\n\n{len(samples)} generated images of coloured shapes on coloured backgrounds, each captioned"
        " with what it shows (e.g. \"a red circle on a blue background\").\n",
        encoding="utf-8",
    )
    return directory
