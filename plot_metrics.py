"""Training curves of runs as PNG figures: `python plot_metrics.py ...` in a checkout.

The implementation is ttt_lm/plot_metrics.py (installed: the ttt-plot-metrics console script), kept out of the
top-level module names where this project is installed.
"""

from ttt_lm.plot_metrics import main

if __name__ == "__main__":
    main()
