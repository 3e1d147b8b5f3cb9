"""Shared by the parametrization plug-ins (not plug-ins): the Parametrization base, how it is
applied to a model, the init report and the coordinate check."""
