"""The training loop: set-up (everything that can fail on bad input happens first), then the step loop."""

import json
import math
import os
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import TorchDynamoPlugin, set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from ttt_train import checkpoint as ckpt
from ttt_train import data, families, hub, models, publish, rundir
from ttt_train.cli import Stopped, UserError, resume_command
from ttt_train.config import RunConfig, RunState
from ttt_train.distributed import main_decides
from ttt_train.metrics import (
    InnerLoopMetrics,
    MetricsLog,
    StepMetrics,
    gpu_peak_tflops,
    perplexity,
    quiet_libraries,
    tracker_config,
    trackers,
    training_flops_per_token,
    write_summary,
)
from ttt_train.remote import download_model, is_remote
from ttt_train.run_directory import RunDirectory
from ttt_train.rundir import METRICS_FILE, SUMMARY_FILE

# Flags whose change on resume is allowed (a curriculum) and reported.
RESUMABLE_CHANGES = ("seq_length", "per_device_train_batch_size", "gradient_accumulation_steps", "max_train_steps",
                     "learning_rate", "lr_end", "lr_warmup_steps", "warmup_ratio", "lr_scheduler_type",
                     "weight_decay", "max_grad_norm", "mixed_precision")
SCHEDULER_NAMES = {"cosine": "cosine_with_min_lr", "linear": "polynomial", "constant": "constant_with_warmup"}
MAX_SKIPPED_IN_A_ROW = 10  # --on_nonfinite skip: more non-finite steps in a row than this stop the run


class DivergenceError(UserError):
    """A non-finite loss or gradient norm: the run stops without saving anything from it."""


class StopRequest:
    """While active, SIGTERM / SIGINT ask the loop to save a checkpoint at the end of the current step and stop (the
    process then exits 128 + the signal's number, as a shell reports a process the signal ended); a second signal
    ends the process at once. Installed only when the trainer is the program (`enabled`): called as a library (the
    tests, a notebook), the caller's handlers stay, and a signal does what the caller's process does with it."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, enabled: bool):
        self.enabled, self.requested, self.signum, self.previous = enabled, False, None, {}

    def __enter__(self):
        if self.enabled:
            self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        self.requested, self.signum = True, signum
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_DFL)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def param_groups(model, weight_decay, exempt_names=()):
    """AdamW groups: no weight decay on norms, biases, embeddings, 1-D parameters and the family's own
    (Family.no_decay: TTT's inner biases b1/b2 and per-position tau, the state-space models' A_log, D, dt_bias)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:  # frozen (the base model under LoRA)
            continue
        leaf = name.rsplit(".", 1)[-1]
        exempt = (p.ndim < 2 or "norm" in name or "embed_tokens" in name or "bias" in leaf
                  or leaf in exempt_names)
        (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model, optim, exempt_names, device) -> torch.optim.AdamW:
    """AdamW of the optimisation settings (ttt_train.config.OptimizerArguments) over param_groups, fused on CUDA."""
    return torch.optim.AdamW(param_groups(model, optim.weight_decay, exempt_names), lr=optim.learning_rate,
                             betas=(optim.adam_beta1, optim.adam_beta2), eps=optim.adam_epsilon,
                             fused=device.type == "cuda")


def warmup_steps(optim, total_steps: int) -> int:
    if optim.lr_warmup_steps is not None:
        return optim.lr_warmup_steps
    return int(total_steps * optim.warmup_ratio)


def build_scheduler(optim, total_steps: int, optimizer):
    """The learning-rate schedule of the optimisation settings (ttt_train.config.OptimizerArguments) over the run's
    `total_steps`."""
    name = SCHEDULER_NAMES[optim.lr_scheduler_type]
    specific = {"cosine_with_min_lr": {"min_lr": optim.lr_end}, "polynomial": {"lr_end": optim.lr_end, "power": 1.0},
                "constant_with_warmup": {}}[name]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps(optim, total_steps),
                         num_training_steps=total_steps, scheduler_specific_kwargs=specific)


@torch.no_grad()
def evaluate(model, blocks, accelerator, batch_size):
    """Mean next-token loss over all eval blocks, each process taking every world_size-th block."""
    model.eval()
    total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)  # (sum of losses, targets)
    mine = blocks[accelerator.process_index::accelerator.num_processes]
    for batch in mine.split(batch_size):
        batch = batch.to(accelerator.device)
        targets = batch.shape[0] * (batch.shape[1] - 1)
        total += torch.tensor([model(input_ids=batch, labels=batch).loss.item() * targets, targets],
                              device=accelerator.device, dtype=torch.float64)
    total = accelerator.reduce(total, reduction="sum")
    model.train()
    return (total[0] / total[1]).item()


def ttt_statistics(model, blocks, accelerator, batch_size: int) -> dict:
    """Per layer, the inner loss of each mini-batch's last token under W_0, before and after the mini-batch's
    update, averaged over mini-batches, on the first eval batch. Every process runs it (sharded models need all)."""
    batch = blocks[:batch_size].to(accelerator.device)
    layers = accelerator.unwrap_model(model, keep_torch_compile=False).ttt_statistics(batch)
    return {f"ttt/layer{i}/{name}": sum(values) / len(values)
            for i, layer in enumerate(layers) for name, values in layer.items() if values}


def clamped_layers(statistics: dict) -> list:
    """The TTT layers whose end-of-mini-batch update is zero (update_factor clamped to 0)."""
    return [int(key.split("/")[1][len("layer"):]) for key, value in statistics.items()
            if key.endswith("/update_factor") and value == 0]


def resume_data_states(saved: list, world_size: int, accelerator) -> list:
    """Per-process data positions. With a different process count the global document position is kept
    (approximately: packing leftovers are dropped)."""
    if len(saved) == world_size:
        return saved
    epoch = saved[0]["epoch"]
    documents = sum(s["documents"] for s in saved if s["epoch"] == epoch) // world_size
    accelerator.print(f"resume: process count changed {len(saved)} -> {world_size}; each process restarts at "
                      f"document {documents} of epoch {epoch} (packing leftovers dropped)")
    return [{"epoch": epoch, "documents": documents, "leftover": [], "iterator_state": None}] * world_size


def describe_changes(run_args: dict, saved_args: dict) -> str:
    """The settings a resume changes (RESUMABLE_CHANGES), between the checkpoint's record and this run's."""
    changes = [f"{k} {saved_args[k]} -> {run_args[k]}" for k in RESUMABLE_CHANGES
               if k in saved_args and saved_args[k] != run_args[k]]
    return ", ".join(changes)


def compile_plugin(perf) -> TorchDynamoPlugin:
    """How Accelerate compiles the model (`perf`: ttt_train.config.PerformanceArguments): inductor in
    --torch_compile_mode, or not at all (explicitly, so that an `accelerate launch` config's dynamo settings cannot
    turn compilation on behind the flags)."""
    return TorchDynamoPlugin(backend="inductor" if perf.torch_compile else "no", mode=perf.torch_compile_mode)


PARALLELISM_WORDS = {"NO": "one process", "MULTI_GPU": "data parallel (DDP)", "MULTI_CPU": "data parallel on CPUs",
                     "FSDP": "fully sharded data parallel (FSDP)"}
PRECISION_WORDS = {"no": "float32 (no mixed precision)", "bf16": "bf16 mixed precision",
                   "fp16": "fp16 mixed precision with loss scaling"}


def describe_setup(accelerator) -> str:
    """The start-up line's account of where and how the run computes, in words."""
    kind = accelerator.distributed_type.value
    return (f"on {accelerator.device.type.upper()} ({PARALLELISM_WORDS.get(kind, kind)}), "
            f"{PRECISION_WORDS[accelerator.mixed_precision]}")


def start_trackers(accelerator, logging, run_args: dict, output_dir):
    """TensorBoard / W&B (`logging`: ttt_train.config.LoggingArguments), given the run's settings `run_args`: a
    tracker that cannot start (e.g. W&B not logged in) is one error line."""
    try:
        accelerator.init_trackers(logging.wandb_project, config=tracker_config(run_args),
                                  init_kwargs={"wandb": {"name": logging.wandb_run_name, "dir": str(output_dir)}})
    except Exception as error:  # each tracker library raises its own types; all mean "cannot log there"
        hint = ("; log in with `wandb login` (or set WANDB_API_KEY), or run with WANDB_MODE=offline"
                if "wandb" in trackers(logging.report_to) else "")
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"--report_to {logging.report_to}: the tracker cannot start: {message}{hint}") from error


def claim_output_dir(accelerator, run: RunConfig, state: RunState, directory: RunDirectory) -> dict | None:
    """The main process claims the output directory (RunDirectory.claim) and reads and verifies the checkpoint a
    resume starts from (every rank hashing every file would multiply the reads by the process count); every process
    gets the outcome: `state.checkpoint` is set, and the checkpoint's trainer state returned (None: a fresh run)."""
    def claim() -> tuple:  # (notes, checkpoint or None, its trainer state or None)
        notes, checkpoint = directory.claim(state.resume, run.checkpoints.overwrite_output_dir,
                                            rundir.tracker_folders(run.logging))
        return notes, checkpoint and str(checkpoint), checkpoint and ckpt.validate_checkpoint(checkpoint)

    notes, checkpoint, resume_state = main_decides(accelerator, claim)
    for note in notes:
        accelerator.print(f"{directory.path}: {note}")
    state.checkpoint = Path(checkpoint) if checkpoint else None
    return resume_state


def train(run: RunConfig, handle_signals: bool = False):
    """Set-up, each step that can fail on bad input before any model is built, then the step loop. With
    `handle_signals` (the trainer is the program), SIGTERM / SIGINT save a checkpoint and end the run with
    cli.Stopped."""
    quiet_libraries()
    directory = RunDirectory(run.checkpoints.output_dir)
    # Without CUDA, Accelerate joins a multi-process launch (gloo) only when told it runs on the CPU.
    multi_process_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(mixed_precision=run.optim.mixed_precision,
                              log_with=trackers(run.logging.report_to) or None, project_dir=str(directory.path),
                              cpu=multi_process_cpu, dynamo_plugin=compile_plugin(run.perf))
    state = RunState(resume=run.checkpoints.resume_from_checkpoint, init_from=run.model.init_from)
    if directory.remote or is_remote(state.init_from):
        def stage() -> tuple:  # the local copies every process then reads
            return directory.stage(state.resume), \
                download_model(state.init_from) if is_remote(state.init_from) else state.init_from

        state.resume, state.init_from = main_decides(accelerator, stage)
    try:
        return _train(run, state, accelerator, directory, handle_signals)
    finally:
        directory.release(fresh=not run.checkpoints.resume_from_checkpoint,
                          main_process=accelerator.is_main_process)


class Evaluator:
    """Every --eval_steps steps and at the last: the validation loss and, for TTT models, the TTT statistics (with
    a note, once per layer, when a layer's end-of-mini-batch update is clamped to zero)."""

    def __init__(self, model, blocks, accelerator, batch_size: int, every: int, last_step: int, log, is_ttt: bool):
        self.model, self.blocks, self.accelerator, self.log = model, blocks, accelerator, log
        self.batch_size, self.every, self.last_step = batch_size, every, last_step
        self.is_ttt, self.noted, self.last = is_ttt, set(), None

    def after_step(self, step: int) -> float | None:
        """The validation loss when this step evaluates, else None."""
        if not ((self.every and step % self.every == 0) or step == self.last_step):
            return None
        eval_loss = evaluate(self.model, self.blocks, self.accelerator, self.batch_size)
        self.log.log({"step": step, "eval_loss": eval_loss, "eval_perplexity": perplexity(eval_loss)})
        self.last = eval_loss
        if self.is_ttt:
            self.log_ttt_statistics(step)
        return eval_loss

    def log_ttt_statistics(self, step: int):
        statistics = ttt_statistics(self.model, self.blocks, self.accelerator, self.batch_size)
        self.log.log({"step": step, **statistics})
        newly_clamped = sorted(set(clamped_layers(statistics)) - self.noted)
        if newly_clamped:
            self.noted.update(newly_clamped)
            self.accelerator.print(
                f"note: TTT layer(s) {', '.join(map(str, newly_clamped))}: the last token's position factor is "
                f"clamped to 0 (learned offset <= -1/mini_batch_size), so the inner weights carry nothing from one "
                f"mini-batch to the next (the official formula does the same)")


class DivergenceGuard:
    """A step whose loss or gradient norm is not finite (on any process): stops the run (`--on_nonfinite stop`),
    or skips its update (`skip`) until more than MAX_SKIPPED_IN_A_ROW in a row."""

    def __init__(self, mode: str, output_dir: Path, log):
        self.mode, self.output_dir, self.log, self.in_a_row = mode, output_dir, log, 0

    def allows_update(self, step: int, nonfinite: bool, loss, grad_norm) -> bool:
        if not nonfinite:
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        what = f"step {step}: loss {loss.item():.4g}, gradient norm {float(grad_norm):.4g}"
        if self.mode == "stop" or self.in_a_row > MAX_SKIPPED_IN_A_ROW:
            saved = rundir.list_checkpoints(self.output_dir)
            raise DivergenceError(
                f"training diverged at {what} (not finite); nothing was saved from it"
                + (f"; the last checkpoint, {saved[-1][1].name}, is from before" if saved else "")
                + ("" if self.mode == "stop" else f"; {self.in_a_row} steps in a row were not finite")
                + "; lower --learning_rate, or check the data and --max_grad_norm")
        self.log.log({"step": step, "skipped": f"not finite: {what}"})
        return False


def synchronised_flags(accelerator, stop, loss, grad_norm) -> tuple:
    """(a stop was requested, the step is not finite), on any process: the step's one synchronisation."""
    flags = torch.stack([torch.tensor(float(stop.requested), device=accelerator.device),
                         (~torch.isfinite(loss) | ~torch.isfinite(grad_norm)).float()])
    stop_now, nonfinite = (accelerator.reduce(flags, "sum") > 0).tolist()
    return stop_now, nonfinite


def read_data(settings, seed: int) -> tuple:
    """(train_docs, eval_docs, text_column) of the data settings (ttt_train.config.DataArguments): the dataset split
    (a held-out split shuffled by `seed`), limited, its text column found and checked."""
    raw = data.load_raw_dataset(settings.dataset_name, settings.dataset_config or None, settings.streaming)
    train_docs, eval_docs = data.split_train_validation(raw, settings.validation_split, settings.streaming_eval_docs,
                                                        seed)
    held_out = isinstance(train_docs, datasets.IterableDataset) and not any(  # a stream: validation held out
        name in raw for name in data.VALIDATION_SPLITS if hasattr(raw, "keys"))
    hint = (f": a stream without a validation split gives its first --streaming_eval_docs "
            f"({settings.streaming_eval_docs})"
            f" documents to validation, and this one has no more; lower --streaming_eval_docs" if held_out else "")
    train_docs = data.first_documents(train_docs, settings.max_train_examples)
    eval_docs = data.first_documents(eval_docs, settings.max_eval_examples)
    text_column = data.detect_text_column(train_docs, settings.text_column, empty_hint=hint)
    data.check_not_empty(train_docs, text_column, "training", hint=hint)
    return train_docs, eval_docs, text_column


def trained_tokenizer(settings, accelerator, output_dir: Path, train_docs, text_column) -> str:
    """--train_tokenizer: a byte-level BPE trained by the main process on the first --tokenizer_train_docs training
    documents, saved to <output_dir>/tokenizer (atomically), which every process then loads. Returns that path."""
    folder = output_dir / rundir.TOKENIZER_DIR

    def train_and_save():
        texts = [t for t in (row[text_column] for row in data.first_rows(train_docs, settings.tokenizer_train_docs))
                 if isinstance(t, str) and t]
        size = settings.vocab_size or data.auto_vocab_size(texts, settings.min_vocab_size, settings.max_vocab_size)
        tokenizer = data.train_tokenizer(texts, size)
        partial = rundir.partial_of(folder)
        if partial.exists() or folder.exists() or folder.is_symlink():  # the start-up check cleared them
            raise UserError(f"{folder} is in the way of --train_tokenizer's tokenizer; move it")
        partial.mkdir()
        (partial / rundir.TRAINER_MARK).touch()  # stays: tells this trainer's tokenizer/ from a user's
        tokenizer.save_pretrained(partial)
        os.replace(partial, folder)
        accelerator.print(f"--train_tokenizer: byte-level BPE of {len(tokenizer)} tokens ({size} asked"
                          f"{', --auto_vocab_size' if not settings.vocab_size else ''}) from {len(texts)} documents "
                          f"-> {folder}")

    main_decides(accelerator, train_and_save)
    return str(folder)


def read_inputs(run: RunConfig, state: RunState, accelerator, output_dir, resume_state) -> tuple:
    """Everything that reads user input, before any model is built: the data, the tokenizer (loaded or trained),
    the configuration (checked against the checkpoint's), the disk space. Settles `state`'s tokenizer, size and
    step count; returns (tokenizer, config, train_docs, text_column, eval_set)."""
    checkpoint, model_args, optim = state.checkpoint, run.model, run.optim
    models.check_target_fits(model_args, accelerator)
    train_docs, eval_docs, text_column = read_data(run.data, optim.seed)
    saved_source = checkpoint or state.init_from  # where the tokenizer comes from when --tokenizer_name is not given
    state.tokenizer_name = run.data.tokenizer_name or str(saved_source or data.BUILTIN_TOKENIZER)
    if run.data.train_tokenizer and not checkpoint:  # a resume keeps the tokenizer its checkpoint holds
        state.tokenizer_name = trained_tokenizer(run.data, accelerator, output_dir, train_docs, text_column)
    try:
        tokenizer = data.load_tokenizer(state.tokenizer_name)
    except data.DataError as error:
        if run.data.tokenizer_name or not model_args.init_from:
            raise
        raise UserError(f"--init_from {model_args.init_from} has no usable tokenizer ({error}); give "
                        f"--tokenizer_name, the tokenizer the model was trained with") from error
    saved_args = resume_state["args"] if checkpoint else {}
    if checkpoint and model_args.init_from and model_args.init_from != saved_args.get("init_from"):
        raise UserError(f"--init_from {model_args.init_from} differs from that of the run in checkpoint {checkpoint} "
                        f"({saved_args.get('init_from')}): a resume continues from the checkpoint's weights; drop "
                        f"--init_from or give the run's")
    state.model_size = model_args.model_size
    if checkpoint:
        config = models.checkpoint_config(model_args, run.e2e, run.data, checkpoint, saved_args)
        state.model_size = model_args.model_size or saved_args.get("model_size")
        if run.data.tokenizer_name is not None:
            data.check_same_tokenizer(tokenizer, data.load_tokenizer(str(checkpoint)), run.data.tokenizer_name,
                                      checkpoint)
    elif state.init_from:
        config = models.init_config(model_args, run.e2e, state.init_from, report=accelerator.print)
        if len(tokenizer) > config.vocab_size:
            raise UserError(f"tokenizer {state.tokenizer_name} has {len(tokenizer)} tokens, more than the "
                            f"vocabulary of --init_from {model_args.init_from} ({config.vocab_size})")
    else:
        config = models.build_config(model_args, run.e2e, len(tokenizer), tokenizer.bos_token_id,
                                     tokenizer.eos_token_id, report=accelerator.print)
    family = families.family_of(config)
    refusal = family.check_run(config, run.data.seq_length)
    if refusal:
        raise UserError(refusal)
    kernels = family.kernels(config, accelerator.device)
    if run.perf.require_fused_kernels and not kernels.fused:
        raise UserError(f"--require_fused_kernels: this run would use the {kernels.detail}; for the fused "
                        f"kernels: {kernels.install}")
    if accelerator.is_main_process:
        ckpt.check_disk_space(output_dir, models.parameter_count(config))
    state.max_train_steps = optim.max_train_steps
    if optim.num_train_epochs is not None:  # the step count the epochs make; the same on resume (same data)
        per_step = optim.per_device_train_batch_size * optim.gradient_accumulation_steps * accelerator.num_processes
        state.max_train_steps, tokens, blocks = data.steps_for_epochs(
            train_docs, tokenizer, text_column, run.data.seq_length, per_step, optim.num_train_epochs)
        accelerator.print(f"--num_train_epochs {optim.num_train_epochs:g}: {tokens} training tokens, {blocks} blocks "
                          f"of {run.data.seq_length}, {per_step} per step -> {state.max_train_steps} steps")
        if optim.lr_warmup_steps is not None and optim.lr_warmup_steps > state.max_train_steps:
            raise UserError(f"--lr_warmup_steps ({optim.lr_warmup_steps}) exceeds the {state.max_train_steps} steps "
                            f"of --num_train_epochs {optim.num_train_epochs:g}")
    # a checkpoint at the last step without a final model (a kill while it was written) finishes the run
    if checkpoint and (resume_state["step"] > state.max_train_steps or (
            resume_state["step"] == state.max_train_steps and (output_dir / rundir.FINAL_MODEL).exists())):
        raise UserError(f"checkpoint {checkpoint} is at step {resume_state['step']}, not before "
                        f"--max_train_steps {state.max_train_steps}; raise --max_train_steps to train further")
    eval_set = data.eval_blocks(eval_docs, tokenizer, text_column, run.data.seq_length, run.data.max_eval_samples)
    return tokenizer, config, train_docs, text_column, eval_set


def _train(run: RunConfig, state: RunState, accelerator, directory: RunDirectory, handle_signals=False):
    optim, perf, output_dir = run.optim, run.perf, directory.path
    resume_state = claim_output_dir(accelerator, run, state, directory)
    checkpoint = state.checkpoint
    repo_id = main_decides(accelerator, lambda: publish.prepare(run.hub, output_dir)) if run.hub.push_to_hub else None
    publisher = publish.Publisher(repo_id, run.hub.hub_strategy) if repo_id and accelerator.is_main_process else None
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = perf.tf32
    set_seed(optim.seed)
    tokenizer, config, train_docs, text_column, eval_set = read_inputs(run, state, accelerator, output_dir,
                                                                       resume_state)
    run_args = {**run.flat(), **state.recorded()}  # what checkpoints and training_args.json record

    saved_args = resume_state["args"] if checkpoint else None
    lora = models.lora_settings(run.lora, saved_args)
    if lora:  # the base weights come from --init_from on resume too: checkpoints hold only the adapters
        base = run.model.init_from or (saved_args or {}).get("init_from")
        local_base = state.init_from if run.model.init_from else \
            main_decides(accelerator, lambda: download_model(base) if is_remote(base) else base)
        model = models.load_initial_model(local_base, config)
        if perf.gradient_checkpointing:
            models.enable_activation_checkpointing(model)
        model = models.apply_lora(model, lora)
        run_args.update(use_lora=True, init_from=base, **lora)
    else:
        model = models.load_initial_model(state.init_from, config) if state.init_from and not checkpoint \
            else models.build_model(config)
        if perf.gradient_checkpointing:
            models.enable_activation_checkpointing(model)
    optimizer = build_optimizer(model, optim, families.family_of(config).no_decay, accelerator.device)
    # The scheduler is neither `prepare`d (Accelerate would step it once per process; ours steps once per optimizer
    # step) nor registered for Accelerate's checkpointing (which unpickles it): its state goes into trainer_state.
    scheduler = build_scheduler(optim, state.max_train_steps, optimizer)
    model, optimizer = accelerator.prepare(model, optimizer)

    step, elapsed_before, data_states = 0, 0.0, [None] * accelerator.num_processes
    if checkpoint:
        ckpt.load_training_state(accelerator, model, scheduler, checkpoint, resume_state)
        step, elapsed_before = resume_state["step"], resume_state.get("elapsed", 0.0)
        data_states = resume_data_states(resume_state["data"], accelerator.num_processes, accelerator)
        if optim.learning_rate != saved_args["learning_rate"]:
            scheduler.base_lrs = [optim.learning_rate] * len(scheduler.base_lrs)
        changes = describe_changes(run_args, saved_args)
        accelerator.print(f"resumed from {checkpoint} at step {step}" + (f"; changed: {changes}" if changes else ""))

    train_batches = data.PackedBlocks(train_docs, tokenizer, text_column, run.data.seq_length,
                                      optim.per_device_train_batch_size, optim.seed, accelerator.process_index,
                                      accelerator.num_processes, state=data_states[accelerator.process_index])
    if accelerator.is_main_process:
        for note in directory.branch_from(step) if checkpoint else []:
            accelerator.print(note)
        (output_dir / rundir.TRAINING_ARGS).write_text(json.dumps(run_args, indent=2))
    log = MetricsLog(accelerator, output_dir, resumed_at=step if checkpoint else None)
    start_time = time.time()
    elapsed = lambda: elapsed_before + time.time() - start_time  # seconds over all resumed segments
    tokens_per_step = optim.per_device_train_batch_size * run.data.seq_length * optim.gradient_accumulation_steps \
        * accelerator.num_processes
    # training tokens over all resumed segments (a checkpoint that predates the count: its steps at this step size)
    tokens = resume_state.get("tokens", step * tokens_per_step) if checkpoint else 0
    checkpointer = ckpt.Checkpointer(run.checkpoints, state.max_train_steps, accelerator, directory, model, tokenizer,
                                     scheduler, train_batches, run_args, elapsed, tokens=lambda: tokens,
                                     publisher=publisher)
    if checkpoint and step >= state.max_train_steps:  # a kill while the final model was written: write it now
        checkpointer.save_final(step)
        accelerator.print(f"checkpoint {checkpoint} is the end of the run; wrote {output_dir / rundir.FINAL_MODEL}")
        return step

    if perf.data_prefetch:
        train_batches = checkpointer.stream = data.Prefetcher(train_batches, perf.data_prefetch, perf.pin_memory)
    start_trackers(accelerator, run.logging, run_args, output_dir)
    accum, last_step = optim.gradient_accumulation_steps, state.max_train_steps
    params = sum(p.numel() for p in accelerator.unwrap_model(model).parameters())
    kernels = families.family_of(config).kernels(config, accelerator.device)
    log.note({"step": step, "event": "start", **kernels.record()})
    accelerator.print(f"model: {models.describe(config)}, {params / 1e6:.2f}M parameters ({kernels.detail}); "
                      f"{tokens_per_step} tokens per step on {accelerator.num_processes} process(es); "
                      f"{describe_setup(accelerator)}; writing to {directory.where}")
    if run.model.init_from and not checkpoint:
        accelerator.print(f"weights from --init_from {run.model.init_from} (optimizer and schedule start fresh)")
    if lora:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        accelerator.print(f"LoRA: rank {lora['lora_rank']}, alpha {lora['lora_alpha']:g}, {trainable} trainable "
                          f"parameters ({100 * trainable / params:.2f}% of {params}); checkpoints hold the adapters")
    metrics = StepMetrics(log, accelerator, run.logging.logging_steps, last_step, tokens_per_step,
                          training_flops_per_token(config, params, run.data.seq_length),
                          perf.peak_tflops or gpu_peak_tflops(), elapsed)
    evaluator = Evaluator(model, eval_set, accelerator, optim.per_device_eval_batch_size, run.logging.eval_steps,
                          last_step, log, families.family_of(config).ttt_statistics)
    inner_loop = InnerLoopMetrics(log, accelerator, run.logging.logging_steps, last_step, config)
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    guard = DivergenceGuard(optim.on_nonfinite, output_dir, log)
    # The bar starts after this process's first step: its rate and ETA then leave out start-up, compilation and a
    # resumed stream's fast-forward, which a bar made here counted as one step's time (hours of ETA after a resume).
    progress = None
    stop_now = False
    with StopRequest(handle_signals) as stop:
        model.train()
        while step < last_step:
            # one optimizer step: forward/backward over the accumulated micro-batches, clip, AdamW, schedule
            step_loss = torch.zeros((), device=accelerator.device)
            if inner_loop.enabled:  # TTT-E2E: the inner step size's warm-up over outer steps
                unwrapped.inner_lr_multiplier = config.ilr_multiplier(step)
            for micro in range(accum):
                input_ids = next(train_batches).to(accelerator.device, non_blocking=perf.pin_memory)
                with accelerator.no_sync(model) if micro < accum - 1 else nullcontext():
                    output = model(input_ids=input_ids, labels=input_ids)
                    accelerator.backward(output.loss / accum)
                step_loss += output.loss.detach() / accum
                inner_loop.add(output)
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), optim.max_grad_norm or math.inf)
            stop_now, nonfinite = synchronised_flags(accelerator, stop, step_loss, grad_norm)
            if guard.allows_update(step + 1, nonfinite, step_loss, grad_norm):
                optimizer.step()
                metrics.add(step_loss)
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            if progress is None:
                progress = tqdm(total=last_step, initial=step, disable=not accelerator.is_local_main_process)
            else:
                progress.update(1)

            tokens += tokens_per_step
            metrics.after_step(step, scheduler.get_last_lr()[0], grad_norm)
            inner_loop.after_step(step, getattr(unwrapped, "inner_lr_multiplier", 1.0))
            eval_loss = evaluator.after_step(step)
            checkpointer.after_step(step, stop_now, eval_loss)
            if stop_now:
                break
    if progress is not None:
        progress.close()
    if perf.data_prefetch:
        train_batches.close()
    if stop_now and step < last_step:
        accelerator.end_training()
        signum = stop.signum or signal.SIGTERM  # a process that got no signal itself stops with the one that did
        raise Stopped(f"stopped by {signal.Signals(signum).name} at step {step} of {last_step}: saved "
                      f"checkpoint-{step}; resume with: {resume_command()}", signum)
    if step == last_step:
        checkpointer.save_final(step, merge_lora=bool(lora) and run.lora.merge_lora, eval_loss=evaluator.last)
        if accelerator.is_main_process:
            write_summary(output_dir / SUMMARY_FILE, step=step, tokens=tokens, elapsed=elapsed(), parameters=params,
                          final_eval_loss=evaluator.last, best=checkpointer.best, kernels=kernels)
            directory.upload(SUMMARY_FILE, METRICS_FILE)
        accelerator.print(f"done: {output_dir / rundir.FINAL_MODEL}")
        if publisher:
            publisher.final_model_saved(output_dir / rundir.FINAL_MODEL, step)
            accelerator.print(f"pushed {rundir.FINAL_MODEL} to {hub.endpoint()}/{publisher.repo_id}")
    accelerator.end_training()
    return step
