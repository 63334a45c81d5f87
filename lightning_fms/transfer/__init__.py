"""Transfer: a surrogate that learns from earlier studies (the paper's §4.2, as an explicit, reproducible step).

* :mod:`~lightning_fms.transfer.columns`: names of the encoded columns of a space, so that what was learned on one
  task's columns can be laid onto another's.
* :mod:`~lightning_fms.transfer.sources`: reading benchmark pools and finished study directories into per-task rows.
* :mod:`~lightning_fms.transfer.prior`: the prior file (one safetensors file with JSON metadata) and its checks.
* :mod:`~lightning_fms.transfer.lookahead`: pretraining a weight trunk on targets that look ahead.
* :mod:`~lightning_fms.transfer.meta_train`: training the surrogate's parameters by marginal likelihood over tasks.
* :mod:`~lightning_fms.transfer.apply`: starting a study's surrogate fits from a prior.
* :mod:`~lightning_fms.transfer.pretrain`: ``lightning-fms pretrain`` and its Python equivalent.
"""
