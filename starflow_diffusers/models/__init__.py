from .._imports import quiet_third_party_import


with quiet_third_party_import():
    from .transformer_starflow_v import StarFlowKVCache, StarFlowVTransformer, StarFlowVTransformerOutput
