"""Deprecated alias of :mod:`modeling_mdm_prime.tools.image_metrics` (moved there); importing it warns."""

from ._deprecated import alias

alias(__name__)
