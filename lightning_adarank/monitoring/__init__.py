"""What the monitors compute and plot, with no Lightning in it: rank and memory figures, the rank history
(:mod:`.history`) and its plot (:mod:`.plotting`). Shared by the Lightning callbacks and Fabric."""
