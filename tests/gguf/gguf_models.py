"""Tiny random models of the three families save_gguf writes, and the shapes shrink() makes of them."""

from __future__ import annotations

import copy
import functools

import torch
import transformers
from helpers.models import VOCAB, make_batches, tiny_llama

from wanda_lightning import shrink

#: The shrink() shapes the round trip covers: keyword arguments of shrink(), or "dense".
SHAPES = {
    "dense": {},
    "mlp": {"mlp": 0.5},
    "heads": {"heads": 0.5},
    "blocks": {"layers": 0.5},
    "all": {"mlp": 0.5, "heads": 0.5, "layers": 0.5},
}


def tiny_qwen2() -> transformers.PreTrainedModel:
    """A tiny random Qwen2 (q/k/v biases, tied embeddings, GQA 4/2), seeded, in eval mode."""
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def tiny_gemma3(layer_types: list[str] | None = None) -> transformers.PreTrainedModel:
    """A tiny random Gemma 3 text model: 6 blocks, five sliding-window (window 4) then one global unless
    ``layer_types`` says otherwise, GQA 4/2, head size 256 (Gemma 3's own, which transformers' GGUF reader assumes: it
    reads no query_pre_attn_scalar)."""
    torch.manual_seed(0)
    config = transformers.Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=256,
        sliding_window=4,
        layer_types=layer_types,
    )
    return transformers.AutoModelForCausalLM.from_config(config).eval()


FAMILIES = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gemma3": tiny_gemma3}


def make_model(family: str, shape: str = "dense") -> transformers.PreTrainedModel:
    """A fresh copy of a tiny ``family`` model shrunk to ``shape`` (built once per test session), with random norms
    (not all ones) so that a norm written wrong shows."""
    return copy.deepcopy(_shrunk(family, shape))


@functools.cache
def _shrunk(family: str, shape: str) -> transformers.PreTrainedModel:
    model = FAMILIES[family]()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    if SHAPES[shape]:
        shrink(model, calibration(), **SHAPES[shape])
    return model


def calibration() -> list[dict]:
    """One small calibration batch: 2 sequences of 16 tokens."""
    return make_batches(num_batches=1, batch=2)


# -- tokenizers -------------------------------------------------------------------------------------------------------

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@functools.cache
def _training_text() -> str:
    from wanda_lightning.data.corpus import pydoc_text

    return pydoc_text()[:30000]


def byte_level_tokenizer(vocab_size: int = 300) -> transformers.PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE tokenizer trained here on pydoc text, with ChatML special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([_training_text()], trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>"
    )
    tokenizer.chat_template = CHATML
    return tokenizer


def byte_fallback_tokenizer(vocab_size: int = 400) -> transformers.PreTrainedTokenizerFast:
    """A sentencepiece-style BPE tokenizer (``▁`` for spaces, byte fallback, ``<s>`` prepended) trained here."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers

    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", *(f"<0x{byte:02X}>" for byte in range(256))],
        show_progress=False,
    )
    backend.train_from_iterator([_training_text()], trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
