# Copyright 2025 The starflow-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Text components built from scratch, with no download: a word-level tokenizer over a closed vocabulary and
a small randomly initialised T5 encoder. A model trained from scratch on a small domain (the synthetic
shapes world) needs no pretrained language model: the flow learns to read the frozen random embeddings,
which keep words (and, through the deep block's rotary positions, their order) apart."""

from typing import Iterable

import torch


def word_level_tokenizer(vocabulary: Iterable[str]):
    """A T5-style word-level tokenizer (pad 0, eos 1, unk 2), lower-casing, digits split one by one."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in vocabulary:
        vocab.setdefault(word.lower(), len(vocab))
    for digit in "0123456789:":
        vocab.setdefault(digit, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def t5_encoder_from_scratch(
    vocab_size: int,
    d_model: int = 16,
    d_kv: int = 8,
    d_ff: int = 32,
    num_layers: int = 1,
    num_heads: int = 2,
    seed: int = 0,
):
    """A randomly initialised `T5EncoderModel` in eval mode; `seed` makes it reproducible."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=num_layers, num_heads=num_heads,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return T5EncoderModel(config).eval()
