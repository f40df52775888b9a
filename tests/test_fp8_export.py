import json

import pytest
import torch

from grpo.cli import main
from grpo.models.fp8 import E4M3, quantize_blocks
from grpo.models.fp8_export import QUANTIZATION_CONFIG, export_fp8, fp8_state, high_precision_linears
from grpo.models.tiny import save_tiny_checkpoint


def test_linear_weights_become_e4m3_with_block_scales_and_the_rest_stays_high_precision():
    weight = torch.randn(256, 384)
    original = {
        "model.layers.0.self_attn.o_proj.weight": weight,
        "model.layers.1.mlp.experts.3.down_proj.weight": torch.randn(128, 128),
        "model.embed_tokens.weight": torch.randn(10, 256),
        "lm_head.weight": torch.randn(10, 256),
        "model.layers.1.mlp.gate.weight": torch.randn(8, 256),
        "model.layers.1.mlp.gate.e_score_correction_bias": torch.randn(8),
        "model.norm.weight": torch.randn(256),
        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight": torch.randn(576, 256),
    }
    kept = high_precision_linears({name: tuple(t.shape) for name, t in original.items()})
    assert kept == ["model.layers.0.self_attn.kv_a_proj_with_mqa"]
    state = fp8_state(original, set(kept))
    q, scale = (
        state["model.layers.0.self_attn.o_proj.weight"],
        state["model.layers.0.self_attn.o_proj.weight_scale_inv"],
    )
    assert q.dtype == E4M3 and q.shape == (256, 384)
    assert scale.dtype == torch.float32 and scale.shape == (2, 3)
    expected_q, expected_scale = quantize_blocks(weight)
    assert torch.equal(scale, expected_scale) and torch.equal(
        q.view(torch.uint8), expected_q.view(torch.uint8)
    )
    assert state["model.layers.1.mlp.experts.3.down_proj.weight"].dtype == E4M3
    for name in (
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.layers.1.mlp.gate.weight",
        "model.norm.weight",
    ):
        assert (
            state[name].dtype == torch.bfloat16
            and name.removesuffix("weight") + "weight_scale_inv" not in state
        )
    assert state["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert state["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"].dtype == torch.bfloat16  # 576 rows


def test_a_projection_that_vllm_fuses_with_a_ragged_one_stays_bf16_too():
    shapes = {
        "model.layers.0.self_attn.q_a_proj.weight": (512, 1024),
        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight": (576, 1024),
        "model.layers.0.self_attn.o_proj.weight": (1024, 1024),
        "model.layers.0.mlp.gate_proj.weight": (2816, 1024),
        "model.layers.0.mlp.up_proj.weight": (2816, 1024),
        "model.layers.1.mlp.experts.0.gate_proj.weight": (200, 1024),
        "model.layers.1.mlp.experts.0.up_proj.weight": (200, 1024),
    }
    assert high_precision_linears(shapes) == [
        "model.layers.0.self_attn.kv_a_proj_with_mqa",
        "model.layers.0.self_attn.q_a_proj",
        "model.layers.1.mlp.experts.0.gate_proj",
        "model.layers.1.mlp.experts.0.up_proj",
    ]


def test_kept_parts_stay_bf16_with_the_projections_vllm_fuses_with_them():
    shapes = {
        "model.layers.0.self_attn.q_a_proj.weight": (512, 1024),
        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight": (640, 1024),
        "model.layers.0.self_attn.o_proj.weight": (1024, 1024),
        "model.layers.0.mlp.gate_proj.weight": (2816, 1024),
        "model.layers.0.mlp.up_proj.weight": (2816, 1024),
        "model.layers.1.mlp.gate_proj.weight": (2816, 1024),
    }
    assert high_precision_linears(shapes, ["o_proj", "layers.0.mlp.up_proj", "q_a_proj"]) == [
        "model.layers.0.mlp.gate_proj",
        "model.layers.0.mlp.up_proj",
        "model.layers.0.self_attn.kv_a_proj_with_mqa",
        "model.layers.0.self_attn.o_proj",
        "model.layers.0.self_attn.q_a_proj",
    ]


def test_export_refuses_a_kept_part_that_names_no_quantized_weight(tmp_path, capsys):
    src = save_tiny_checkpoint(tmp_path / "src")
    capsys.readouterr()  # transformers' progress bar writing the checkpoint
    assert main(["export-fp8", str(src), str(tmp_path / "out"), "--keep", "self_atn"]) == 2
    assert capsys.readouterr().err.strip() == (
        "grpo export-fp8: error: kept part 'self_atn' names no weight the export would quantize"
    )
    assert not (tmp_path / "out").exists()


def test_export_keeps_what_the_recipe_excludes_from_fp8(tmp_path, capsys):
    src = save_tiny_checkpoint(tmp_path / "src")
    recipe = tmp_path / "config.yaml"
    recipe.write_text("model:\n  path: tiny:deepseek_v3\n  fp8: true\n  fp8_exclude: [o_proj]\n")
    capsys.readouterr()  # transformers' progress bar writing the checkpoint
    assert main(["export-fp8", str(src), str(tmp_path / "out"), "--recipe", str(recipe)]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    kept = [name for name in config["quantization_config"]["modules_to_not_convert"] if "o_proj" in name]
    assert kept == [f"model.layers.{layer}.self_attn.o_proj" for layer in range(3)]


@pytest.mark.parametrize("keep", [(), ("self_attn",)])
def test_transformers_loads_the_export(tmp_path, keep):
    from transformers import AutoModelForCausalLM

    src = save_tiny_checkpoint(tmp_path / "src", hidden_size=256, intermediate_size=384)
    counts = export_fp8(src, tmp_path / "fp8", keep)
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert config["quantization_config"].items() >= QUANTIZATION_CONFIG.items()
    not_converted = config["quantization_config"]["modules_to_not_convert"]
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa" in not_converted
    assert ("model.layers.2.self_attn.o_proj" in not_converted) == bool(keep)
    assert counts["fp8"] > 0 and (tmp_path / "fp8" / "tokenizer.json").is_file()
    original = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "fp8")  # CPU: transformers dequantizes
    ids = torch.tensor([[1, 20, 30, 40, 50, 60]])
    reference, logits = original(ids).logits.float(), exported(ids).logits.float()
    assert (logits - reference).norm() / reference.norm() < 0.1


def test_export_refuses_a_folder_that_is_not_a_checkpoint(tmp_path, capsys):
    assert main(["export-fp8", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "is not a Hugging Face checkpoint folder" in capsys.readouterr().err


def _files(folder) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir()}


def test_export_refuses_to_write_into_its_own_source(tmp_path, capsys):
    src = save_tiny_checkpoint(tmp_path / "src")
    before = _files(src)
    capsys.readouterr()  # transformers' progress bar writing the checkpoint
    assert main(["export-fp8", str(src), str(src)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"grpo export-fp8: error: export-fp8: {src} exists and is not an empty folder; give a new one"
    )
    assert _files(src) == before


def test_export_refuses_a_folder_holding_files_and_fills_an_empty_one(tmp_path):
    src = save_tiny_checkpoint(tmp_path / "src")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="full exists and is not an empty folder"):
        export_fp8(src, tmp_path / "full")
    assert _files(tmp_path / "full") == {"config.json": b"{}"}
    (tmp_path / "empty").mkdir()
    export_fp8(src, tmp_path / "empty")
    assert "quantization_config" in json.loads((tmp_path / "empty" / "config.json").read_text())


def test_a_failed_export_leaves_no_folder_behind(tmp_path, monkeypatch):
    from grpo.models import fp8_export

    src = save_tiny_checkpoint(tmp_path / "src")

    def fail(state, kept):
        raise OSError("disk full")

    monkeypatch.setattr(fp8_export, "fp8_state", fail)
    with pytest.raises(OSError, match="disk full"):
        export_fp8(src, tmp_path / "out")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["src"]


def test_export_into_a_place_it_cannot_write_exits_2(tmp_path, capsys):
    src = save_tiny_checkpoint(tmp_path / "src")
    (tmp_path / "a-file").write_text("")
    capsys.readouterr()  # transformers' progress bar writing the checkpoint
    assert main(["export-fp8", str(src), str(tmp_path / "a-file" / "out")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"grpo export-fp8: error: export-fp8: DST: cannot create {tmp_path}/a-file (File exists)"
    )


def test_the_export_s_size_is_read_off_the_headers_and_checked_before_writing(tmp_path, monkeypatch, capsys):
    import shutil

    from safetensors.torch import load_file

    from grpo.models.checkpoint_rewrite import header
    from grpo.models.fp8_export import export_bytes

    src = save_tiny_checkpoint(tmp_path / "src", hidden_size=256, intermediate_size=384)
    export_fp8(src, tmp_path / "fp8")
    kept = json.loads((tmp_path / "fp8" / "config.json").read_text())["quantization_config"]["ignored_layers"]
    headers = header(src / "model.safetensors")
    del headers["__metadata__"]
    needed = export_bytes(headers, set(kept))
    written = load_file(str(tmp_path / "fp8" / "model.safetensors"))
    assert needed == sum(t.numel() * t.element_size() for t in written.values())

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=needed - 1))
    capsys.readouterr()  # transformers' progress bar writing the checkpoint
    assert main(["export-fp8", str(src), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"grpo export-fp8: error: {tmp_path}/out: the FP8 export of {src} needs {needed / 1e9:.1f} GB, "
        f"and its disk has {(needed - 1) / 1e9:.1f} GB free; free space there or choose a folder on a larger disk"
    )
    assert not (tmp_path / "out").exists()
