import json

import pytest
import torch

from grpo.config import RecipeError
from grpo.models.build import materialize
from grpo.models.fp8 import E4M3
from grpo.models.fp8_dequantize import dequantized_state, fp8_block_quantized, write_bf16_copy
from grpo.models.fp8_export import export_fp8
from grpo.models.tiny import save_tiny_checkpoint


def test_each_block_of_a_weight_is_scaled_by_its_own_scale_and_the_scale_goes():
    # 130 x 129: four blocks, three of them ragged
    q = torch.ones(130, 129).to(E4M3)
    scale_inv = torch.tensor([[0.5, 2.0], [4.0, 0.125]])
    norm = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    bias = torch.tensor([0.25, -0.5])  # the routing bias stays FP32
    shard = {"o_proj.weight": q, "o_proj.weight_scale_inv": scale_inv, "norm.weight": norm, "gate.bias": bias}
    state = dequantized_state(shard, {"o_proj.weight_scale_inv": scale_inv})
    assert sorted(state) == ["gate.bias", "norm.weight", "o_proj.weight"]
    weight = state["o_proj.weight"]
    assert weight.dtype == torch.bfloat16 and weight.shape == (130, 129)
    assert weight[:128, :128].unique().tolist() == [0.5]
    assert weight[:128, 128:].unique().tolist() == [2.0]
    assert weight[128:, :128].unique().tolist() == [4.0]
    assert weight[128:, 128:].unique().tolist() == [0.125]
    assert state["norm.weight"] is norm and state["gate.bias"] is bias


def test_a_quantized_value_is_multiplied_by_its_scale_and_rounded_once_to_bf16():
    q = torch.tensor([[448.0, -0.5, 3.0]]).to(E4M3)
    state = dequantized_state({"w.weight": q}, {"w.weight_scale_inv": torch.tensor([[0.1]])})
    # 448 * 0.1 = 44.8 and 3 * 0.1 = 0.3 in FP32, then the nearest BF16
    assert state["w.weight"].tolist() == [[44.75, -0.050048828125, 0.30078125]]


def test_an_fp8_weight_holding_nan_is_an_error_not_a_silent_copy():
    scale = {"w.weight_scale_inv": torch.tensor([[1.0]])}
    for bad in (
        torch.tensor([[1.0, float("nan")]]).to(E4M3),
        torch.tensor([[-float("inf")]]).to(torch.float8_e5m2),
    ):
        with pytest.raises(RecipeError, match="the tensor w.weight holds NaN or infinite values"):
            dequantized_state({"w.weight": bad}, scale)
    with pytest.raises(RecipeError, match="the weight_scale_inv of w.weight holds NaN or infinite values"):
        dequantized_state(
            {"w.weight": torch.ones(1, 2).to(E4M3)}, {"w.weight_scale_inv": torch.tensor([[float("inf")]])}
        )
    finite = torch.tensor([[-448.0, 57344.0]]).to(torch.float8_e5m2)  # E5M2's largest finite value
    assert dequantized_state({"w.weight": finite}, scale)["w.weight"].tolist() == [[-448.0, 57344.0]]


def test_a_scale_of_another_shape_than_the_weight_s_blocks_is_an_error():
    q = torch.ones(256, 129).to(E4M3)  # 2 x 2 blocks
    for scale in (torch.ones(1, 1), torch.ones(2, 1), torch.ones(3, 2), torch.ones(4)):
        with pytest.raises(RecipeError) as error:
            dequantized_state({"w.weight": q}, {"w.weight_scale_inv": scale})
        shape = " x ".join(map(str, scale.shape))
        assert str(error.value) == (
            f"FP8 checkpoint: the weight_scale_inv of w.weight is {shape}; "
            "its 256 x 129 weight has 2 x 2 blocks of 128 x 128"
        )
    with pytest.raises(
        RecipeError, match="^FP8 checkpoint: the tensor w.weight has 3 dimensions; FP8 weights have 2$"
    ):
        dequantized_state({"w.weight": q.view(2, 128, 129)}, {"w.weight_scale_inv": torch.ones(2, 2)})


def test_only_deepseek_v3_fp8_blocks_are_taken():
    assert not fp8_block_quantized(None, "m")
    assert fp8_block_quantized({"quant_method": "fp8", "weight_block_size": [128, 128]}, "m")
    with pytest.raises(RecipeError) as error:
        fp8_block_quantized({"quant_method": "fp8", "weight_block_size": None}, "model.path: m")
    assert str(error.value) == (
        "model.path: m is quantized (fp8, blocks []); training starts from BF16 or from FP8 in 128 x 128 blocks only"
    )
    with pytest.raises(RecipeError, match=r"^model\.path: m is quantized \(awq, blocks \[\]\)"):
        fp8_block_quantized({"quant_method": "awq"}, "model.path: m")


def test_a_run_starts_from_the_bf16_copy_of_an_fp8_export(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    src = save_tiny_checkpoint(tmp_path / "src", hidden_size=256, intermediate_size=384)
    export_fp8(src, tmp_path / "fp8")
    path = materialize(str(tmp_path / "fp8"), tmp_path / "run" / "init")
    assert path == str(tmp_path / "run" / "init")
    config = json.loads((tmp_path / "run" / "init" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert (tmp_path / "run" / "init" / "tokenizer.json").is_file()
    exported, copy = (
        load_file(str(tmp_path / "fp8" / "model.safetensors")),
        load_file(f"{path}/model.safetensors"),
    )
    assert sorted(copy) == sorted(name for name in exported if not name.endswith("weight_scale_inv"))
    name = "model.layers.0.mlp.down_proj.weight"
    assert exported[name].dtype == E4M3 and copy[name].dtype == torch.bfloat16
    assert torch.equal(copy[name], dequantized_state({name: exported[name]}, _scale(exported, name))[name])
    original = AutoModelForCausalLM.from_pretrained(src).model.layers[0].mlp.down_proj.weight.detach()
    assert (copy[name].float() - original).norm() / original.norm() < 0.05  # E4M3's rounding
    AutoModelForCausalLM.from_pretrained(path)
    assert materialize(str(src), tmp_path / "unused") == str(src)  # a BF16 folder is used where it is
    assert not (tmp_path / "unused").exists()


def _scale(state, name):
    scale = name.removesuffix("weight") + "weight_scale_inv"
    return {scale: state[scale]}


def test_the_copy_refuses_to_replace_the_folder_it_reads(tmp_path):
    src = save_tiny_checkpoint(tmp_path / "src", hidden_size=256, intermediate_size=384)
    export_fp8(src, tmp_path / "run" / "init")
    with pytest.raises(RecipeError, match=r"lies in .*run/init, where its BF16 copy goes"):
        write_bf16_copy(tmp_path / "run" / "init", tmp_path / "run" / "init")
    assert "quantization_config" in json.loads((tmp_path / "run" / "init" / "config.json").read_text())


def test_a_weight_is_scaled_by_its_scale_in_another_shard(tmp_path):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "fp8"
    src.mkdir()
    q = torch.tensor([[2.0, -4.0]]).to(E4M3)
    save_file({"a.weight": q, "b.weight_scale_inv": torch.tensor([[0.25]])}, str(src / "model-1.safetensors"))
    save_file({"b.weight": q, "a.weight_scale_inv": torch.tensor([[0.5]])}, str(src / "model-2.safetensors"))
    (src / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "fp8"}}))
    write_bf16_copy(src, tmp_path / "bf16")
    assert load_file(str(tmp_path / "bf16" / "model-1.safetensors"))["a.weight"].tolist() == [[1.0, -2.0]]
    assert load_file(str(tmp_path / "bf16" / "model-2.safetensors"))["b.weight"].tolist() == [[0.5, -1.0]]
    index = json.loads((tmp_path / "bf16" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {"a.weight": "model-1.safetensors", "b.weight": "model-2.safetensors"}


def test_an_e5m2_weight_dequantizes_too():
    q = torch.tensor([[3.0, -0.75]]).to(torch.float8_e5m2)
    state = dequantized_state({"w.weight": q}, {"w.weight_scale_inv": torch.tensor([[2.0]])})
    assert state["w.weight"].tolist() == [[6.0, -1.5]]


def test_an_fp8_weight_without_a_scale_is_an_error_not_a_silent_copy():
    with pytest.raises(RecipeError, match=r"^FP8 checkpoint: the tensor w\.weight has no weight_scale_inv$"):
        dequantized_state({"w.weight": torch.ones(1, 2).to(E4M3)}, {})


def test_a_rerun_keeps_the_copy_of_unchanged_files_and_remakes_it_after_a_change(tmp_path, monkeypatch):
    import os

    from grpo.models import fp8_dequantize

    src = tmp_path / "fp8"
    export_fp8(save_tiny_checkpoint(tmp_path / "bf16"), src)
    write_bf16_copy(src, tmp_path / "init")
    writes = []
    real = fp8_dequantize.rewrite_checkpoint
    monkeypatch.setattr(fp8_dequantize, "rewrite_checkpoint", lambda *args: writes.append(1) or real(*args))
    write_bf16_copy(src, tmp_path / "init")
    assert writes == []
    os.utime(src / "model.safetensors", ns=(0, 0))  # the source changed
    write_bf16_copy(src, tmp_path / "init")
    assert writes == [1]
    assert sorted(p.name for p in (tmp_path / "init").iterdir())[0] == ".fp8_source"


def test_the_copy_computes_what_transformers_computes_from_the_fp8_export(tmp_path):
    from transformers import AutoModelForCausalLM

    export_fp8(
        save_tiny_checkpoint(tmp_path / "bf16", hidden_size=256, intermediate_size=384), tmp_path / "fp8"
    )
    copy = write_bf16_copy(tmp_path / "fp8", tmp_path / "init")
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    ours = AutoModelForCausalLM.from_pretrained(copy)(ids).logits
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "fp8")(
        ids
    ).logits  # CPU: transformers dequantizes
    assert torch.equal(ours, theirs)


def test_only_the_shards_an_index_names_are_read(tmp_path):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "fp8"
    src.mkdir()
    q = torch.tensor([[2.0, -4.0]]).to(E4M3)
    save_file({"a.weight": q, "a.weight_scale_inv": torch.tensor([[0.5]])}, str(src / "model-1.safetensors"))
    save_file({"b.weight": torch.ones(1)}, str(src / "model-2.safetensors"))
    save_file({"stale.weight": torch.ones(1)}, str(src / "model.safetensors"))  # left by an earlier save
    weight_map = {"a.weight": "model-1.safetensors", "a.weight_scale_inv": "model-1.safetensors"}
    weight_map["b.weight"] = "model-2.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (src / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "fp8"}}))
    write_bf16_copy(src, tmp_path / "bf16")
    assert sorted(path.name for path in (tmp_path / "bf16").glob("*.safetensors")) == [
        "model-1.safetensors",
        "model-2.safetensors",
    ]
    assert load_file(str(tmp_path / "bf16" / "model-1.safetensors"))["a.weight"].tolist() == [[1.0, -2.0]]


def test_the_copy_s_size_is_read_off_the_headers_before_anything_is_written(tmp_path, monkeypatch):
    import shutil

    from safetensors.torch import load_file

    from grpo.models.fp8_dequantize import bf16_copy_bytes

    src = save_tiny_checkpoint(tmp_path / "src", hidden_size=256, intermediate_size=384)
    export_fp8(src, tmp_path / "fp8")
    copy = load_file(materialize(str(tmp_path / "fp8"), tmp_path / "a") + "/model.safetensors")
    needed = bf16_copy_bytes(tmp_path / "fp8")
    assert needed == sum(t.numel() * t.element_size() for t in copy.values())

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=needed - 1))
    with pytest.raises(RecipeError) as error:
        write_bf16_copy(tmp_path / "fp8", tmp_path / "run" / "init")
    assert str(error.value) == (
        f"{tmp_path}/run/init: the BF16 copy of the FP8 checkpoint {tmp_path}/fp8 needs "
        f"{needed / 1e9:.1f} GB, and its disk has {(needed - 1) / 1e9:.1f} GB free; "
        "free space there or choose a folder on a larger disk"
    )
    assert not (tmp_path / "run").exists()
    # what the folder holds is room: it is replaced
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "stale.bin").write_bytes(b"x")
    write_bf16_copy(tmp_path / "fp8", tmp_path / "b")
    assert not (tmp_path / "b" / "stale.bin").exists() and (tmp_path / "b" / "model.safetensors").is_file()


def test_a_shard_that_is_not_safetensors_is_named(tmp_path):
    src = save_tiny_checkpoint(tmp_path / "src", hidden_size=256, intermediate_size=384)
    export_fp8(src, tmp_path / "fp8")
    (tmp_path / "fp8" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(RecipeError, match=r"model\.safetensors is not a safetensors file \(Expecting value"):
        write_bf16_copy(tmp_path / "fp8", tmp_path / "run" / "init")
    for length, header, why in (
        (6, b"[1, 2]", "its header is not a JSON object"),
        (4096, b"{}", "a header of 4096 bytes"),  # longer than the file
    ):
        (tmp_path / "fp8" / "model.safetensors").write_bytes(length.to_bytes(8, "little") + header)
        with pytest.raises(RecipeError) as error:
            write_bf16_copy(tmp_path / "fp8", tmp_path / "run" / "init")
        assert str(error.value) == f"{tmp_path}/fp8/model.safetensors is not a safetensors file ({why})"
    assert not (tmp_path / "run").exists()
