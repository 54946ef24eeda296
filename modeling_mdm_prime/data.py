"""Deprecated alias of :mod:`modeling_mdm_prime.tools.data` (moved there); importing it warns."""

from ._deprecated import alias

alias(__name__)
