"""Deprecated alias of :mod:`modeling_mdm_prime.tools.lm_eval_adapter` (moved there); importing it warns.
``python -m modeling_mdm_prime.lm_eval_adapter`` still runs lm-eval's CLI with ``mdm_prime`` registered."""

if __name__ == "__main__":
    from modeling_mdm_prime.tools.lm_eval_adapter import main

    main()
else:
    from ._deprecated import alias

    alias(__name__)
