"""The optimizer layer, pure PyTorch: the math on tensors (:mod:`.linalg`), settings (:mod:`.settings`),
the optimizer (:mod:`.optimizer`), parameter selection (:mod:`.groups`), the layer-wise mode
(:mod:`.layerwise`) and the peer optimizers used for comparisons (:mod:`.baselines`)."""
