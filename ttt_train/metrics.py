"""What a run reports: a console line and a JSON line in `<output_dir>/metrics.jsonl` per record, and the same
values to Accelerate's trackers (TensorBoard, W&B)."""

import importlib.util
import json
import math
from pathlib import Path

from tqdm.auto import tqdm

METRICS_FILE = "metrics.jsonl"


def trackers(report_to: str) -> list:
    """Accelerate `log_with` names for --report_to; W&B must be installed to be asked for."""
    names = {"none": [], "tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"]}[report_to]
    if "wandb" in names and importlib.util.find_spec("wandb") is None:
        raise ValueError(f"--report_to {report_to} needs W&B: pip install wandb (set WANDB_MODE=offline to log "
                         f"without network)")
    return names


def tracker_config(args) -> dict:
    """Hyper-parameters as trackers accept them (scalars and strings only)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}


class MetricsLog:
    def __init__(self, accelerator, output_dir: Path):
        self.accelerator = accelerator
        self.path = Path(output_dir) / METRICS_FILE

    def log(self, record: dict):
        """record: a dict with a "step"; floats are rounded for the console only."""
        if not self.accelerator.is_main_process:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        shown = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items())
        tqdm.write(shown)
        self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")
