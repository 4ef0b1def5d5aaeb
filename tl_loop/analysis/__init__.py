"""Analyses of looped models: fixed points, cycles, attention stabilisation, stages of inference.

Every metric is a free function over tensors shaped ``[step, layer_in_cycle, ...]`` (what
``LoopedActivationCache.stack_loop`` returns) or over the cache itself; the functions that need
more steps than a cache holds take ``(model, tokens)`` and stream. One module per concern:

=======================  ==================================================================
module                   what it measures
=======================  ==================================================================
``convergence``          step-to-step distance per layer of the cycle, distance to the last
                         step or a reference, convergence step under a tolerance
``trajectory``           cycle of distinct fixed points vs one point, period of a sequence,
                         PCA projection of a token's trajectory
``attention``            per-head distance between consecutive steps, entropy, sink and
                         previous-token mass, the step each head stabilises
``paper_metrics``        the seed paper's ColSum concentration, sink score / rate, mixing
                         score, residual matrix entropy, Frobenius distances across steps
``fixed_points``         approximate fixed points (state after many steps), distance to them,
                         degenerate-fixed-point check, limiting-behaviour classification
``stages``               logit-lens stages of inference along effective depth (looped and
                         feedforward TransformerLens models)
``streaming``            reducers computing the above inside forward hooks, without a cache
=======================  ==================================================================

Figures for each analysis are in ``tl_loop.plot``.

>>> import torch
>>> from tl_loop import LoopedConfig, HookedLoopedTransformer
>>> from tl_loop import analysis
>>> cfg = LoopedConfig(d_model=16, d_head=4, d_vocab=20, n_core_layers=2, n_steps=6)
>>> _, cache = HookedLoopedTransformer(cfg, seed=0).run_with_cache(torch.tensor([[1, 2, 3]]))
>>> analysis.step_distances(cache).shape, analysis.attention_stabilisation(cache).sink.shape
(torch.Size([5, 2]), torch.Size([6, 2, 4]))
"""

from tl_loop.analysis._common import METRICS, Metric, cosine_similarity, loop_states, vector_distance
from tl_loop.analysis.attention import (
    AttentionStabilisation,
    attention_stabilisation,
    head_patterns_across_steps,
    pattern_distance,
    previous_token_mass,
)
from tl_loop.analysis.convergence import (
    ResidualStreamStats,
    convergence_step,
    convergence_steps,
    distance_to_final,
    distance_to_reference,
    residual_stats,
    step_distances,
)
from tl_loop.analysis.fixed_points import (
    LIMITING_CLASSES,
    DegeneracyCheck,
    LimitingBehaviour,
    approximate_fixed_points,
    classify_limiting_behaviour,
    cosine_to_final,
    degenerate_fixed_point,
    distance_to_fixed_point,
    limiting_behaviour,
)
from tl_loop.analysis.paper_metrics import (
    attention_frobenius_distances,
    colsum_concentration,
    matrix_entropy,
    mixing_score,
    row_entropy,
    sink_rate,
    sink_score,
)
from tl_loop.analysis.stages import InferenceStages, inference_stages, logit_lens
from tl_loop.analysis.streaming import (
    AttentionStats,
    DistanceToReference,
    HeadPatterns,
    InferenceStagesReducer,
    LayerStates,
    Reducer,
    ResidualStats,
    run_streaming,
    streaming_inference_stages,
)
from tl_loop.analysis.trajectory import (
    CycleDistances,
    PCAProjection,
    cycle_distances,
    cycle_structure,
    detect_period,
    pca_trajectory,
    token_trajectory,
)

__all__ = [
    # shared
    "Metric",
    "METRICS",
    "vector_distance",
    "cosine_similarity",
    "loop_states",
    # convergence
    "step_distances",
    "distance_to_final",
    "distance_to_reference",
    "convergence_step",
    "convergence_steps",
    "residual_stats",
    "ResidualStreamStats",
    # trajectory
    "cycle_distances",
    "cycle_structure",
    "CycleDistances",
    "detect_period",
    "pca_trajectory",
    "PCAProjection",
    "token_trajectory",
    # attention
    "attention_stabilisation",
    "AttentionStabilisation",
    "pattern_distance",
    "previous_token_mass",
    "head_patterns_across_steps",
    # paper measures
    "colsum_concentration",
    "sink_score",
    "sink_rate",
    "mixing_score",
    "row_entropy",
    "matrix_entropy",
    "attention_frobenius_distances",
    # fixed points
    "approximate_fixed_points",
    "distance_to_fixed_point",
    "degenerate_fixed_point",
    "DegeneracyCheck",
    "cosine_to_final",
    "classify_limiting_behaviour",
    "limiting_behaviour",
    "LimitingBehaviour",
    "LIMITING_CLASSES",
    # stages of inference
    "inference_stages",
    "InferenceStages",
    "logit_lens",
    "streaming_inference_stages",
    # streaming
    "run_streaming",
    "Reducer",
    "ResidualStats",
    "AttentionStats",
    "DistanceToReference",
    "LayerStates",
    "HeadPatterns",
    "InferenceStagesReducer",
]
