"""The embedded default policy: a tiny DeepSeek-V3 model and a character tokenizer, built locally.

Nothing is downloaded. The architecture is the real one (MLA attention, a dense first layer, then
shared + fine-grained routed experts with sigmoid, group-limited, bias-corrected routing) at sizes
two CPU cores can train in minutes. Two constraints come from vLLM and are kept on purpose:
- vLLM's CPU MLA kernel needs `kv_lora_rank + qk_rope_head_dim == 576` (512 + 64);
- vLLM loads `e_score_correction_bias` only with `topk_method: noaux_tc`.
"""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import DeepseekV3Config, PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
CHARACTERS = string.printable.replace("\x0b", "").replace("\x0c", "").replace("\r", "")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable character, plus pad/bos/eos. Deterministic: same ids every build."""
    vocab = {token: i for i, token in enumerate([PAD, BOS, EOS, *CHARACTERS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS, model_max_length=512
    )


TINY_SIZES = dict(
    hidden_size=128,
    intermediate_size=256,
    moe_intermediate_size=64,
    num_hidden_layers=3,
    first_k_dense_replace=1,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=64,
    kv_lora_rank=512,
    qk_rope_head_dim=64,
    qk_nope_head_dim=32,
    v_head_dim=32,
    n_shared_experts=1,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    topk_method="noaux_tc",
    scoring_func="sigmoid",
    norm_topk_prob=True,
    routed_scaling_factor=1.0,
    num_nextn_predict_layers=0,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
"""The tiny model's DeepseekV3Config fields (besides the vocabulary); `model.tiny_overrides` changes them."""


def check_tiny_overrides(overrides: dict) -> None:
    """Raise ValueError naming the first override that is not a DeepseekV3Config field, or whose value
    is not of its default's kind (an integer size given as text would fail deep inside torch)."""
    # DeepseekV3Config takes any keyword silently: a misspelt size would be ignored without this
    defaults = {**DeepseekV3Config().to_dict(), **TINY_SIZES}
    for field, value in overrides.items():
        if field not in defaults:
            raise ValueError(f"tiny_overrides.{field}: not a DeepseekV3Config field")
        if not _same_kind(value, defaults[field]):
            kind = type(defaults[field]).__name__
            raise ValueError(f"tiny_overrides.{field}: expected {kind}, got {value!r}")


def _same_kind(value, default) -> bool:
    """Whether `value` may stand where the config has `default` (None: anything; a float: any number)."""
    if default is None:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return type(value) is type(default)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


def tiny_deepseek_v3_config(vocab_size: int, **overrides) -> DeepseekV3Config:
    """A ~2 M parameter DeepSeek-V3: 3 layers (1 dense, 2 MoE with 8 routed experts, top-2 of 2 groups)."""
    check_tiny_overrides(overrides)
    config = DeepseekV3Config(**{**TINY_SIZES, "vocab_size": vocab_size, **overrides})
    config.architectures = ["DeepseekV3ForCausalLM"]
    return config


def save_tiny_checkpoint(path: str | Path, seed: int = 0, **overrides) -> Path:
    """Write a randomly initialised tiny DeepSeek-V3 + tokenizer as a Hugging Face folder."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    config = tiny_deepseek_v3_config(len(tokenizer), **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
