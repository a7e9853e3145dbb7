"""Passkey retrieval (needle in a haystack), built in: no downloads.

A prompt of exactly `length` tokens: filler text, a needle "The pass key is 58213. Remember it. 58213 is the pass
key." at a chosen depth (0: right after the start, 1: right before the question), and the question "What is the
pass key? The pass key is" at the end. The model answers by greedy decoding through its own cache
(`model.generate`); it is right when its answer starts with the key's digits. Accuracy is reported by context
length x needle depth, with the needle's distance from the end of the prompt compared to the model's attention
window where it has one (TTT-E2E, a sliding-window Transformer++): inside means the last prompt token still attends
to the needle's first token. Filler is a generated text (the sentences of the passkey task of Mohtashami & Jaggi,
2023) or the evaluation data's own documents.
"""

import random
import re
import textwrap
from dataclasses import dataclass

import torch

from ttt_train import families

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


@dataclass
class Prompt:
    ids: torch.Tensor  # [1, length]
    key: str
    needle_start: int  # position of the needle's first token
    needle_length: int


def text_ids(tokenizer, text: str) -> list:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class PasskeyTask:
    """Prompts of exact lengths with the needle at exact depths, over one filler token stream.

    filler_ids: the haystack's tokens, repeated as needed (a generated text, or the evaluation documents joined by
    EOS as in training); the prompt starts with EOS, as every training document did."""

    def __init__(self, tokenizer, filler_ids: list, digits: int = 5, seed: int = 0):
        if not filler_ids:
            raise ValueError("the passkey filler has no tokens")
        self.tokenizer, self.filler_ids, self.digits, self.seed = tokenizer, filler_ids, digits, seed
        self.question = text_ids(tokenizer, " " + QUESTION)

    def needle(self, key: str) -> list:
        return text_ids(self.tokenizer, " " + NEEDLE.format(key=key) + " ")

    def shortest(self) -> int:
        """The fewest tokens a prompt can have (EOS, needle, question; no filler)."""
        return 1 + len(self.needle("0" * self.digits)) + len(self.question)

    def key(self, length: int, depth: float, trial: int) -> str:
        rng = random.Random(f"{self.seed}/{length}/{depth}/{trial}")  # the same keys for every model
        return "".join(rng.choice("0123456789") for _ in range(self.digits))

    def prompt(self, length: int, depth: float, trial: int) -> Prompt:
        key = self.key(length, depth, trial)
        needle = self.needle(key)
        filler_length = length - 1 - len(needle) - len(self.question)
        if filler_length < 0:
            raise ValueError(f"a passkey prompt needs at least {self.shortest()} tokens, not {length}")
        repeats = -(-filler_length // len(self.filler_ids))
        offset = trial * 997 % len(self.filler_ids)  # each trial a different stretch of the haystack
        filler = (self.filler_ids * (repeats + 1))[offset:offset + filler_length]
        cut = round(depth * filler_length)
        ids = [self.tokenizer.eos_token_id, *filler[:cut], *needle, *filler[cut:], *self.question]
        return Prompt(torch.tensor([ids]), key, 1 + cut, len(needle))


def attention_window(config) -> int | None:
    """The keys a query attends to at most (a sliding window), None for full attention and for TTT layers (whose
    state is not a window)."""
    return getattr(config, "sliding_window", None)


@torch.no_grad()
def answer(model, prompt: Prompt, max_new_tokens: int, pad_token_id: int) -> torch.Tensor:
    """The model's greedy continuation of the prompt, decoded through its cache: [max_new_tokens] ids."""
    ids = prompt.ids.to(model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=pad_token_id, eos_token_id=None, **families.generation_kwargs(model))
    return out[0, ids.shape[1]:].cpu()


def is_right(text: str, key: str) -> bool:
    """The answer starts with the key's digits (after spaces); '582134' for '58213' is wrong."""
    found = re.match(r"\s*(\d+)", text)
    return bool(found) and found.group(1) == key


def evaluate(model, task: PasskeyTask, lengths, depths, trials: int) -> dict:
    """{window, cells: one per length x depth, accuracy_inside / accuracy_outside the window (None when no cell
    is)}; each cell: length, depth, trials, correct, accuracy, needle_start, distance (tokens from the needle's
    first token to the end of the prompt, over the trials' mean), inside_window, answers."""
    window = attention_window(model.config)
    tokens = len(text_ids(task.tokenizer, " " + "0" * task.digits)) + 1  # room for the key and one more token
    cells = []
    for length in lengths:
        for depth in depths:
            correct, answers, distances = 0, [], []
            for trial in range(trials):
                prompt = task.prompt(length, depth, trial)
                text = task.tokenizer.decode(answer(model, prompt, tokens, task.tokenizer.eos_token_id),
                                             skip_special_tokens=True)
                correct += is_right(text, prompt.key)
                answers.append({"key": prompt.key, "answer": text})
                distances.append(length - prompt.needle_start)
            distance = sum(distances) / trials
            cells.append({"length": length, "depth": depth, "trials": trials, "correct": correct,
                          "accuracy": correct / trials, "needle_start": length - distance, "distance": distance,
                          "inside_window": None if window is None else max(distances) <= window,
                          "answers": answers})
    summary = {"window": window, "cells": cells}
    for side, inside in (("inside", True), ("outside", False)):
        chosen = [c for c in cells if c["inside_window"] is inside]
        summary[f"accuracy_{side}"] = sum(c["correct"] for c in chosen) / sum(c["trials"] for c in chosen) \
            if chosen else None
    return summary


def heatmap(results, path):
    """One panel per model: accuracy by context length (rows) x needle depth (columns); cells whose needle lies
    outside the model's attention window are hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(3.4 * len(results) + 1.2, 4.0), squeeze=False, sharey=True,
                             constrained_layout=True)
    for index, (ax, result) in enumerate(zip(axes[0], results)):
        cells = result["passkey"]["cells"]
        lengths = sorted({c["length"] for c in cells})
        depths = sorted({c["depth"] for c in cells})
        grid = [[next(c for c in cells if c["length"] == n and c["depth"] == d) for d in depths] for n in lengths]
        image = ax.imshow([[c["accuracy"] for c in row] for row in grid], vmin=0, vmax=1, cmap="RdYlGn",
                          aspect="auto", origin="lower")
        for i, row in enumerate(grid):
            for j, cell in enumerate(row):
                ax.text(j, i, f"{cell['accuracy']:.2f}", ha="center", va="center", fontsize=8)
                if cell["inside_window"] is False:
                    ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="//", linewidth=0,
                                               edgecolor="0.35"))
        ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_xlabel("needle depth (0: start, 1: end)")
        if index == 0:
            ax.set_ylabel("context length (tokens)")
        window = result["passkey"]["window"]
        ax.set_title(textwrap.fill(result["label"], 36) + "\n" + (f"window {window}; hatched: needle outside"
                                                                  if window else "no attention window"), fontsize=8)
    fig.colorbar(image, ax=axes[0].tolist(), label="passkey accuracy", shrink=0.8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
