"""Perplexity of saved models on a dataset, overall and by token position, as JSON and one comparison plot.

    python evaluate.py --model_name_or_path outputs/ttt/final_model outputs/transformer/final_model \\
        --dataset_name ../shared/data/tinyshakespeare.txt --seq_length 1024 --output_dir outputs/eval

Writes OUT/eval.json, a list with per model: model, loss, perplexity, tokens, and by_position, a list of
{start, end, loss, perplexity} over the positions (in the block) of the predicted tokens; and
OUT/ppl_by_position.png. Evaluating at a --seq_length beyond the training context (e.g. 2x) shows how a model
uses long context. The data is loaded as in training; `--split validation` (the default) is the trainer's
validation data (the dataset's validation split, or the same held-out documents for the same --seed and
--validation_split), so the loss matches the trainer's eval loss on the same blocks; `--split all` evaluates every
document of the data (a whole test file, e.g. WikiText-2's test.txt), up to --max_eval_tokens.
"""

import argparse
import json
import tempfile
from pathlib import Path

import datasets
import torch

from ttt import next_token_targets, token_nll
from ttt_train import cli, data, hub
from ttt_train.metrics import perplexity
from ttt_train.rundir import TRAINER_STATE

OUTPUTS = ("eval.json", "ppl_by_position.png")  # what an evaluation writes in --output_dir


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", nargs="+", required=True, help="saved model folders (or Hub ids)")
    p.add_argument("--dataset_name", required=True, help="as in train_ttt.py: Hub id, local file or folder")
    p.add_argument("--dataset_config")
    p.add_argument("--split", default="validation",
                   help="'validation' (the trainer's validation data), 'all' (every document of every split), or "
                        "a split name of the dataset, e.g. test; a single local file is one split named train")
    p.add_argument("--text_column")
    p.add_argument("--tokenizer_name", help="default: the tokenizer saved with each model")
    p.add_argument("--seq_length", type=int, required=True, help="tokens per evaluated block")
    p.add_argument("--max_eval_tokens", type=int, default=2**20, help="at most this many tokens per model")
    p.add_argument("--bucket_size", type=int, help="positions per by_position bucket (default: seq_length / 16)")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--validation_split", type=float, default=0.05, help="as in train_ttt.py")
    p.add_argument("--streaming_eval_docs", type=int, default=1000, help="as in train_ttt.py")
    p.add_argument("--seed", type=int, default=42, help="as in train_ttt.py (chooses the held-out documents)")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--overwrite_output_dir", action="store_true",
                   help=f"replace the {' and '.join(OUTPUTS)} of an earlier evaluation in --output_dir")
    return p


def check_args(args, parser):
    for name in ("seq_length", "max_eval_tokens", "batch_size"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}")
    if args.seq_length < 2:
        parser.error("--seq_length must be at least 2 (one context token and one predicted token)")
    if args.max_eval_tokens < args.seq_length:
        parser.error(f"--max_eval_tokens ({args.max_eval_tokens}) must be at least --seq_length ({args.seq_length})")
    args.bucket_size = args.bucket_size or max(1, args.seq_length // 16)
    if args.bucket_size <= 0:
        parser.error(f"--bucket_size must be positive, got {args.bucket_size}")
    existing = [name for name in OUTPUTS if (Path(args.output_dir) / name).exists()]
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


def next_token_losses(model, batch):
    """[B, T] next-token losses (0 at the last position) without the [B, T, V] logits: the model's own
    `next_token_losses` (TTT, E2E: chunk by chunk), else its decoder's hidden states through the output layer
    block by block (transformers' causal LMs)."""
    if hasattr(model, "next_token_losses"):
        return model.next_token_losses(batch)
    hidden_states = model.get_decoder()(input_ids=batch).last_hidden_state
    return token_nll(hidden_states, model.get_output_embeddings(), next_token_targets(batch))


def by_position(totals, num_blocks, bucket_size):
    buckets = []
    for start in range(1, totals.shape[0] + 1, bucket_size):
        end = min(start + bucket_size, totals.shape[0] + 1)
        loss = (totals[start - 1:end - 1].sum() / (num_blocks * (end - start))).item()
        buckets.append({"start": start, "end": end, "loss": loss, "perplexity": perplexity(loss)})
    return buckets


def training_context(model_dir):
    """The sequence length a saved model was trained with, when its folder records it."""
    state = Path(model_dir) / TRAINER_STATE
    return json.loads(state.read_text())["args"]["seq_length"] if state.is_file() else None


def plot(results, path, seq_length):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    marked = False  # a dotted line at a model's training context, when the evaluation goes beyond it
    for result in results:
        x = [(b["start"] + b["end"] - 1) / 2 for b in result["by_position"]]
        line, = ax.plot(x, [b["perplexity"] for b in result["by_position"]], marker="o", markersize=3,
                        label=f"{result['label']} (ppl {result['perplexity']:.2f})")
        if result["training_context"] and result["training_context"] < seq_length:
            ax.axvline(result["training_context"], color=line.get_color(), linestyle=":", linewidth=1)
            marked = True
    ax.set_xlabel("token position in the sequence" + (" (dotted: training context)" if marked else ""))
    ax.set_ylabel("perplexity")
    ax.set_title(f"Perplexity by token position, sequences of {seq_length} tokens")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evaluate(args):
    from ttt_train.metrics import quiet_libraries
    from ttt_train.models import describe

    quiet_libraries()
    docs = evaluation_documents(args)
    text_column = data.detect_text_column(docs, args.text_column)
    results, blocks_by_tokenizer = [], {}
    for model_dir in args.model_name_or_path:
        tokenizer_name = args.tokenizer_name or model_dir
        if tokenizer_name not in blocks_by_tokenizer:
            tokenizer = data.load_tokenizer(tokenizer_name)
            blocks_by_tokenizer[tokenizer_name] = data.eval_blocks(docs, tokenizer, text_column, args.seq_length,
                                                                   args.max_eval_tokens // args.seq_length)
        blocks = blocks_by_tokenizer[tokenizer_name]
        model = data.load_model(model_dir, dtype=torch.float32)
        if int(blocks.max()) >= model.config.vocab_size:
            raise cli.UserError(f"tokenizer {tokenizer_name} produces ids beyond model {model_dir}'s vocabulary")
        totals = position_losses(model, blocks, args.batch_size)
        loss = (totals.sum() / totals.numel() / blocks.shape[0]).item()
        results.append({"model": model_dir, "label": describe(model.config) + f" [{Path(model_dir).parent.name}]",
                        "loss": loss, "perplexity": perplexity(loss), "tokens": int(totals.numel() * blocks.shape[0]),
                        "training_context": training_context(model_dir),
                        "by_position": by_position(totals, blocks.shape[0], args.bucket_size)})
        print(f"{model_dir}: loss {loss:.4f}, perplexity {perplexity(loss):.3f} over {results[-1]['tokens']} tokens")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / OUTPUTS[0]).write_text(json.dumps(results, indent=2))
    plot(results, out / OUTPUTS[1], args.seq_length)
    print(f"wrote {out / OUTPUTS[0]} and {out / OUTPUTS[1]}")
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
