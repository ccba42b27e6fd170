"""Tiny, randomly initialised stand-ins for the real components, for tests and miniature experiments.

No T5 tokenizer or VAE weights can be downloaded offline, so these build small ones from scratch: a T5 encoder with
a sentencepiece tokenizer trained on the given sentences, a small ``AutoencoderKL`` and a small PixArt transformer.
Each is saved in the layout the real loaders read (``load_t5``, ``load_vae``, ``load_checkpoint``) and is fully
determined by its arguments and seed.
"""

from __future__ import annotations

import dataclasses
import io
import shutil
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm
import torch

from pixart_cli.checkpoints.format import Checkpoint, CheckpointMeta, build_model, save_checkpoint
from pixart_cli.models import PixArtConfig

# T5's special ids: transformers' T5 expects pad 0 and eos 1, and T5 has no bos token.
_SPECIAL_IDS = {"pad_id": 0, "eos_id": 1, "unk_id": 2, "bos_id": -1}


def train_tokenizer(directory: str | Path, sentences: Iterable[str], vocab_size: int = 256) -> Path:
    """Train a sentencepiece unigram model on ``sentences`` and save it as ``directory/spiece.model``.

    ``vocab_size`` is an upper bound: the trainer stops earlier when the sentences hold fewer pieces.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([s.lower() for s in sentences]),  # captions are lower-cased before encoding
        model_writer=model,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        model_type="unigram",
        character_coverage=1.0,
        num_threads=1,  # thread count changes the result
        minloglevel=2,
        **_SPECIAL_IDS,
    )
    path = directory / "spiece.model"
    path.write_bytes(model.getvalue())
    return path


def make_tiny_t5(
    directory: str | Path,
    sentences: Iterable[str],
    *,
    d_model: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    d_ff: int = 64,
    vocab_size: int = 256,
    seed: int = 0,
) -> Path:
    """A random T5 encoder and its tokenizer in one directory (what ``load_t5`` reads), like ``t5-v1_1-xxl``.

    The encoder is T5 v1.1-shaped (gated GELU, untied embeddings); its vocabulary is the tokenizer's.
    """
    from transformers import (  # lazy: transformers adds ~4 s to start-up (docs/reference.md §8)
        T5Config,
        T5EncoderModel,
        T5Tokenizer,
    )

    directory = Path(directory)
    spiece = train_tokenizer(directory / ".spiece", sentences, vocab_size)
    # extra_ids=0: no <extra_id_N> sentinels, which only matter for T5's span-corruption pre-training.
    # (``T5Tokenizer(vocab_file=...)`` would silently ignore the file; from_pretrained reads it.)
    tokenizer = T5Tokenizer.from_pretrained(str(spiece.parent), extra_ids=0)
    tokenizer.save_pretrained(str(directory))
    shutil.move(str(spiece), directory / "spiece.model")
    shutil.rmtree(spiece.parent)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // num_heads,
        d_ff=d_ff,
        num_layers=num_layers,
        num_heads=num_heads,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = T5EncoderModel(config)
    encoder.save_pretrained(str(directory), safe_serialization=True)
    return directory


def make_tiny_vae(
    directory: str | Path,
    *,
    block_out_channels: tuple[int, ...] = (32, 32, 64, 64),
    latent_channels: int = 4,
    scaling_factor: float = 0.18215,
    seed: int = 0,
) -> Path:
    """A random ``AutoencoderKL`` saved with ``save_pretrained``.

    Four levels give the SD VAE's 8× downsampling, so sizes and latent shapes match the real pipeline's; the
    scaling factor is SD's 0.18215 by default (the SDXL VAE of PixArt-Σ: 0.13025).
    """
    from diffusers import AutoencoderKL  # lazy: diffusers adds ~5 s to start-up (docs/reference.md §8)

    n = len(block_out_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=block_out_channels,
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=min(32, *block_out_channels),
            sample_size=64,
            scaling_factor=scaling_factor,
        )
    vae.save_pretrained(str(directory), safe_serialization=True)
    return Path(directory)


def random_pixart_weights(config: PixArtConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights of a PixArt model with every parameter drawn at random.

    The official initialisation zeroes the output layer and the cross-attention projections, which would make the
    caption (and anything compared through it) invisible; tests need all of them non-zero. Matrices are scaled
    by 1/sqrt(fan-in) so that every path, the caption's included, contributes at the same order of magnitude.
    """
    with torch.device("meta"):
        model = build_model(config)
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, tensor in model.state_dict().items():
        values = torch.randn(tensor.shape, generator=generator)
        if name.endswith("y_embedding"):  # the null caption: unit-scale features, as the official buffer
            values /= tensor.shape[-1] ** 0.5
        elif tensor.ndim >= 2:
            values /= tensor[0].numel() ** 0.5
        else:
            values *= 0.02
        weights[name] = values
    return weights


def make_tiny_pixart(
    directory: str | Path,
    config: PixArtConfig,
    *,
    text_encoder: str | None = None,
    vae: str | None = None,
    null_caption: str = "embedding",
    seed: int = 0,
) -> Path:
    """A checkpoint directory holding a PixArt transformer with random weights (see ``random_pixart_weights``)."""
    meta = CheckpointMeta(text_encoder=text_encoder, vae=vae, null_caption=null_caption, source="random (tiny.py)")
    checkpoint = Checkpoint(dataclasses.replace(config), random_pixart_weights(config, seed), None, meta)
    return save_checkpoint(checkpoint, directory, overwrite=True)


# A LLaVA-1.5-style conversation ("USER: <image>\n{prompt}\nASSISTANT:"), written out as the chat template.
_LLAVA_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() }}: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}"
    "{% endif %}{% endfor %}\n{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def make_tiny_llava(
    directory: str | Path,
    sentences: Iterable[str],
    *,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 32,
    num_layers: int = 2,
    vocab_size: int = 320,
    initializer_range: float = 0.5,
    seed: int = 0,
) -> Path:
    """A random LLaVA (CLIP vision tower + Llama language model) with a byte-level BPE tokenizer trained on
    ``sentences`` and a chat template, saved as a transformers directory that ``AutoProcessor`` and
    ``AutoModelForImageTextToText`` load like a released LLaVA-1.5.

    ``initializer_range`` is large so that random weights still make each image's caption differ.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # lazy: with transformers
    from transformers import (  # lazy: transformers adds ~4 s to start-up (docs/reference.md §8)
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(list(sentences), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=_LLAVA_TEMPLATE,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token, dropped by the "default" strategy
    )
    heads = max(1, hidden_size // 16)
    vision = CLIPVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch_size,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=initializer_range,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        initializer_range=initializer_range,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(str(directory))
    processor.save_pretrained(str(directory))
    return Path(directory)
