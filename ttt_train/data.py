"""Training data: datasets from the Hub or local files, tokenised, EOS-terminated, packed into fixed blocks.

The stream of token blocks is exactly resumable: its state (epoch, documents consumed, the packing leftover, and
for streamed datasets the `datasets` iterator state) is saved with each checkpoint.
"""

import collections
import importlib.util
import itertools
import math
import queue
import random
import threading
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from datasets.distributed import split_dataset_by_node
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ttt_train import hub
from ttt_train.cli import UserError

TEXT_COLUMNS = ("text", "content", "article", "body")
VALIDATION_SPLITS = ("validation", "valid", "val", "dev")
BUILDER_BY_SUFFIX = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
BUILTIN_DATASET = "builtin:synthetic"
BUILTIN_TOKENIZER = "builtin:bytes"
TOKENIZE_CHUNK = 64  # documents tokenised per call (the fast tokenizer batches in Rust)


class DataError(UserError):
    """Bad data input: the message names what is wrong."""


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 bytes + <unk>, <s>, </s>) that needs no files, for offline smoke runs."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{ch: i + 3 for i, ch in enumerate(sorted(alphabet))}}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", model_max_length=10**9)


TRAINED_SPECIALS = ("<unk>", "<s>", "</s>")  # as the byte tokenizer's: unknown, BOS, EOS (document ends)
BYTE_SYMBOLS = 256


def auto_vocab_size(texts: list, low: int, high: int) -> int:
    """The rule of --auto_vocab_size: one token per distinct word (whitespace-separated) that occurs at least twice
    in the sample, on top of the 256 byte symbols and the special tokens, rounded up to a multiple of 64 and
    clamped to [low, high]."""
    counts = collections.Counter(word for text in texts for word in text.split())
    wanted = BYTE_SYMBOLS + len(TRAINED_SPECIALS) + sum(1 for n in counts.values() if n >= 2)
    return max(low, min(high, -(-wanted // 64) * 64))


def train_tokenizer(texts: list, vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE of `vocab_size` tokens (the 256 bytes, the merges learned from `texts`, <unk> <s> </s>)."""
    minimum = BYTE_SYMBOLS + len(TRAINED_SPECIALS)
    if vocab_size < minimum:
        raise DataError(f"--vocab_size {vocab_size} is smaller than the {BYTE_SYMBOLS} byte symbols plus "
                        f"{len(TRAINED_SPECIALS)} special tokens ({minimum}) a byte-level BPE needs")
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(TRAINED_SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", model_max_length=10**9)


# Files of a saved folder that a tokenizer load does not read (its manifest check skips them: hashing the weights
# to load a vocabulary would cost as much as loading the model).
NOT_TOKENIZER_FILES = (".safetensors", ".bin", ".pt", ".pkl")


def ships_code(error: Exception) -> bool:
    """Whether a transformers loader refused a folder for the code it ships (an `auto_map` for a type this project
    does not provide: every load passes trust_remote_code=False)."""
    return "custom code" in str(error) or "trust_remote_code" in str(error)


def refusal(error: Exception, what: str, name: str) -> UserError:
    """The one-line error for a loader's failure: code shipped in the folder, which our tools never run; a Hub id
    that HF_HUB_OFFLINE=1 cannot serve from the cache; else the loader's first line."""
    if ships_code(error):
        return DataError(f"{what} {name} ships Python code of its own (an auto_map in its config) for a type this "
                         f"project does not provide; the tools never run code from a model or tokenizer folder")
    if hub.offline() and not Path(name).expanduser().exists():
        return hub.offline_miss(what, name)
    text = str(error).strip()
    return DataError(f"cannot load {what} {name!r}: {text.splitlines()[0] if text else type(error).__name__}")


def load_tokenizer(name: str):
    if name == BUILTIN_TOKENIZER:
        return byte_tokenizer()
    hub.resolve(name, "tokenizer")
    from ttt_train.checkpoint import verify_saved_folder

    verify_saved_folder(name, "tokenizer folder", include=lambda file: not file.endswith(NOT_TOKENIZER_FILES)
                        and not file.startswith("training_state/"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=False)
    except Exception as error:  # the Hub and local loaders raise many types; all mean "cannot load"
        raise refusal(error, "tokenizer", name) from error
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer {name!r} has no EOS token, needed to mark document ends")
    return tokenizer


def check_same_tokenizer(tokenizer, saved, name: str, checkpoint):
    """A tokenizer given on resume must be the checkpoint's: the same vocabulary (every token and its id) and the
    same special tokens, not only the same size."""
    if tokenizer.get_vocab() != saved.get_vocab():
        raise DataError(f"--tokenizer_name {name} is not the tokenizer checkpoint {checkpoint} was trained with "
                        f"(their vocabularies differ); resume without --tokenizer_name to use the saved one")
    special = ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id")
    if [getattr(tokenizer, k) for k in special] != [getattr(saved, k) for k in special]:
        raise DataError(f"--tokenizer_name {name}: its special tokens differ from those of checkpoint {checkpoint}'s "
                        f"tokenizer; resume without --tokenizer_name to use the saved one")


def load_model(name: str, **kwargs):
    """A saved model for evaluation or generation (eval mode), or one DataError: an unreadable folder or file
    (a corrupt model.safetensors), or weights that are not finite."""
    from transformers import AutoModelForCausalLM

    import ttt  # noqa: F401  (registers the TTT models with the Auto classes)
    import ttt_e2e  # noqa: F401
    from ttt_train.checkpoint import verify_saved_folder

    path = hub.resolve(name, "model")
    verify_saved_folder(path)
    adapters = (Path(path) / "adapter_config.json").is_file()  # LoRA adapters (--use_lora): their base, then them
    if adapters and importlib.util.find_spec("peft") is None:
        raise DataError(f"model {name} holds LoRA adapters, which need peft: pip install peft (or train with "
                        f"--merge_lora for a plain model)")
    try:
        if adapters:
            from peft import AutoPeftModelForCausalLM, PeftConfig

            verify_saved_folder(PeftConfig.from_pretrained(path).base_model_name_or_path, "LoRA base model")
            model = AutoPeftModelForCausalLM.from_pretrained(path, trust_remote_code=False, **kwargs).eval()
        else:
            model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False, **kwargs).eval()
    except UserError:
        raise
    except Exception as error:  # OSError, ValueError, SafetensorError, ...: all mean "cannot load"
        raise refusal(error, "model", name) from error
    bad = next((n for n, p in model.named_parameters() if not torch.isfinite(p).all()), None)
    if bad is not None:
        raise DataError(f"model {name} has non-finite weights ({bad}); it cannot be evaluated or sampled")
    return model


# ----------------------------------------------------------------------------------------------------------------
# Documents


def synthetic_documents(num_docs=3000, seed=1234):
    """A generated corpus for offline runs: short stories whose later sentences repeat facts stated earlier, so a
    model can lower its loss by using context (what TTT layers are for)."""
    rng = random.Random(seed)
    names = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy"]
    things = ["apples", "books", "coins", "ducks", "eggs", "flowers", "games", "hats", "keys", "lamps"]
    places = ["the market", "the library", "the river", "the garden", "the station", "the school"]
    docs = []
    for _ in range(num_docs):
        people = rng.sample(names, 3)
        facts = {p: (rng.randint(2, 19), rng.choice(things), rng.choice(places)) for p in people}
        lines = [f"{p} has {n} {t} and lives near {pl}." for p, (n, t, pl) in facts.items()]
        for _ in range(rng.randint(2, 6)):
            p = rng.choice(people)
            n, t, pl = facts[p]
            lines.append(rng.choice([f"Near {pl}, {p} counted {n} {t}.", f"How many {t} does {p} have? {n}.",
                                     f"{p} walked to {pl} with {n} {t}."]))
        docs.append({"text": " ".join(lines)})
    return datasets.Dataset.from_list(docs)


# In .txt files a line that is empty or holds only whitespace ends a document (raw WikiText separates its
# paragraphs by lines holding one space). `datasets` reads paragraphs split at empty lines only; these split further.
def split_at_blank_lines(batch):
    documents = []
    for text in batch["text"]:
        for is_text, lines in itertools.groupby(text.split("\n"), key=lambda line: bool(line.strip())):
            if is_text:
                documents.append("\n".join(lines))
    return {"text": documents}


def has_text(path: Path) -> bool:
    """Whether a data file holds anything but whitespace (read until the first other byte)."""
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            if chunk.strip():
                return True
    return False


def unreadable(path, error: Exception) -> DataError:
    """One line for a data file `datasets` cannot read: the cause it wraps (a decoding or parsing error)."""
    chain = [error]
    while (cause := chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 10:
        chain.append(cause)
    decoding = [e for e in chain if isinstance(e, UnicodeDecodeError)]
    error = decoding[0] if decoding else chain[min(1, len(chain) - 1)]
    hint = " (it is not UTF-8 text)" if isinstance(error, UnicodeDecodeError) else ""
    detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return DataError(f"cannot read data {path}{hint}: {type(error).__name__}{': ' + detail if detail else ''}")


def _load_files(source: str, text: bool, streaming: bool, **kwargs):
    """load_dataset(source) (a builder name with data_files, or a folder); text files as documents."""
    where = kwargs.get("data_files", {}).get("train", source)
    try:
        if not text:
            return datasets.load_dataset(source, streaming=streaming, **kwargs)
        raw = datasets.load_dataset(source, streaming=streaming, sample_by="paragraph", encoding="utf-8-sig",
                                    **kwargs)
        return raw.map(split_at_blank_lines, batched=True)
    except DataError:
        raise
    except Exception as error:  # malformed JSON/CSV/Parquet, bytes that are not UTF-8: `datasets` wraps them
        raise unreadable(where, error) from error


def _load_local(path: Path, streaming: bool):
    if path.is_file():
        builder = BUILDER_BY_SUFFIX.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"unsupported file type {path.suffix!r} for {path}; use one of {sorted(BUILDER_BY_SUFFIX)}")
        if not has_text(path):
            whitespace = " (it holds only whitespace)" if path.stat().st_size else ""
            raise DataError(f"data file {path} is empty{whitespace}")
        return _load_files(builder, builder == "text", streaming, data_files={"train": str(path)})
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        return datasets.load_from_disk(str(path))  # written by Dataset(Dict).save_to_disk
    files = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in BUILDER_BY_SUFFIX]
    if not files:
        raise DataError(f"dataset folder {path} holds no {'/'.join(sorted(BUILDER_BY_SUFFIX))} files")
    suffixes = {p.suffix.lower() for p in files}
    builders = {BUILDER_BY_SUFFIX[s] for s in suffixes}
    if len(builders) > 1:
        raise DataError(f"dataset folder {path} mixes file types {sorted(suffixes)}; keep one type per folder")
    if not any(has_text(p) for p in files):
        raise DataError(f"dataset folder {path}: every data file in it is empty")
    # A folder laid out like a Hub dataset repo: `datasets` infers the builder and the splits from file names.
    return _load_files(str(path), builders == {"text"}, streaming)


def as_stream(raw):
    """An IterableDataset(Dict) view of map-style data (`save_to_disk` folders load map-style whatever is asked)."""
    if isinstance(raw, datasets.DatasetDict):
        return datasets.IterableDatasetDict({name: split.to_iterable_dataset() for name, split in raw.items()})
    return raw.to_iterable_dataset() if isinstance(raw, datasets.Dataset) else raw


def load_raw_dataset(name: str, config: str | None, streaming: bool | None):
    """A Dataset(Dict) or IterableDataset(Dict). Local paths load in memory-mapped form unless `streaming`;
    Hub datasets stream unless `streaming` is False."""
    if name == BUILTIN_DATASET:
        return as_stream(synthetic_documents()) if streaming else synthetic_documents()
    path = Path(hub.resolve(name, "dataset")).expanduser()
    if path.exists():
        raw = _load_local(path, bool(streaming))
        return as_stream(raw) if streaming else raw
    try:
        return datasets.load_dataset(name, config, streaming=streaming is not False)
    except Exception as error:  # offline, unknown id, missing config: `datasets` raises many types
        if hub.offline():
            raise hub.offline_miss("dataset" + (f" (config {config!r})" if config else ""), name) from error
        raise DataError(f"cannot load dataset {name!r}"
                        f"{f' (config {config!r})' if config else ''}: {str(error).splitlines()[0]}") from error


def split_train_validation(raw, validation_fraction: float, validation_docs: int, seed: int):
    """(train, validation): the dataset's own validation split if it has one, else a held-out part."""
    if isinstance(raw, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if "train" not in raw and len(raw) != 1:
            raise DataError(f"dataset has no 'train' split (splits: {list(raw)})")
        train = raw["train"] if "train" in raw else next(iter(raw.values()))
        for name in VALIDATION_SPLITS:
            if name in raw:
                return train, raw[name]
        raw = train
    if isinstance(raw, datasets.IterableDataset):
        return raw.skip(validation_docs), raw.take(validation_docs)
    if len(raw) < 2:
        raise DataError(f"dataset has {len(raw)} document(s); need at least 2 to hold out validation data")
    held_out = max(1, round(len(raw) * validation_fraction))
    parts = raw.train_test_split(test_size=min(held_out, len(raw) - 1), seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def first_documents(dataset, count: int | None):
    """The first `count` documents (all when None), for a dataset or a stream."""
    if count is None:
        return dataset
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.take(count)
    return dataset.select(range(min(count, len(dataset))))


def first_rows(dataset, count: int):
    """The first `count` rows; a streamed file that cannot be read is one DataError."""
    try:
        return list(itertools.islice(iter(dataset), count))
    except DataError:
        raise
    except Exception as error:
        raise unreadable("(streamed)", error) from error


def detect_text_column(dataset, requested: str | None, empty_hint: str = "") -> str:
    columns = list(dataset.column_names or [])
    if not columns and isinstance(dataset, datasets.IterableDataset):
        rows = first_rows(dataset, 1)
        if not rows:
            raise DataError(f"the data is empty (no documents){empty_hint}")
        columns = list(rows[0].keys())
    if requested:
        if requested not in columns:
            raise DataError(f"text column {requested!r} not found; columns found: {columns}")
        column = requested
    else:
        column = next((name for name in TEXT_COLUMNS if name in columns), None)
        if column is None:
            raise DataError(f"no text column found (looked for {list(TEXT_COLUMNS)}); columns found: {columns}; "
                            f"name one with --text_column")
    feature = (dataset.features or {}).get(column)
    if isinstance(feature, datasets.Value) and feature.dtype not in ("string", "large_string"):
        raise DataError(f"text column {column!r} holds {feature.dtype} values, not text")
    return column


def check_not_empty(dataset, text_column: str, what: str, hint: str = ""):
    rows = (row for row in dataset if row[text_column])
    try:
        found = next(rows, None)
    except DataError:
        raise
    except Exception as error:
        raise unreadable("(streamed)", error) from error
    if found is None:
        raise DataError(f"the {what} data is empty (no non-empty {text_column!r} values){hint}")


# ----------------------------------------------------------------------------------------------------------------
# Packed, resumable block stream


def tokenize_documents(tokenizer, texts) -> list:
    """Token ids of the non-empty documents, each followed by EOS, concatenated."""
    tokens, eos = [], tokenizer.eos_token_id
    texts = [t for t in texts if t is not None and t != ""]
    wrong = next((t for t in texts if not isinstance(t, str)), None)
    if wrong is not None:
        raise DataError(f"the text column holds a {type(wrong).__name__} value ({str(wrong)[:40]!r}), not text")
    if not texts:
        return tokens
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        tokens.extend(ids)
        tokens.append(eos)
    return tokens


def steps_for_epochs(dataset, tokenizer, text_column, seq_length: int, sequences_per_step: int,
                     epochs: float) -> tuple:
    """(steps, tokens, blocks) for `epochs` passes over `dataset`: its documents tokenised as packing does (each
    followed by EOS), cut into blocks of seq_length, sequences_per_step blocks per optimizer step (rounded up)."""
    if isinstance(dataset, datasets.IterableDataset):
        raise DataError("--num_train_epochs needs training data of known size; this one is streamed: give "
                        "--max_train_steps, or --no-streaming for data that fits on disk")
    tokens = 0
    for batch in dataset.iter(batch_size=1000):
        tokens += len(tokenize_documents(tokenizer, batch[text_column]))
    blocks = tokens // seq_length
    return max(1, math.ceil(epochs * blocks / sequences_per_step)), tokens, blocks


@dataclass
class StreamState:
    epoch: int = 0
    documents: int = 0  # documents consumed in this epoch by this process
    leftover: list = None  # tokens read but not yet emitted in a block
    iterator_state: dict = None  # `datasets` IterableDataset.state_dict() for streamed data

    def to_dict(self):
        return {"epoch": self.epoch, "documents": self.documents, "leftover": list(self.leftover or []),
                "iterator_state": self.iterator_state}


class PackedBlocks:
    """Yields (batch_size, seq_length) LongTensors of consecutive tokens: documents tokenised, each followed by EOS,
    concatenated, cut into blocks; the tokens after the last full block are carried into the next batch.

    Map-style data is visited in a seeded permutation per epoch, process `rank` taking every `world_size`-th
    document. Streamed data is shuffled with a seeded buffer and split by `datasets.distributed`."""

    def __init__(self, dataset, tokenizer, text_column, seq_length, batch_size, seed, rank=0, world_size=1,
                 shuffle_buffer=10_000, state: dict | None = None):
        self.dataset, self.tokenizer, self.text_column = dataset, tokenizer, text_column
        self.seq_length, self.batch_size, self.seed = seq_length, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.streaming = isinstance(dataset, datasets.IterableDataset)
        if self.streaming:
            dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer)
            self.dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
        self.state = StreamState(**state) if state else StreamState()
        self.buffer = list(self.state.leftover or [])
        self._documents = None

    def _epoch_documents(self):
        state = self.state
        if self.streaming:
            self.dataset.set_epoch(state.epoch)
            if state.iterator_state is not None:
                self.dataset.load_state_dict(state.iterator_state)
            return (row[self.text_column] for row in self.dataset)
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + state.epoch))
        indices = order[self.rank::self.world_size].tolist()[state.documents:]
        return (self.dataset[i][self.text_column] for i in indices)

    def _read_documents(self):
        """Tokenises up to TOKENIZE_CHUNK documents into the buffer; moves to the next epoch at the end."""
        for _ in range(2):  # the current epoch, then (if it is exhausted) the next one
            if self._documents is None:
                self._documents = self._epoch_documents()
            texts = list(itertools.islice(self._documents, TOKENIZE_CHUNK))
            if texts:
                self.state.documents += len(texts)
                if self.streaming:
                    self.state.iterator_state = self.dataset.state_dict()
                self.buffer.extend(tokenize_documents(self.tokenizer, texts))
                return
            self.state = StreamState(epoch=self.state.epoch + 1)
            self._documents = None
        raise DataError("the training data yields no documents for this process "
                        f"(rank {self.rank} of {self.world_size}); the dataset is smaller than the process count")

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        needed = self.batch_size * self.seq_length
        while len(self.buffer) < needed:
            self._read_documents()
        batch = torch.tensor(self.buffer[:needed], dtype=torch.long).view(self.batch_size, self.seq_length)
        del self.buffer[:needed]
        return batch

    def state_dict(self) -> dict:
        """The position after the last batch returned: resuming from it yields exactly the following batches."""
        self.state.leftover = list(self.buffer)
        return self.state.to_dict()


def eval_blocks(dataset, tokenizer, text_column, seq_length, max_blocks) -> torch.Tensor:
    """The first `max_blocks` packed blocks of the validation data, in order: (N, seq_length)."""
    buffer = []
    texts = (row[text_column] for row in dataset)
    while len(buffer) < max_blocks * seq_length:
        chunk = list(itertools.islice(texts, TOKENIZE_CHUNK))
        if not chunk:
            break
        buffer.extend(tokenize_documents(tokenizer, chunk))
    blocks = min(max_blocks, len(buffer) // seq_length)
    if blocks == 0:
        raise DataError(f"the validation data holds {len(buffer)} tokens, fewer than one block of "
                        f"seq_length={seq_length}; use more data, a validation split, or a smaller --seq_length")
    return torch.tensor(buffer[:blocks * seq_length], dtype=torch.long).view(blocks, seq_length)


class Prefetcher:
    """Prepares the next `depth` batches of a PackedBlocks stream in a background thread (the fast tokenizers run
    in Rust without the GIL), optionally in pinned memory. `state_dict()` is the stream position after the last
    batch handed out, not after the ones prepared ahead, so checkpoints stay exact."""

    def __init__(self, stream: PackedBlocks, depth: int, pin_memory: bool):
        self.stream, self.pin_memory = stream, pin_memory
        self.state = stream.state_dict()
        self.ready = queue.Queue(maxsize=depth)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._produce, daemon=True)
        self.thread.start()

    def _produce(self):
        try:
            while not self.stopped.is_set():
                batch = next(self.stream)
                item = (batch.pin_memory() if self.pin_memory else batch, self.stream.state_dict())
                while not self.stopped.is_set():
                    try:
                        self.ready.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except Exception as error:  # handed to the training loop, which raises it
            self.ready.put((error, None))

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        batch, state = self.ready.get()
        if isinstance(batch, Exception):
            raise batch
        self.state = state
        return batch

    def state_dict(self) -> dict:
        return self.state

    def close(self):
        self.stopped.set()
        self.thread.join()
