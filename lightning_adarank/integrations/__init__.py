"""Lightning and Fabric integration: the strategies (:mod:`.strategy`), the callbacks that swap the optimizer
(:mod:`.optimizer_callbacks`), the monitors (:mod:`.monitors`) and Fabric helpers (:mod:`.fabric`). Importing :mod:`.strategy` registers the ``adarank*`` strategy names."""
