"""orchestrator: runs lfm_core at scale.

Sweep files (YAML) become typed configs (`config`), a stage graph whose outputs are cached by the
hash of their inputs (`stages`, `cache`, `storage`), flow-matching training on Ray Train
(`ray_train`), sweeps on Ray Tune (`sweep`), MLflow tracking (`tracking`) and the `lfm` CLI
(`cli`).
"""
