"""Benchmark data lives outside the project (`../shared/data`, or `GRPO_DATA_DIR`); tests that read it
skip with the reason where it is missing. Also: the tiny model's tokenizer made to behave like a real
model's in one respect, for the tests of that respect."""

import pytest
from grpo.eval.benchmarks import default_data_dir

DATA_DIR = default_data_dir()
needs_data = pytest.mark.skipif(
    not DATA_DIR.is_dir(), reason=f"benchmark data not found at {DATA_DIR} (set GRPO_DATA_DIR)"
)


def bos_adding_tokenizer(chat_template: str | None = None):
    """The tiny model's tokenizer (`<s>` 1, `</s>` 2, one token per character: "0" 3, "+" 75, "=" 83)
    with a BOS before every encoded text, as Llama's and DeepSeek's add, and `chat_template`."""
    from tokenizers.processors import TemplateProcessing

    from grpo.models.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    tokenizer.chat_template = chat_template
    return tokenizer
