# Copyright 2025 The starflow-diffusers authors. Licensed under the Apache License, Version 2.0.
"""The prompt template the released STARFlow / STARFlow-V models were trained with (spec section 6), and
the caption prefixes of their extension and video-to-video training, in one place. The pipelines, the
trainers and the tests take them from here.

    Noise Level 500:
    A video with 16 fps:
    <prompt>

     in a 16:9 aspect ratio.

Which lines appear is the pipeline's config (`fps_conditioning`, `noise_level_conditioning`,
`aspect_ratio_conditioning`); images get "An image:" instead of the fps line when fps is 0.
"""

from typing import Optional


# The first latent frame was dropped in training (image-to-video, extension): the caption says so.
EXTEND_CAPTION_PREFIX = "(extend) "
# Checkpoints trained for video-to-video continuation.
V2V_CAPTION_PREFIX = "(v2v) "

# Every word and symbol the template and the prefixes add (digits aside), for word-level vocabularies: a
# tokenizer built for a small domain must still read them. Its order fixes token ids: append, never reorder.
# ("v2v" is split around its digit by the word-level tokenizer, hence the "v".)
TEMPLATE_WORDS = (
    "a", "an", "video", "with", "fps", "image", "noise", "level", "in", "aspect", "ratio", "extend", "v2v", "(", ")",
    ".", "v",
)


def format_prompt(
    prompt: str, fps: Optional[int] = None, noise_level: Optional[float] = None, aspect_ratio: Optional[str] = None
) -> str:
    """`prompt` in the template: the fps line when `fps` is given (0 for an image), the noise-level line when
    `noise_level` (sigma) is given, the aspect-ratio line when `aspect_ratio` is, in the trained order."""
    text = prompt
    if fps is not None:
        text = f"A video with {fps} fps:\n{text}\n" if fps > 0 else f"An image:\n{text}\n"
    if noise_level is not None:
        text = f"Noise Level {int(noise_level * 1000)}:\n{text}"
    if aspect_ratio is not None:
        text = f"{text}\n in a {aspect_ratio} aspect ratio.\n"
    return text
