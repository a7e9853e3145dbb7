"""What a run reports: a console line and a JSON line in `<output_dir>/metrics.jsonl` per record, and the same
values to Accelerate's trackers (TensorBoard, W&B)."""

import importlib.util
import json
import math
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ttt_train import families
from ttt_train.cli import UserError
from ttt_train.rundir import METRICS_FILE


def trackers(report_to: str) -> list:
    """Accelerate `log_with` names for --report_to; W&B must be installed to be asked for."""
    names = {"none": [], "tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"]}[report_to]
    if "wandb" in names and importlib.util.find_spec("wandb") is None:
        raise UserError(f"--report_to {report_to} needs W&B: pip install wandb (set WANDB_MODE=offline to log "
                         f"without network)")
    return names


def tracker_config(values: dict) -> dict:
    """The run's settings (RunConfig.flat()) as trackers accept them (scalars and strings only)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in values.items()}


def parse_line(line: str) -> dict | None:
    """A metrics.jsonl record, or None for a blank line or one cut short (a process killed while writing it)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


class MetricsLog:
    """One line per step and event. A run resumed at step N first drops the lines after N (written by the
    interrupted segment, which the resumed run redoes), rewriting the file atomically."""

    def __init__(self, accelerator, output_dir: Path, resumed_at: int | None = None):
        self.accelerator = accelerator
        self.path = Path(output_dir) / METRICS_FILE
        if resumed_at is not None and accelerator.is_main_process and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if (record := parse_line(line)) is not None and record.get("step", 0) <= resumed_at]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)

    def note(self, record: dict):
        """A line of metrics.jsonl only (words, such as the kernel path, that the trackers' scalars cannot take)."""
        if self.accelerator.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def log(self, record: dict, console: dict | None = None):
        """record: a dict with a "step", written whole to metrics.jsonl and the trackers; the console shows
        `console` instead when given (a summary of a long record); floats are rounded for the console only."""
        if not self.accelerator.is_main_process:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        shown = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in (console or record).items())
        tqdm.write(shown)
        self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])


class StepMetrics:
    """The training lines of metrics.jsonl: every `every` steps and at the last, the mean loss of the updated steps
    since the previous line, the learning rate, gradient norm, tokens/s, elapsed time, and on a GPU MFU and peak
    memory."""

    def __init__(self, log, accelerator, every, max_steps, tokens_per_step, flops_per_token, peak_tflops, elapsed):
        self.log, self.accelerator, self.every, self.max_steps = log, accelerator, every, max_steps
        self.tokens_per_step, self.flops_per_token, self.peak_tflops = tokens_per_step, flops_per_token, peak_tflops
        self.elapsed = elapsed
        self.loss, self.steps, self.start = torch.zeros((), device=accelerator.device), 0, time.time()

    def add(self, step_loss):
        """An updated step's loss (skipped steps are not averaged in)."""
        self.loss += step_loss
        self.steps += 1

    def after_step(self, step: int, lr: float, grad_norm):
        if not (step % self.every == 0 or step == self.max_steps) or not self.steps:
            return
        now = time.time()
        record = {"step": step, "loss": self.accelerator.reduce(self.loss, reduction="mean").item() / self.steps,
                  "lr": lr, "grad_norm": float(grad_norm),
                  "tokens_per_sec": self.tokens_per_step * self.steps / (now - self.start), "elapsed": self.elapsed()}
        if self.peak_tflops:
            per_device = record["tokens_per_sec"] / self.accelerator.num_processes
            record["mfu"] = per_device * self.flops_per_token / (self.peak_tflops * 1e12)
        if torch.cuda.is_available():
            record["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        self.log.log(record)
        self.loss.zero_()
        self.steps, self.start = 0, time.time()


class InnerLoopMetrics:
    """TTT-E2E's inner loop, every `every` steps (meta mode only): the inner step size's warm-up factor, the mean
    inner gradient norm (before clipping) and the fraction of inner steps clipped, and the loss by chunk index
    (each chunk predicted by the fast weights trained on the chunks before it: falling with the index is TTT at
    work), as e2e/chunk_loss/<c>; beyond 8 chunks, 8 groups of consecutive chunks, each named by its first."""

    GROUPS = 8

    def __init__(self, log, accelerator, every, max_steps, config):
        self.log, self.accelerator, self.every, self.max_steps = log, accelerator, every, max_steps
        self.enabled = families.family_of(config).inner_loop(config)
        self.clip = getattr(config, "inner_clip", None)
        self.reset()

    def reset(self):
        self.chunk_loss, self.norm, self.clipped, self.count, self.batches = None, 0.0, 0.0, 0, 0

    def add(self, output):
        if not self.enabled or output.chunk_losses is None:
            return
        losses = output.chunk_losses.mean(0)  # [chunks]
        self.chunk_loss = losses if self.chunk_loss is None else self.chunk_loss + losses
        self.batches += 1
        if output.inner_grad_norms is not None:
            norms = output.inner_grad_norms
            self.norm, self.clipped = self.norm + norms.sum(), self.clipped + (norms >= self.clip).sum()
            self.count += norms.numel()

    def after_step(self, step: int, multiplier: float):
        if not self.enabled or not (step % self.every == 0 or step == self.max_steps) or not self.batches:
            return
        chunk_loss = self.accelerator.reduce(self.chunk_loss / self.batches, reduction="mean").tolist()
        record = {"step": step, "e2e/ilr_multiplier": multiplier}
        if self.count:
            totals = torch.stack([torch.as_tensor(x, dtype=torch.float32, device=self.accelerator.device)
                                  for x in (self.norm, self.clipped, self.count)])
            norm, clipped, count = self.accelerator.reduce(totals, reduction="sum").tolist()
            record |= {"e2e/inner_grad_norm": norm / count, "e2e/clipped_fraction": clipped / count}
        size = math.ceil(len(chunk_loss) / self.GROUPS)
        for first in range(0, len(chunk_loss), size):
            group = chunk_loss[first:first + size]
            record[f"e2e/chunk_loss/{first}"] = sum(group) / len(group)
        # the console: the first and last chunk groups' losses (metrics.jsonl and the trackers keep every group)
        groups = [v for k, v in record.items() if k.startswith("e2e/chunk_loss/")]
        console = {k: v for k, v in record.items() if not k.startswith("e2e/chunk_loss/")}
        console["e2e/chunk_loss"] = f"{groups[0]:.4g} -> {groups[-1]:.4g} (first -> last of {len(groups)} groups)"
        self.log.log(record, console)
        self.reset()


def write_summary(path: Path, step: int, tokens: int, elapsed: float, parameters: int, final_eval_loss, best,
                  kernels=None):
    """training_summary.json at the end of a run (written atomically): steps, training tokens and time over all
    resumed segments, throughput, parameters, the final and best validation loss and perplexity (best: with
    --save_best, the best_model's), and which implementation ran the sequence mixing (families.KernelPath)."""
    summary = {"steps": step, "tokens": tokens, "train_time_sec": elapsed,
               "tokens_per_sec": tokens / elapsed if elapsed > 0 else None, "parameters": parameters,
               "final_eval_loss": final_eval_loss,
               "final_eval_perplexity": perplexity(final_eval_loss) if final_eval_loss is not None else None,
               "best_step": best[0] if best else None, "best_eval_loss": best[1] if best else None,
               "best_eval_perplexity": perplexity(best[1]) if best else None,
               **(kernels.record() if kernels else {})}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, path)


def quiet_libraries():
    """The console shows the run's own lines and its one progress bar: the libraries' progress bars (loading and
    writing weights, building dataset caches) and their notices that say nothing to the user are turned off.
    Their warnings about the user's input stay."""
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its read errors reach the user as DataError lines


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity) by GPU name; --peak_tflops overrides.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0,
                    "RTX 4090": 165.0, "RTX 3090": 71.0}


def gpu_peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def training_flops_per_token(config, num_params: int, seq_length: int) -> float:
    """Model FLOPs of one training token: 6 per parameter used in a matmul (the input embedding is a lookup, so
    it counts only when tied, as the output head), plus the sequence mixing, 3x its forward FLOPs, each family's
    own formula (Family.mixing_flops, in families.py: TTT's inner loop in dual form, attention over the T or window
    previous tokens, the Mamba-2 and Gated DeltaNet chunked scans; TTT-E2E's inner loop, a further forward and
    backward of the suffix blocks, is not counted: these are the model's FLOPs, so its MFU reads low by that
    factor)."""
    matmul_params = num_params - (0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size)
    mixing = families.family_of(config).mixing_flops(config, seq_length)
    return 6 * matmul_params + 3 * mixing * config.num_hidden_layers
