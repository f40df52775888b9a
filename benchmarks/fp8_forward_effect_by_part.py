"""Which layers' FP8 GEMMs raise the loss of one trained model: the FP8 forward effect, split by part.

Trains the tiny DeepSeek-V3 in BF16 with FP32 master weights (`fp8_vs_bf16_sft.py`'s `bf16_masters`,
same seed, steps and learning rate), then measures its held-out loss with the project's layers on the
final weights: GEMMs in BF16, then in FP8 everywhere DeepSeek-V3's recipe puts them, then in FP8 with
each `--exclude` entry kept in BF16 (entries as `model.fp8_exclude` takes them; `+` joins parts kept
together). Each figure is the relative change over the BF16 GEMMs' loss: what FP8 costs one fixed
model, free of the divergence between two training runs. An entry that brings the figure from `all`
towards zero carries that much of it. Last line: one JSON object.

    python benchmarks/fp8_forward_effect_by_part.py [--seed 0] [--steps 600] [--lr 3e-4]
        [--exclude q_a_proj,kv_a_proj_with_mqa,q_a_proj+kv_a_proj_with_mqa,self_attn]
"""

from __future__ import annotations

import argparse
import json
import tempfile

from fp8_vs_bf16_sft import held_out_loss, variant_recipe

from grpo.sft import sft

PARTS = "q_a_proj,q_b_proj,kv_a_proj_with_mqa,kv_b_proj,o_proj,q_a_proj+kv_a_proj_with_mqa,self_attn,mlp"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--exclude", default=PARTS, help="comma-separated entries; '+' joins parts")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        recipe = variant_recipe("bf16_masters", scratch, args.seed, args.steps, args.lr, args.threads)
        checkpoint = sft(recipe, log=lambda line: None)["checkpoint"]
        bf16 = held_out_loss(checkpoint, recipe, "bf16")

        def effect(parts: list[str]) -> float:
            kept = recipe.model.model_copy(update={"fp8": True, "fp8_exclude": parts})
            fp8 = held_out_loss(checkpoint, recipe.model_copy(update={"model": kept}), "fp8")
            return round((fp8 - bf16) / bf16, 5)

        effects = {"all": effect([])}
        for entry in args.exclude.split(","):
            effects[f"without {entry}"] = effect(entry.split("+"))
    print(
        json.dumps(
            {
                "benchmark": "fp8_forward_effect_by_part",
                "seed": args.seed,
                "steps": args.steps,
                "lr": args.lr,
                "held_out_loss_bf16_gemms": round(bf16, 5),
                "fp8_forward_effect": effects,
            }
        )
    )


if __name__ == "__main__":
    main()
