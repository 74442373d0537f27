"""The functional core: the method's maths over arrays and pytrees.

Nothing here knows a model, a config dataclass, a file format or the command line; every
public function takes arrays / pytrees and, where a network is involved, an
``apply_fn(params, batch)``. Modules: :mod:`~jax_ensemble.core.batch` (the batch schema),
:mod:`~jax_ensemble.core.losses`, :mod:`~jax_ensemble.core.linearize` (f_lin, projected
per-example gradients), :mod:`~jax_ensemble.core.projection` (seeded P, never stored),
:mod:`~jax_ensemble.core.solvers` (vmappable regressions), :mod:`~jax_ensemble.core.affinity`
(subsets, estimates, affinity), :mod:`~jax_ensemble.core.clustering` (SDP grouping),
:mod:`~jax_ensemble.core.ensemble` (weights, combination, boosting maths),
:mod:`~jax_ensemble.core.uncertainty` (ECE, NLL, Brier, AUROC),
:mod:`~jax_ensemble.core.statistics` (mean ± std and paired differences over seeds),
:mod:`~jax_ensemble.core.trees`.
"""
