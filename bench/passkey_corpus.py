"""A training corpus of passkey documents (.jsonl), for models that are to learn retrieval before their passkey
accuracy means anything: each document is haystack sentences (those of ttt_train/passkey.py's filler, in random
order) with the needle at a random depth, then the question and the answer ("... The pass key is 58213.").
Lengths are drawn uniformly from --min_chars to --max_chars, so needles lie at every distance from the question.

    python bench/passkey_corpus.py outputs/passkey/train.jsonl --documents 4000 --min_chars 200 --max_chars 1500
"""

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ttt_train.passkey import FILLER, NEEDLE, QUESTION  # noqa: E402

SENTENCES = [s.strip() + "." for s in FILLER.split(".") if s.strip()]


def document(rng: random.Random, chars: int, digits: int) -> str:
    key = "".join(rng.choice("0123456789") for _ in range(digits))
    haystack = []
    while sum(len(s) + 1 for s in haystack) < chars:
        haystack.append(rng.choice(SENTENCES))
    haystack.insert(rng.randint(0, len(haystack)), NEEDLE.format(key=key))
    return " ".join([*haystack, QUESTION]) + f" {key}."


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path)
    parser.add_argument("--documents", type=int, default=4000)
    parser.add_argument("--min_chars", type=int, default=200)
    parser.add_argument("--max_chars", type=int, default=1500)
    parser.add_argument("--digits", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0 < args.min_chars <= args.max_chars or args.documents <= 0 or args.digits <= 0:
        parser.error("need 0 < --min_chars <= --max_chars and positive --documents and --digits")
    rng = random.Random(args.seed)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        for _ in range(args.documents):
            f.write(json.dumps({"text": document(rng, rng.randint(args.min_chars, args.max_chars), args.digits)})
                    + "\n")
    print(f"{args.documents} documents -> {args.output}")


if __name__ == "__main__":
    main()
