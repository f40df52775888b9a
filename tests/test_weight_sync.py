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
@pytest.mark.parametrize("same_card", [True, False])
def test_gpu_weights_stay_on_the_card_only_when_the_engines_share_it(same_card):
    writer = SharedWeightsWriter(tag=f"test-card-{same_card}", same_card=same_card)
    try:
        weights = {"w": torch.tensor([[1.5, -2.25]], dtype=torch.bfloat16, device="cuda")}
        manifest = writer.publish(weights.items())
        read = dict(read_manifest(manifest))["w"]
        assert bool(manifest.cuda_ipc) == same_card
        assert read.device.type == ("cuda" if same_card else "cpu")
        assert torch.equal(read.cpu(), weights["w"].cpu())
    finally:
        writer.close()
