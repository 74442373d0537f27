"""Files: atomic writes (:mod:`~jax_ensemble.storage.atomic`) and artifacts fetched from the
package index into the cache (:mod:`~jax_ensemble.storage.packages`)."""
