# Copyright 2025 The starflow-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Tiny, randomly initialised components built in-process (no downloads), for tests."""

from typing import Dict, Iterable, Optional

import torch

from .models.transformer_starflow_v import StarFlowVTransformer
from .schedulers.scheduling_jacobi_flow import JacobiFlowScheduler
from .pipelines.prompt_template import TEMPLATE_WORDS
from .training.text import word_level_tokenizer

# the test prompts' words, then the template's (`format_prompt`'s lines and caption prefixes)
TINY_VOCABULARY = tuple(dict.fromkeys((
    "a an the video with fps image noise level in aspect ratio of and on is "
    "red green blue yellow white black circle square triangle moving left right up down background "
    "cat dog corgi running beach sunset at"
).split() + list(TEMPLATE_WORDS)))


def tiny_tokenizer(vocabulary: Iterable[str] = TINY_VOCABULARY):
    """A T5-style word-level tokenizer (pad 0, eos 1, unk 2) built in memory."""
    return word_level_tokenizer(vocabulary)


def tiny_text_encoder(vocab_size: int, d_model: int = 16, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()


def tiny_wan_vae(seed: int = 0):
    """A Wan2.2-style AutoencoderKLWan: 48 latent channels, 16x spatial and 4x temporal compression."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    return AutoencoderKLWan(
        base_dim=16, decoder_base_dim=16, z_dim=48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12, patch_size=2,
        scale_factor_spatial=16, scale_factor_temporal=4,
        latents_mean=(torch.randn(48, generator=generator) * 0.1).tolist(),
        latents_std=(1 + torch.rand(48, generator=generator)).tolist(),
    ).eval()


def tiny_transformer(
    in_channels: int = 48, text_embed_dim: int = 16, max_text_length: int = 16, seed: int = 0, **overrides
) -> StarFlowVTransformer:
    """A small video flow whose zero-initialised output projections are randomised, so it is not the identity."""
    config = dict(
        in_channels=in_channels, patch_size=1, num_layers_per_block=(1, 1, 2), shallow_width=32, deep_width=64,
        attention_head_dim=32, text_embed_dim=text_embed_dim, max_text_length=max_text_length, rope_base_size=2,
        denoiser_num_layers=2, denoiser_window=10, noise_std=0.5, trained_latent_frames=2, sample_size=2,
    )
    config.update(overrides)
    torch.manual_seed(seed)
    model = StarFlowVTransformer(**config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("proj_out.weight", "sos_embed")):
                param.normal_(std=0.05)
    return model.eval()


def tiny_pipeline_components(with_vae: bool = True, seed: int = 0) -> Dict[str, Optional[torch.nn.Module]]:
    tokenizer = tiny_tokenizer()
    return dict(
        transformer=tiny_transformer(in_channels=48 if with_vae else 3, seed=seed),
        scheduler=JacobiFlowScheduler(block_size=4, threshold=1e-4, max_iterations=16, context_frames=1),
        tokenizer=tokenizer,
        text_encoder=tiny_text_encoder(len(tokenizer), seed=seed),
        vae=tiny_wan_vae(seed) if with_vae else None,
    )


def tiny_pipeline(with_vae: bool = True, scheduler_kwargs: Optional[dict] = None, seed: int = 0, **overrides):
    """A tiny StarFlowVPipeline with its progress bar off. `scheduler_kwargs` change the scheduler's config;
    `overrides` replace components or set the pipeline's own arguments (e.g. `fps_conditioning`)."""
    from .pipelines.pipeline_starflow_v import StarFlowVPipeline

    components = tiny_pipeline_components(with_vae=with_vae, seed=seed)
    if scheduler_kwargs:
        components["scheduler"] = JacobiFlowScheduler.from_config(components["scheduler"].config, **scheduler_kwargs)
    components.update(overrides)
    pipe = StarFlowVPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_image_vae(seed: int = 0):
    """An SD-style AutoencoderKL: 4 latent channels, 2x spatial compression (2 ** (len(block_out_channels) - 1))."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1, latent_channels=4,
        norm_num_groups=4, sample_size=16, scaling_factor=0.5,
    ).eval()


def tiny_image_pipeline_components(with_vae: bool = True, seed: int = 0) -> Dict[str, Optional[torch.nn.Module]]:
    """Components of a tiny StarFlowPipeline: an image flow (no denoiser), T5, and an SD-style VAE or none."""
    tokenizer = tiny_tokenizer()
    transformer = tiny_transformer(
        in_channels=4 if with_vae else 3, is_video=False, shallow_blocks_per_frame=False, denoiser_num_layers=0,
        trained_latent_frames=None, noise_std=0.3, sample_size=4, seed=seed,
    )
    return dict(
        transformer=transformer,
        scheduler=JacobiFlowScheduler(block_size=16, threshold=1e-4, max_iterations=16),
        tokenizer=tokenizer,
        text_encoder=tiny_text_encoder(len(tokenizer), seed=seed),
        vae=tiny_image_vae(seed) if with_vae else None,
    )
