from .._imports import quiet_third_party_import


with quiet_third_party_import():
    from .lora_pipeline import StarFlowVLoraLoaderMixin
