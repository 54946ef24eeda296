"""Old module paths of the tools (before they moved to :mod:`modeling_mdm_prime.tools`), kept as aliases for one
release. Not shipped as remote code."""

import importlib
import sys
import warnings

MOVED = {
    "hub": "modeling_mdm_prime.tools",
    "convert": "modeling_mdm_prime.tools.convert",
    "data": "modeling_mdm_prime.tools.data",
    "image_data": "modeling_mdm_prime.tools.image_data",
    "image_metrics": "modeling_mdm_prime.tools.image_metrics",
    "lm_eval_adapter": "modeling_mdm_prime.tools.lm_eval_adapter",
    "training": "modeling_mdm_prime.tools.training",
}


def alias(old: str) -> None:
    """Make the module ``old`` (``modeling_mdm_prime.<name>``) the module it moved to, with a DeprecationWarning."""
    new = MOVED[old.rsplit(".", 1)[-1]]
    warnings.warn(f"{old} moved to {new}; import it from there (the old path will be removed).", DeprecationWarning, 3)
    sys.modules[old] = importlib.import_module(new)
