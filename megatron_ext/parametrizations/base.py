"""Base class of parametrization plug-ins."""
from typing import Dict


class Parametrization:
    def __init__(self, args):
        self.args = args

    def configure_model(self, config_kwargs: Dict) -> Dict:
        """Adjust the keyword arguments of megatron-core's TransformerConfig; return them."""
        return config_kwargs

    def group_options(self, role: str) -> Dict[str, float]:
        """Per-role param-group options, e.g. ``{"lr_mult": 0.5}``."""
        return {}

    @staticmethod
    def validate_args(args) -> None:
        """Raise ValueError (one line naming the flag) for settings this plug-in cannot serve."""
