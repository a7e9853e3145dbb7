"""Perplexity of saved models on a dataset, overall and by token position, and passkey retrieval by context length
and needle depth, as JSON and one comparison plot per task.

    python evaluate.py --model_name_or_path outputs/ttt/final_model outputs/transformer/final_model \\
        --dataset_name ../shared/data/tinyshakespeare.txt --seq_length 1024 --output_dir outputs/eval
    python evaluate.py --model_name_or_path RUN/final_model --tasks passkey --passkey_lengths 1024 4096 16384 \\
        --output_dir outputs/passkey

Perplexity writes OUT/eval.json, a list with per model: model, loss, perplexity, tokens, by_position, a list of
{start, end, loss, perplexity} over the positions (in the block) of the predicted tokens in buckets of
--bucket_size (end exclusive), by_position_log, the same over log-spaced buckets [1, 2), [2, 4), [4, 8), ...,
parameters, tokens_per_sec, peak_memory_bytes; OUT/ppl_by_position.png (--buckets chooses which the plot shows);
and OUT/comparison.md, the models side by side (parameters, loss, perplexity, tokens/s, peak memory).
Evaluating at a --seq_length beyond the training context (e.g. 2x) shows how a model uses long context; memory
does not grow with the whole block's logits (the loss is taken a block of positions at a time). Passkey
(ttt_train/passkey.py) writes OUT/passkey.json and the heatmap OUT/passkey.png. The data is loaded as in
training; `--split validation` (the default) is the trainer's validation data (the dataset's validation split, or
the same held-out documents for the same --seed and --validation_split), so the loss matches the trainer's eval
loss on the same blocks; `--split all` evaluates every document of the data (a whole test file, e.g. WikiText-2's
test.txt), up to --max_eval_tokens.
"""

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import datasets
import torch

from ttt import next_token_targets, token_nll
from ttt_train import cli, data, hub, passkey
from ttt_train.memory import PeakMemory
from ttt_train.metrics import perplexity
from ttt_train.rundir import TRAINER_STATE

TASKS = {"perplexity": ("eval.json", "ppl_by_position.png", "comparison.md"),
         "passkey": ("passkey.json", "passkey.png")}
OUTPUTS = tuple(name for names in TASKS.values() for name in names)  # what an evaluation writes in --output_dir


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", nargs="+", required=True, help="saved model folders (or Hub ids)")
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=["perplexity"],
                   help="perplexity (by position) and/or passkey (retrieval by length x depth)")
    p.add_argument("--dataset_name", help="as in train_ttt.py: Hub id, local file or folder (perplexity; passkey "
                                          "with --passkey_filler data)")
    p.add_argument("--dataset_config")
    p.add_argument("--split", default="validation",
                   help="'validation' (the trainer's validation data), 'all' (every document of every split), or "
                        "a split name of the dataset, e.g. test; a single local file is one split named train")
    p.add_argument("--text_column")
    p.add_argument("--tokenizer_name", help="default: the tokenizer saved with each model")
    p.add_argument("--seq_length", type=int, help="tokens per evaluated block (perplexity)")
    p.add_argument("--max_eval_tokens", type=int, default=2**20, help="at most this many tokens per model")
    p.add_argument("--bucket_size", type=int, help="positions per by_position bucket (default: seq_length / 16)")
    p.add_argument("--buckets", choices=["linear", "log"], default="linear",
                   help="the plot's buckets: linear (--bucket_size) or log-spaced (powers of two, log axis)")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--validation_split", type=float, default=0.05, help="as in train_ttt.py")
    p.add_argument("--streaming_eval_docs", type=int, default=1000, help="as in train_ttt.py")
    p.add_argument("--seed", type=int, default=42, help="as in train_ttt.py (chooses the held-out documents)")
    k = p.add_argument_group("passkey")
    k.add_argument("--passkey_lengths", type=int, nargs="+", help="prompt lengths in tokens (default: --seq_length)")
    k.add_argument("--passkey_depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="needle depths, 0 (after the start) to 1 (right before the question)")
    k.add_argument("--passkey_trials", type=int, default=5, help="prompts (keys) per length x depth")
    k.add_argument("--passkey_digits", type=int, default=5, help="digits of the key")
    k.add_argument("--passkey_filler", choices=["generated", "data"], default="generated",
                   help="the haystack: repeated generated sentences, or the documents of --dataset_name")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--overwrite_output_dir", action="store_true",
                   help=f"replace the {' and '.join(OUTPUTS)} of an earlier evaluation in --output_dir")
    return p


def check_args(args, parser):
    needs_data = "perplexity" in args.tasks or ("passkey" in args.tasks and args.passkey_filler == "data")
    if needs_data and not args.dataset_name:
        parser.error("--dataset_name is required for " + ("--tasks perplexity" if "perplexity" in args.tasks
                                                          else "--passkey_filler data"))
    if "perplexity" in args.tasks and args.seq_length is None:
        parser.error("--seq_length is required for --tasks perplexity")
    if "passkey" in args.tasks:
        args.passkey_lengths = args.passkey_lengths or ([args.seq_length] if args.seq_length else None)
        if not args.passkey_lengths:
            parser.error("--tasks passkey needs --passkey_lengths (or --seq_length)")
        if min(args.passkey_lengths) <= 0 or args.passkey_trials <= 0 or args.passkey_digits <= 0:
            parser.error("--passkey_lengths, --passkey_trials and --passkey_digits must be positive")
        if not all(0 <= depth <= 1 for depth in args.passkey_depths):
            parser.error(f"--passkey_depths must lie in [0, 1], got {args.passkey_depths}")
    for name in ("seq_length", "max_eval_tokens", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}")
    if args.seq_length is not None:
        if args.seq_length < 2:
            parser.error("--seq_length must be at least 2 (one context token and one predicted token)")
        if args.max_eval_tokens < args.seq_length:
            parser.error(f"--max_eval_tokens ({args.max_eval_tokens}) must be at least --seq_length "
                         f"({args.seq_length})")
        args.bucket_size = args.bucket_size or max(1, args.seq_length // 16)
    if args.bucket_size is not None and args.bucket_size <= 0:
        parser.error(f"--bucket_size must be positive, got {args.bucket_size}")
    existing = [name for task in args.tasks for name in TASKS[task] if (Path(args.output_dir) / name).exists()]
    if existing and not args.overwrite_output_dir:
        parser.error(f"--output_dir {args.output_dir} already holds {' and '.join(existing)} of an earlier "
                     f"evaluation; choose another folder, or pass --overwrite_output_dir to replace them")
    try:  # where the results go, before any model is evaluated
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=args.output_dir):
            pass
    except OSError as error:
        parser.error(f"cannot write to --output_dir {args.output_dir}: {error.strerror or error}")
    for path in args.model_name_or_path:
        try:
            hub.resolve(path, "model")
        except hub.HubError as error:
            parser.error(str(error))
        if Path(path).exists() and not (Path(path) / "config.json").is_file():
            parser.error(f"model folder {path} has no config.json")


def evaluation_documents(args):
    raw = data.load_raw_dataset(args.dataset_name, args.dataset_config or None, streaming=None)
    if args.split == "validation":
        _, docs = data.split_train_validation(raw, args.validation_split, args.streaming_eval_docs, args.seed)
        return docs
    splits = dict(raw) if hasattr(raw, "keys") else {"train": raw}
    if args.split == "all":
        return splits["train"] if len(splits) == 1 else datasets.concatenate_datasets(list(splits.values()))
    if args.split not in splits:
        raise data.DataError(f"dataset has no split {args.split!r} (splits: {list(splits)})")
    return splits[args.split]


@torch.no_grad()
def position_losses(model, blocks, batch_size):
    """Sum over blocks of the next-token loss at each target position 1..T-1: (T-1,) float64."""
    totals = torch.zeros(blocks.shape[1] - 1, dtype=torch.float64)
    for batch in blocks.split(batch_size):
        totals += next_token_losses(model, batch)[:, :-1].sum(0).double()  # (T-1,)
    return totals


# Positions whose logits exist at once in the evaluation's loss: [B, 16, V] in float32 (8 MiB for 4 x 32K). With
# the training loss's 1024, those logits and their log-softmax (1 GB at B 4, V 32K) would be the peak memory of
# every model, hiding the models' own in the comparison; the per-position losses do not depend on it.
EVAL_LOSS_BLOCK = 16


def next_token_losses(model, batch):
    """[B, T] next-token losses (0 at the last position) without the [B, T, V] logits: the model's own
    `next_token_losses` (TTT, E2E: chunk by chunk), else its decoder's hidden states through the output layer
    block by block (transformers' causal LMs)."""
    if hasattr(model, "next_token_losses"):
        return model.next_token_losses(batch, block=EVAL_LOSS_BLOCK)
    hidden_states = model.get_decoder()(input_ids=batch, use_cache=False).last_hidden_state
    return token_nll(hidden_states, model.get_output_embeddings(), next_token_targets(batch), EVAL_LOSS_BLOCK)


def by_position(totals, num_blocks, bucket_size=None):
    """Mean loss and perplexity over buckets of target positions 1..T-1 ([start, end), end exclusive): of
    `bucket_size` positions, or without it log-spaced, [1, 2), [2, 4), [4, 8), ... (the last cut at T)."""
    count = totals.shape[0]
    if bucket_size:
        starts = list(range(1, count + 1, bucket_size))
    else:
        starts = [2 ** i for i in range(int(math.log2(count)) + 1)]
    buckets = []
    for start, end in zip(starts, [*starts[1:], count + 1]):
        loss = (totals[start - 1:end - 1].sum() / (num_blocks * (end - start))).item()
        buckets.append({"start": start, "end": end, "loss": loss, "perplexity": perplexity(loss)})
    return buckets


def training_context(model_dir):
    """The sequence length a saved model was trained with, when its folder records it."""
    state = Path(model_dir) / TRAINER_STATE
    return json.loads(state.read_text())["args"]["seq_length"] if state.is_file() else None


def plot(results, path, seq_length, buckets="linear"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "by_position" if buckets == "linear" else "by_position_log"
    fig, ax = plt.subplots(figsize=(8, 5))
    marked = False  # a dotted line at a model's training context, when the evaluation goes beyond it
    for result in results:
        x = [(b["start"] + b["end"] - 1) / 2 for b in result[key]]
        line, = ax.plot(x, [b["perplexity"] for b in result[key]], marker="o", markersize=3,
                        label=f"{result['label']} (ppl {result['perplexity']:.2f})")
        if result["training_context"] and result["training_context"] < seq_length:
            ax.axvline(result["training_context"], color=line.get_color(), linestyle=":", linewidth=1)
            marked = True
    if buckets == "log":  # the first positions' perplexity is far above the rest: both axes logarithmic
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
    ax.set_xlabel("token position in the sequence" + (" (log-spaced buckets)" if buckets == "log" else "")
                  + (" (dotted: training context)" if marked else ""))
    ax.set_ylabel("perplexity")
    ax.set_title(f"Perplexity by token position, sequences of {seq_length} tokens")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def perplexity_result(model, model_dir, blocks, args) -> dict:
    """The loss overall and by position; the speed of that evaluation (tokens/s, forward only) and, in a pass of
    its own (counting costs time), the peak memory of one batch's forward beyond the weights."""
    start = time.perf_counter()
    totals = position_losses(model, blocks, args.batch_size)
    seconds = time.perf_counter() - start
    with PeakMemory(model.device) as memory:
        position_losses(model, blocks[:args.batch_size], args.batch_size)
    loss = (totals.sum() / totals.numel() / blocks.shape[0]).item()
    print(f"{model_dir}: loss {loss:.4f}, perplexity {perplexity(loss):.3f} over {totals.numel() * blocks.shape[0]} "
          f"tokens")
    return {"loss": loss, "perplexity": perplexity(loss), "tokens": int(totals.numel() * blocks.shape[0]),
            "parameters": sum(p.numel() for p in model.parameters()),
            "tokens_per_sec": blocks.numel() / seconds, "peak_memory_bytes": memory.peak_bytes,
            "device": model.device.type,
            "training_context": training_context(model_dir),
            "by_position": by_position(totals, blocks.shape[0], args.bucket_size),
            "by_position_log": by_position(totals, blocks.shape[0])}


def comparison_table(results, seq_length, batch_size) -> str:
    """The models side by side (markdown): what the paper's comparison tables hold, on the same blocks."""
    rows = [f"| {r['label']} | {r['parameters'] / 1e6:.2f}M | {r['loss']:.4f} | {r['perplexity']:.2f} | "
            f"{r['tokens_per_sec']:,.0f} | {r['peak_memory_bytes'] / 2**20:,.1f} |" for r in results]
    return "\n".join([
        f"Blocks of {seq_length} tokens, {results[0]['tokens']} predicted tokens per model, on "
        f"{results[0]['device'].upper()}; tokens/s: the evaluation's forward passes; peak memory: one batch of "
        f"{batch_size} blocks' forward beyond the weights.", "",
        "| model | parameters | loss | perplexity | tokens/s | peak memory (MiB) |",
        "| --- | --- | --- | --- | --- | --- |", *rows]) + "\n"


def passkey_task(args, tokenizer, docs, text_column) -> passkey.PasskeyTask:
    if args.passkey_filler == "generated":
        filler = passkey.text_ids(tokenizer, " ".join([passkey.FILLER] * 8) + " ")
    else:  # the documents as in training: each followed by EOS, enough of them for the longest prompt
        filler = []
        for doc in docs:
            filler += passkey.text_ids(tokenizer, doc[text_column]) + [tokenizer.eos_token_id]
            if len(filler) >= max(args.passkey_lengths):
                break
    task = passkey.PasskeyTask(tokenizer, filler, args.passkey_digits, args.seed)
    if min(args.passkey_lengths) < task.shortest():
        raise cli.UserError(f"--passkey_lengths {min(args.passkey_lengths)} is too short: a prompt with this "
                            f"tokenizer needs at least {task.shortest()} tokens (the needle and the question)")
    return task


def evaluate(args):
    from ttt_train.metrics import quiet_libraries
    from ttt_train.models import describe

    quiet_libraries()
    docs = evaluation_documents(args) if args.dataset_name else None
    text_column = data.detect_text_column(docs, args.text_column) if docs is not None else None
    results, prepared = [], {}  # per tokenizer: it, the perplexity blocks, the passkey task (made once)
    for model_dir in args.model_name_or_path:
        tokenizer_name = args.tokenizer_name or model_dir
        if tokenizer_name not in prepared:
            tokenizer = data.load_tokenizer(tokenizer_name)
            blocks = data.eval_blocks(docs, tokenizer, text_column, args.seq_length,
                                      args.max_eval_tokens // args.seq_length) if "perplexity" in args.tasks else None
            task = passkey_task(args, tokenizer, docs, text_column) if "passkey" in args.tasks else None
            prepared[tokenizer_name] = tokenizer, blocks, task
        tokenizer, blocks, task = prepared[tokenizer_name]
        model = data.load_model(model_dir, dtype=torch.float32).eval()
        if len(tokenizer) > model.config.vocab_size:
            raise cli.UserError(f"tokenizer {tokenizer_name} produces ids beyond model {model_dir}'s vocabulary")
        result = {"model": model_dir, "label": describe(model.config) + f" [{Path(model_dir).parent.name}]"}
        if "perplexity" in args.tasks:
            result |= perplexity_result(model, model_dir, blocks, args)
        if "passkey" in args.tasks:
            result["passkey"] = passkey.evaluate(model, task, args.passkey_lengths, args.passkey_depths,
                                                 args.passkey_trials)
            summary = result["passkey"]
            sides = [f"{side} the window {summary[f'accuracy_{side}']:.2f}" for side in ("inside", "outside")
                     if summary[f"accuracy_{side}"] is not None]
            correct = sum(c["correct"] for c in summary["cells"])
            total = sum(c["trials"] for c in summary["cells"])
            print(f"{model_dir}: passkey {correct}/{total} right" + (f" ({', '.join(sides)})" if sides else ""))
        results.append(result)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if "perplexity" in args.tasks:
        table, figure, comparison = (out / name for name in TASKS["perplexity"])
        table.write_text(json.dumps([{k: v for k, v in r.items() if k != "passkey"} for r in results], indent=2))
        plot(results, figure, args.seq_length, args.buckets)
        comparison.write_text(comparison_table(results, args.seq_length, args.batch_size))
        print(comparison.read_text())
        written += [table, figure, comparison]
    if "passkey" in args.tasks:
        table, figure = (out / name for name in TASKS["passkey"])
        table.write_text(json.dumps([{k: r[k] for k in ("model", "label", "passkey")} for r in results], indent=2))
        passkey.heatmap(results, figure)
        written += [table, figure]
    print("wrote " + ", ".join(map(str, written)))
    return results


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(args, parser)
    return args


def main(argv=None):
    cli.run(evaluate, parse_args(argv))


if __name__ == "__main__":
    main()
