"""The optimizer layer, pure PyTorch: the math on tensors (:mod:`.linalg`), the settings (:mod:`.config`) and the
checks of user parameter groups (:mod:`.group_checks`), the optimizer (:mod:`.optimizer`), which weights are
projected (:mod:`.targets`), the layer-wise mode
(:mod:`.layerwise`) and the peer optimizers used for comparisons (:mod:`.baselines`)."""
