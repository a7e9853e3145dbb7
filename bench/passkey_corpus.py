"""A training corpus of passkey documents (.jsonl), for models that are to learn retrieval before their passkey
accuracy means anything: each document is a haystack with the needle at a random depth, then the question and the
answer ("... The pass key is 58213."). The haystack is ttt_train/passkey.py's filler sentences in random order
(--haystack shuffled), or its filler text repeated from a random offset, as the evaluation's prompts are
(--haystack repeated: nothing but the key left to learn). Lengths are drawn uniformly from --min_chars to
--max_chars, so needles lie at every distance from the question.

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


def document(rng: random.Random, chars: int, digits: int, haystack: str) -> str:
    key = "".join(rng.choice("0123456789") for _ in range(digits))
    needle = NEEDLE.format(key=key)
    if haystack == "repeated":
        offset = rng.randrange(len(FILLER) + 1)
        text = ((FILLER + " ") * (chars // len(FILLER) + 2))[offset:offset + chars]
        cut = rng.randint(0, len(text))
        return f"{text[:cut]} {needle} {text[cut:]} {QUESTION} {key}."
    sentences = []
    while sum(len(s) + 1 for s in sentences) < chars:
        sentences.append(rng.choice(SENTENCES))
    sentences.insert(rng.randint(0, len(sentences)), needle)
    return " ".join([*sentences, QUESTION]) + f" {key}."


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path)
    parser.add_argument("--documents", type=int, default=4000)
    parser.add_argument("--min_chars", type=int, default=200)
    parser.add_argument("--max_chars", type=int, default=1500)
    parser.add_argument("--digits", type=int, default=5)
    parser.add_argument("--haystack", choices=["shuffled", "repeated"], default="shuffled")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0 < args.min_chars <= args.max_chars or args.documents <= 0 or args.digits <= 0:
        parser.error("need 0 < --min_chars <= --max_chars and positive --documents and --digits")
    rng = random.Random(args.seed)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        for _ in range(args.documents):
            text = document(rng, rng.randint(args.min_chars, args.max_chars), args.digits, args.haystack)
            f.write(json.dumps({"text": text}) + "\n")
    print(f"{args.documents} documents -> {args.output}")


if __name__ == "__main__":
    main()
