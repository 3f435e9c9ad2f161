"""``python -m eellm_hf.eval``: the same as ``eellm-eval``."""

from eellm_hf.eval.cli import main

if __name__ == "__main__":
    main()
