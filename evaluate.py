"""Perplexity by token position and passkey retrieval of saved models: `python evaluate.py ...` in a checkout.

The implementation is ttt_lm/evaluate.py (installed: the ttt-evaluate console script); a top-level module named
`evaluate` would shadow Hugging Face's evaluate package where this project is installed.
"""

from ttt_lm.evaluate import main

if __name__ == "__main__":
    main()
