"""SeMem: a selective kNN-LM memory on a persistent datastore (tensorstore + ScaNN / exact JAX search)."""

from jaxcl.memory.knnlm import knn_lm_logprobs, knn_lm_target_logprobs, knn_neighbor_logweights, mix_logprobs

__all__ = ["knn_lm_logprobs", "knn_lm_target_logprobs", "knn_neighbor_logweights", "mix_logprobs"]
