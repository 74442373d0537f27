"""The cached, resumable steps of the main job and of the research commands.

In data-flow order: :mod:`~jax_ensemble.stages.model` (load once, sanity check),
:mod:`~jax_ensemble.stages.gradients` (G, f0 shards), :mod:`~jax_ensemble.stages.grouping`
(subset estimates, affinity, SDP groups), :mod:`~jax_ensemble.stages.adapters` (one
adapter per task set), :mod:`~jax_ensemble.stages.ensemble` (stacked inference,
boosting), :mod:`~jax_ensemble.stages.zero_shot` and :mod:`~jax_ensemble.stages.accounting`
(evaluation, FLOPs, memory). Research commands: :mod:`~jax_ensemble.stages.train_tasks`
(``train``), :mod:`~jax_ensemble.stages.uq`, :mod:`~jax_ensemble.stages.estimate_validation`,
:mod:`~jax_ensemble.stages.linearization_study`.
"""
