"""The names a trial's MLflow run carries: its params and metrics, and the Trial <-> params
round trip.

Keys are the same in every run so MLflow's Compare view lines them up. Writers (the stages,
`orchestrator.tracking`) and readers (`orchestrator.report`) use these names, never literals.
"""

from __future__ import annotations

# What the metrics stage writes for every trial (the same keys everywhere, for MLflow's Compare).
METRIC_KEYS = (
    "fid",
    "fid_model",
    "fid_reference",
    "precision",
    "recall",
    "stability_similarity",
    "stability_unrelated",
    "stability_similarity_centred",
    "stability_unrelated_centred",
    "speedup",
    "flop_speedup",
    "train_time_s",
    "sample_time_s",
    "subset_size",
    "labels_used",
)
# Coarse-to-fine trials also log this: their pair's automatically chosen t_split
# (lfm_core.coarse_to_fine.choose_t_split).
CHOSEN_T_SPLIT = "t_split_chosen"
