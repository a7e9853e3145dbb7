"""Generate text from a saved model, streaming the tokens to stdout as they come.

    python generate.py --model_name_or_path outputs/ttt-tiny/final_model --prompt "Alice has" --max_new_tokens 80
    python generate.py --model_name_or_path DIR --prompt "ROMEO:" --temperature 0.8 --top_p 0.95 --seed 1
    python generate.py --model_name_or_path DIR --prompt "ROMEO:" --greedy

The prompt is preceded by the EOS token, as every training document was (documents are packed with EOS
between them and no BOS); an empty prompt samples a document from scratch.
"""

import argparse
from pathlib import Path

import torch
from transformers import TextStreamer

import ttt  # noqa: F401  (registers the TTT model with the Auto classes)
from ttt_train import cli, data, families, hub
from ttt_train.metrics import quiet_libraries


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", required=True)
    p.add_argument("--tokenizer_name", help="default: the tokenizer saved with the model")
    p.add_argument("--prompt", default="")
    p.add_argument("--max_new_tokens", type=int, default=100)
    p.add_argument("--greedy", action="store_true", help="always take the most likely token (no sampling)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=50, help="0: no top-k filtering")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--repetition_penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    return p


def check_args(args, parser):
    if args.max_new_tokens <= 0:
        parser.error(f"--max_new_tokens must be positive, got {args.max_new_tokens}")
    if args.temperature <= 0:
        parser.error(f"--temperature must be positive, got {args.temperature} (use --greedy for argmax decoding)")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0 or args.repetition_penalty <= 0:
        parser.error("--top_k must be >= 0 and --repetition_penalty > 0")
    try:
        hub.resolve(args.model_name_or_path, "model")
    except hub.HubError as error:
        parser.error(str(error))
    if not (Path(args.model_name_or_path) / "config.json").is_file() and Path(args.model_name_or_path).exists():
        parser.error(f"model folder {args.model_name_or_path} has no config.json")


def prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    ids = [tokenizer.eos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return torch.tensor([ids])


def generate(args, stream=True):
    """The generate() output: `sequences` (prompt and new tokens) and `logits`, the model's logits at each new
    token before any sampling setting touched them."""
    quiet_libraries()
    tokenizer = data.load_tokenizer(args.tokenizer_name or args.model_name_or_path)
    model = data.load_model(args.model_name_or_path)
    if len(tokenizer) > model.config.vocab_size:
        raise data.DataError(f"tokenizer {args.tokenizer_name or args.model_name_or_path} has {len(tokenizer)} tokens, "
                             f"more than model {args.model_name_or_path}'s vocabulary of {model.config.vocab_size}")
    torch.manual_seed(args.seed)
    sampling = {} if args.greedy else dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    streamer = TextStreamer(tokenizer, skip_special_tokens=True) if stream else None
    ids = prompt_ids(tokenizer, args.prompt)
    # the leading EOS is also the pad token: an explicit mask keeps generate() from reading it as padding
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                          do_sample=not args.greedy, repetition_penalty=args.repetition_penalty,
                          pad_token_id=tokenizer.eos_token_id, eos_token_id=None, streamer=streamer,
                          return_dict_in_generate=True, output_logits=True, **sampling,
                          **families.generation_kwargs(model))


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(args, parser)
    cli.run(generate, args)


if __name__ == "__main__":
    main()
