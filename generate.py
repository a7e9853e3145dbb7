"""Text from a saved model, streamed as it is generated: `python generate.py ...` in a checkout.

The implementation is ttt_lm/generate.py (installed: the ttt-generate console script), kept out of the top-level
module names where this project is installed.
"""

from ttt_lm.generate import main

if __name__ == "__main__":
    main()
