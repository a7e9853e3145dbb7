"""Plots of a training run's metrics.jsonl as PNG files in the run folder (or --output_dir):

    python plot_metrics.py outputs/ttt-tiny [outputs/other-run ...]

training_curves.png: train and eval loss, learning rate and tokens/s against the step, one line per run;
ttt_statistics.png (TTT runs): per layer, the inner reconstruction loss of each mini-batch's last token under
W_0, before and after its mini-batch's update (logged at every eval step), against the step; a layer whose
last-token position factor is clamped to 0 (its inner weights carry nothing across mini-batches) is titled in red.
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from ttt_train import cli
from ttt_train.metrics import METRICS_FILE, parse_line


def read_metrics(run: Path) -> list:
    path = run / METRICS_FILE
    if not path.is_file():
        raise cli.UserError(f"{path} does not exist (is {run} a training output_dir?)")
    records = {}
    for record in filter(None, map(parse_line, path.read_text().splitlines())):  # skips a line cut by a kill
        records.setdefault(record["step"], {}).update(record)  # a resumed run's later line wins
    return [records[step] for step in sorted(records)]


def series(records, key):
    points = [(r["step"], r[key]) for r in records if key in r]
    return [p[0] for p in points], [p[1] for p in points]


def plot_training(runs: dict, path: Path):
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, records in runs.items():
        line, = axes[0].plot(*series(records, "loss"), label=f"{name} train")
        steps, evals = series(records, "eval_loss")
        if steps:
            axes[0].plot(steps, evals, "o--", color=line.get_color(), label=f"{name} eval")
        axes[1].plot(*series(records, "lr"), label=name)
        axes[2].plot(*series(records, "tokens_per_sec"), label=name)
    for ax, title in zip(axes, ("loss", "learning rate", "tokens / s")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ttt_statistics(records, path: Path) -> bool:
    layers = sorted({int(k.split("/")[1][len("layer"):]) for r in records for k in r if k.startswith("ttt/")})
    if not layers:
        return False
    fig, axes = plt.subplots(1, len(layers), figsize=(4 * len(layers), 3.5), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        for name, label in (("initial", "under W_0"), ("before", "before update"), ("after", "after update")):
            ax.plot(*series(records, f"ttt/layer{layer}/{name}"), marker="o", markersize=3, label=label)
        factors = series(records, f"ttt/layer{layer}/update_factor")[1]
        if factors and factors[-1] == 0:  # the end-of-mini-batch update is zero: nothing carries over
            ax.set_title(f"layer {layer}: inner loss\nupdate clamped to 0 (no carry-over)", color="tab:red")
        else:
            ax.set_title(f"layer {layer}: inner loss")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="training output folders (holding metrics.jsonl)")
    parser.add_argument("--output_dir", help="default: the first run's folder")
    args = parser.parse_args(argv)
    runs = cli.run(lambda: {Path(run).name: read_metrics(Path(run)) for run in args.runs})
    out = Path(args.output_dir or args.runs[0])
    out.mkdir(parents=True, exist_ok=True)
    plot_training(runs, out / "training_curves.png")
    written = [out / "training_curves.png"]
    for name, records in runs.items():
        path = out / (f"ttt_statistics_{name}.png" if len(runs) > 1 else "ttt_statistics.png")
        if plot_ttt_statistics(records, path):
            written.append(path)
    print("wrote " + ", ".join(map(str, written)))


if __name__ == "__main__":
    main()
