"""The commands of this toolkit that would clash with other packages as top-level modules (Hugging Face's
`evaluate`): their implementations, installed as `ttt_lm.*` with the console scripts ttt-evaluate, ttt-generate and
ttt-plot-metrics; in a checkout, `python evaluate.py` (generate.py, plot_metrics.py) at the root runs the same."""
