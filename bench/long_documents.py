"""A text file as a .jsonl of contiguous documents of about --chars characters each (cut at line ends), for
long-context experiments: read as a .txt, a play or a book becomes one document per paragraph, and packing
shuffles them, so a long context would hold unrelated paragraphs.

    python bench/long_documents.py ../shared/data/tinyshakespeare.txt outputs/shakespeare_8k.jsonl --chars 8192
"""

import argparse
import json
from pathlib import Path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--chars", type=int, default=8192)
    args = parser.parse_args(argv)
    documents, piece, size = [], [], 0
    for line in args.source.read_text(encoding="utf-8").splitlines(keepends=True):
        piece.append(line)
        size += len(line)
        if size >= args.chars:
            documents.append("".join(piece))
            piece, size = [], 0
    if piece:
        documents.append("".join(piece))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        for document in documents:
            f.write(json.dumps({"text": document}) + "\n")
    print(f"{len(documents)} documents, {sum(map(len, documents))} characters -> {args.output}")


if __name__ == "__main__":
    main()
