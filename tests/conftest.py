"""Test-wide settings: the tiny models of this suite run fastest on one thread (thread start-up dominates)."""

import pytest
import torch


torch.set_num_threads(1)


@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory):
    """A saved tiny pixel-space pipeline and a folder of 16 synthetic training clips, for the LoRA trainer's
    multi-process tests: (model folder, clip folder)."""
    from starflow_diffusers import StarFlowVPipeline
    from starflow_diffusers.testing_utils import tiny_pipeline_components, tiny_transformer
    from starflow_diffusers.training import synthetic

    components = tiny_pipeline_components(with_vae=False)
    components["transformer"] = tiny_transformer(
        in_channels=3, patch_size=4, sample_size=8, trained_latent_frames=9, max_text_length=24
    )
    model_dir = tmp_path_factory.mktemp("tiny_model")
    StarFlowVPipeline(**components, fps_conditioning=False, aspect_ratio_conditioning=False).save_pretrained(model_dir)
    data_dir = tmp_path_factory.mktemp("shapes") / "data"
    synthetic.write_dataset(str(data_dir), num_train=16, num_test=4, size=32, num_frames=9)
    return str(model_dir), str(data_dir / "train")
