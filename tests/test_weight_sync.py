import pytest
import torch

from grpo.rollout.weight_sync import SharedWeightsWriter, read_manifest


def test_tensors_of_mixed_dtypes_round_trip_through_the_shared_buffer():
    writer = SharedWeightsWriter(tag="test-mixed")
    try:
        weights = {
            "layer.weight": torch.tensor([[1.5, -2.25], [3.0, 0.1]], dtype=torch.bfloat16),
            "gate.e_score_correction_bias": torch.tensor([0.1234567, -1e-7]),  # FP32 must stay FP32
            "norm.weight": torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16),
        }
        manifest = writer.publish(weights.items())
        assert [entry[2] for entry in manifest.entries] == ["bfloat16", "float32", "bfloat16"]
        assert all(entry[3] % 64 == 0 for entry in manifest.entries)
        read = dict(read_manifest(manifest))
        assert all(
            torch.equal(read[name], tensor) and read[name].dtype == tensor.dtype
            for name, tensor in weights.items()
        )

        weights["layer.weight"] = weights["layer.weight"] * 2  # a later publish rewrites in place
        second = writer.publish(weights.items())
        assert second.version == 2 and second.entries == manifest.entries
        assert torch.equal(dict(read_manifest(second))["layer.weight"], weights["layer.weight"])
    finally:
        writer.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_weights_go_through_host_memory_unless_the_engines_share_the_card():
    weights = {"w": torch.tensor([[1.5, -2.25]], dtype=torch.bfloat16, device="cuda")}
    apart, together = SharedWeightsWriter("test-apart", same_card=False), SharedWeightsWriter("test-together")
    try:
        manifest = apart.publish(weights.items())
        read = dict(read_manifest(manifest))["w"]
        assert manifest.cuda_ipc == b"" and read.device.type == "cpu"
        assert torch.equal(read, weights["w"].cpu())
        # CUDA refuses to open a handle in the process that exported it: the engine's side is not run here
        assert together.publish(weights.items()).cuda_ipc != b""
    finally:
        apart.close()
        together.close()
