from .._imports import quiet_third_party_import


with quiet_third_party_import():
    from .pipeline_starflow import StarFlowPipeline
    from .pipeline_output import StarFlowVInversionOutput, StarFlowVPipelineOutput
    from .pipeline_starflow_v import StarFlowVPipeline
    from .pipeline_starflow_v_i2v import StarFlowVImageToVideoPipeline
    from .pipeline_starflow_v_v2v import StarFlowVVideoToVideoPipeline
