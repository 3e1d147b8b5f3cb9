"""Shared by the optimizer plug-ins (not plug-ins): param grouping, the optimizer hook protocol the
trainer calls, the hybrid matrix-optimizer base, whole matrices under ZeRO/TP, flag checks."""
