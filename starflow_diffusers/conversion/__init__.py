from .convert_starflow import (
    ConversionError,
    convert_original_checkpoint,
    convert_state_dict,
    load_original_config,
    load_original_state_dict,
    pipeline_config_from_original,
    transformer_config_from_original,
)
from .writer import (
    convert_checkpoint_to_folder,
    convert_checkpoint_to_pipeline_folder,
    staged_output_directory,
    write_transformer_folder,
)
