from .._imports import lazy_exports


# The written dtypes by their command-line names (torch's names as values) and the default shard size: here,
# free of torch, so that `starflow-convert --help` and its argument errors need no torch.
TORCH_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DEFAULT_MAX_SHARD_SIZE = "5GB"

# Lazy, so that `starflow-convert --help` needs no torch.
__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "convert_starflow": [
            "ConversionError",
            "convert_original_checkpoint",
            "convert_state_dict",
            "load_original_config",
            "load_original_state_dict",
            "pipeline_config_from_original",
            "transformer_config_from_original",
        ],
        "writer": [
            "convert_checkpoint_to_folder",
            "convert_checkpoint_to_pipeline_folder",
            "staged_output_directory",
            "write_transformer_folder",
        ],
    },
)
