"""compel-weighted prompts reach the pipeline through `prompt_embeds`, as docs/text_to_video.md shows."""

import pytest
import torch

compel = pytest.importorskip("compel")

from starflow_diffusers.testing_utils import tiny_pipeline


def test_compel_weighted_prompt_embeds_drive_the_pipeline():
    pipe = tiny_pipeline()
    pipe.tokenizer.model_max_length = pipe.text_length
    builder = compel.Compel(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder)
    template = dict(fps=16, aspect_ratio="1:1")
    negative = builder(pipe.apply_prompt_template([""], **template))

    def run(prompt):
        embeds = builder(pipe.apply_prompt_template([prompt], **template))
        assert embeds.shape == (1, pipe.text_length, pipe.transformer.config.text_embed_dim)
        return pipe(
            prompt_embeds=embeds, negative_prompt_embeds=negative, height=32, width=32, num_frames=5,
            aspect_ratio="1:1", generator=torch.Generator().manual_seed(0), output_type="latent",
        ).frames

    plain, weighted = run("a red circle moving left"), run("a (red)1.5 circle moving left")
    assert torch.isfinite(plain).all() and plain.shape == weighted.shape
    assert not torch.allclose(plain, weighted)


def test_prompt_embeds_of_the_wrong_length_are_rejected():
    pipe = tiny_pipeline()
    embeds = torch.zeros(1, pipe.text_length + 3, pipe.transformer.config.text_embed_dim)
    with pytest.raises(ValueError, match="prompt_embeds"):
        pipe(prompt_embeds=embeds, guidance_scale=1.0, height=32, width=32, num_frames=5)
