"""The model card (README.md, the Hub's format) of every folder this project writes with a model in it: YAML
metadata (library, pipeline, tags, datasets, license) and what a reader of the model needs: the architecture and
size, how it was trained (data, tokens, steps, sequence length, hyper-parameters, the command), its validation
loss, how to load it, and the paper to cite. Built with huggingface_hub's ModelCard."""

from huggingface_hub import ModelCard, ModelCardData

from ttt_train import families, hub
from ttt_train.cli import command_line
from ttt_train.metrics import perplexity

LOAD = """```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{name}"{remote})
tokenizer = AutoTokenizer.from_pretrained("{name}")
```"""
HYPER_PARAMETERS = ("learning_rate", "lr_scheduler_type", "warmup_ratio", "lr_warmup_steps", "weight_decay",
                    "max_grad_norm", "per_device_train_batch_size", "gradient_accumulation_steps", "mixed_precision",
                    "seed")


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def describe(config) -> tuple:
    """(family, words): the model's family record (None for a model of no family) and its description."""
    try:
        family = families.family_of(config)
    except ValueError:
        return None, config.model_type
    return family, family.describe(config)


def model_card(model, state: dict | None = None, source: dict | None = None, name: str = "path/to/this/folder"):
    """The card of `model` saved by the trainer (`state`: the trainer state, with the run's args) or converted
    (`source`: where the weights came from)."""
    config = model.config
    family, what = describe(config)
    args = (state or {}).get("args", {})
    dataset = args.get("dataset_name")
    hub_dataset = dataset if dataset and not dataset.startswith("builtin:") and not hub.looks_local(dataset) else None
    data = ModelCardData(library_name="transformers", pipeline_tag="text-generation", license="mit",
                         tags=["test-time-training", family.name if family else config.model_type, "causal-lm"],
                         datasets=[hub_dataset] if hub_dataset else None)
    remote = ", trust_remote_code=True" if getattr(config, "auto_map", None) else ""
    lines = [f"# {what}", "",
             f"A {what} language model, {parameters(model) / 1e6:.2f}M parameters: hidden size {config.hidden_size}, "
             f"{config.num_hidden_layers} layers, vocabulary {config.vocab_size}.", ""]
    if family and family.name == "ttt":
        lines += [f"Inner model: TTT-{config.ttt_layer_type.capitalize()} with mini-batches of "
                  f"{config.mini_batch_size} tokens, inner learning rate {config.ttt_base_lr}; backbone options "
                  f"pre_conv={config.pre_conv}, "
                  f"share_qk={config.share_qk}, use_gate={config.use_gate}. The scan runs on Triton kernels on a "
                  "CUDA GPU where they apply (ttt_kernels.py, beside the weights), else in PyTorch.", ""]
    lines += ["## Use", "", LOAD.format(name=name, remote=remote), ""]
    if remote:
        lines += ["The model's code (`ttt.py` and the files it imports) is in this folder; `trust_remote_code=True` "
                  "runs it.", ""]
    if state:
        lines += training_section(state, args)
    if source:
        lines += ["## Origin", "", "Converted from an official checkpoint by `convert_jax_checkpoint.py`:", "",
                  *(f"- {key}: `{value}`" for key, value in source.items()), ""]
    if family and family.paper:
        lines += ["## Citation", "", family.paper, ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def training_section(state: dict, args: dict) -> list:
    tokens, step = state.get("tokens"), state.get("step")
    lines = ["## Training", "",
             f"- data: `{args.get('dataset_name')}`" + (f" ({args['dataset_config']})" if args.get("dataset_config")
                                                         else ""),
             f"- tokenizer: `{args.get('tokenizer_name')}`",
             f"- steps: {step}" + (f" of {args['max_train_steps']}" if args.get("max_train_steps") else ""),
             f"- training tokens: {tokens:,}" if tokens is not None else "- training tokens: not recorded",
             f"- sequence length: {args.get('seq_length')}",
             "- hyper-parameters: " + ", ".join(f"{k} {args[k]}" for k in HYPER_PARAMETERS if args.get(k) is not None)]
    if args.get("use_lora"):
        lines.append(f"- LoRA: rank {args.get('lora_rank')}, alpha {args.get('lora_alpha')}, from "
                     f"`{args.get('init_from')}`")
    elif args.get("init_from"):
        lines.append(f"- initialised from `{args['init_from']}`")
    if state.get("eval_loss") is not None:
        lines.append(f"- validation loss at step {step}: {state['eval_loss']:.4f} (perplexity "
                     f"{perplexity(state['eval_loss']):.2f})")
    best = state.get("best")
    if best:
        lines.append(f"- best validation loss: {best[1]:.4f} (perplexity {perplexity(best[1]):.2f}) at step {best[0]}")
    lines += ["", "Produced by:", "", "```bash", args.get("command") or command_line(), "```", ""]
    return lines
