"""Lightning and Fabric integration: the strategy (:mod:`.strategy`), the callbacks (:mod:`.callbacks`) and
Fabric helpers (:mod:`.fabric`). Importing :mod:`.strategy` registers the ``adarank*`` strategy names."""
