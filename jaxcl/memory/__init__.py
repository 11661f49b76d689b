"""SeMem: a selective kNN-LM memory on a persistent datastore (tensorstore + ScaNN / exact JAX search)."""

from jaxcl.memory.knnlm import knn_lm_logprobs, knn_lm_target_logprobs, knn_neighbor_logweights, mix_logprobs

__all__ = ["knn_lm_logprobs", "knn_lm_target_logprobs", "knn_neighbor_logweights", "mix_logprobs"]
from jaxcl.memory.datastore import Datastore, DatastoreError, params_fingerprint  # noqa: E402
from jaxcl.memory.index import ExactIndex, ScannIndex, ScannOptions, scann_available  # noqa: E402

__all__ += ["Datastore", "DatastoreError", "params_fingerprint", "ExactIndex", "ScannIndex", "ScannOptions",
            "scann_available"]
