# Copyright 2026 the TTT-LM PyTorch authors. MIT License.
"""Official JAX checkpoints to Hugging Face folders.

    python convert_jax_checkpoint.py ttt --checkpoint PATH --output_dir OUT [--tokenizer_name TOK]
    python convert_jax_checkpoint.py e2e --params PARAMS.safetensors --official_config CONFIG.json --output_dir OUT

`ttt` reads what the official ttt-lm-jax trainer writes (test-time-training/ttt-lm-jax, StreamingCheckpointer):
a run folder (its latest `streaming_train_state` or `streaming_params`), a `step_N` milestone folder, or one of
those files. Every dimension and backbone option that the tensors determine is inferred from them; the rest
(the inner learning rate, RoPE theta, RMSNorm eps) come from flags whose defaults are the official recipes', or
from the run's JAX config (`--official_config`). The output folder loads with
`AutoModelForCausalLM.from_pretrained` after `import ttt` and computes the JAX model's logits.

Nothing is unpickled: the `.pkl` files beside a checkpoint need the JAX code and are untrusted input. Only the
msgpack records are read, every one is checked (shape, dtype, size, finiteness), and a missing, extra or
mis-shaped parameter is one error line naming it, before anything is written.

The on-disk format (flax.serialization, as StreamingCheckpointer writes it): a concatenation of msgpack pairs
[key, value], one per leaf of the flattened train state; key = the leaf's path (list of str; an element may hold a
"/", e.g. "ttt_norm/scale"), value = msgpack bytes of ExtType(1, msgpack([shape, dtype name, C-order bytes])),
or of a dict {"__msgpack_chunked_array__": True, "shape": ..., "chunks": ...} for arrays over 2**30 bytes.
Floats are stored as bfloat16 by default (--checkpointer.float_dtype), which converts to float32 exactly.

`e2e` reads an official TTT-E2E parameter tree (test-time-training/e2e: equinox paths joined by ".", the blocks'
tensors stacked over layers, dense kernels [in, out]) saved as safetensors, with the run's configuration, and
writes a folder that loads after `import ttt_e2e` (mapping: e2e_mapping). The official trainer's orbax checkpoint
directories are not read: their on-disk layout is not verified here (no official checkpoint to test against).
"""

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

# torch, msgpack and transformers are imported where used: --help stays fast.

# The official recipes (ttt-lm-jax scripts/ttt_{linear,mlp}/*.sh): eta_base 1.0 for TTT-Linear, 0.1 for TTT-MLP.
RECIPE_TTT_BASE_LR = {"linear": 1.0, "mlp": 0.1}
RECIPE_ROPE_THETA = 10000.0
RECIPE_RMS_NORM_EPS = 1e-6
TRAIN_STATE_FILE, PARAMS_FILE = "streaming_train_state", "streaming_params"
PARAMS_PREFIX = ("params", "params")  # a train state's parameters; a params-only file has no prefix
# Array dtypes flax writes (numpy dtype names) -> torch dtypes, and bytes per element.
DTYPES = {"bfloat16": ("bfloat16", 2), "float32": ("float32", 4), "float16": ("float16", 2),
          "float64": ("float64", 8), "int32": ("int32", 4), "int64": ("int64", 8), "uint32": ("int32", 4),
          "int8": ("int8", 1), "uint8": ("uint8", 1), "bool": ("bool", 1)}
MAX_RECORD_BYTES = 2**31  # flax chunks arrays above 2**30 bytes; a larger record is not a flax leaf


class ConversionError(Exception):
    """Bad input to the converter: the message is the one line the user sees."""


# ----------------------------------------------------------------------------------------------------------------
# Reading a StreamingCheckpointer file


def find_checkpoint_file(path: Path) -> Path:
    """The msgpack file PATH names: the file itself, or in a folder its latest state (`streaming_train_state`,
    else `streaming_params`), or in a `step_N` milestone folder `streaming_train_state_N`/`streaming_params_N`.
    The official loader's `trainstate_params::PATH` / `params::PATH` spelling is accepted too."""
    path = Path(re.sub(r"^(trainstate_params|trainstate|params)::", "", str(path)))
    if path.is_file():
        return path
    if not path.exists():
        raise ConversionError(f"--checkpoint {path} does not exist")
    if not path.is_dir():
        raise ConversionError(f"--checkpoint {path} is neither a file nor a folder")
    step = re.fullmatch(r"step_(\d+)", path.name)
    suffix = f"_{step.group(1)}" if step else ""
    for name in (TRAIN_STATE_FILE + suffix, PARAMS_FILE + suffix):
        if (path / name).is_file():
            return path / name
    milestones = sorted(p.name for p in path.glob("step_*") if p.is_dir())
    hint = f"; milestones here: {', '.join(milestones)}" if milestones else ""
    raise ConversionError(f"--checkpoint {path} holds no {TRAIN_STATE_FILE}{suffix} or {PARAMS_FILE}{suffix} "
                          f"(a ttt-lm-jax run folder or step_N milestone){hint}")


def _decode_array(shape, dtype_name, data, where: str):
    import torch

    if dtype_name not in DTYPES:
        raise ConversionError(f"{where}: unsupported array dtype {dtype_name!r}")
    if not isinstance(shape, (list, tuple)) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise ConversionError(f"{where}: malformed array shape {shape!r}")
    torch_name, itemsize = DTYPES[dtype_name]
    count = 1
    for n in shape:
        count *= n
    if not isinstance(data, bytes) or len(data) != count * itemsize:
        raise ConversionError(f"{where}: {dtype_name}{list(shape)} needs {count * itemsize} bytes, the record holds "
                              f"{len(data) if isinstance(data, bytes) else type(data).__name__}")
    flat = torch.frombuffer(bytearray(data), dtype=getattr(torch, torch_name)) if count else \
        torch.empty(0, dtype=getattr(torch, torch_name))
    return flat.reshape(shape)


def decode_leaf(value: bytes, where: str):
    """One record's value (flax.serialization.to_bytes of an array) as a torch tensor."""
    import msgpack
    import torch

    def ext_hook(code, data):
        try:
            if code == 1:  # ndarray: [shape, dtype name, raw bytes]
                shape, dtype_name, raw = msgpack.unpackb(data, raw=False)
                return _decode_array(shape, dtype_name, raw, where)
            if code == 3:  # numpy scalar: [dtype name, raw bytes]
                dtype_name, raw = msgpack.unpackb(data, raw=False)
                return _decode_array([], dtype_name, raw, where)
        except (ValueError, TypeError, msgpack.UnpackException) as error:
            raise ConversionError(f"{where}: corrupted array record ({error})") from error
        raise ConversionError(f"{where}: unsupported msgpack extension type {code}")

    if not isinstance(value, bytes):
        raise ConversionError(f"{where}: corrupted record (value is {type(value).__name__}, not bytes)")
    try:
        leaf = msgpack.unpackb(value, ext_hook=ext_hook, raw=False, strict_map_key=False)
    except ConversionError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as error:
        raise ConversionError(f"{where}: corrupted record ({error})") from error
    if isinstance(leaf, dict) and leaf.get("__msgpack_chunked_array__"):  # flax's split of arrays > 2**30 bytes
        try:
            shape = [leaf["shape"][str(i)] for i in range(len(leaf["shape"]))]
            chunks = [leaf["chunks"][str(i)] for i in range(len(leaf["chunks"]))]
            flat = torch.cat([c.reshape(-1) for c in chunks])
            return flat.reshape(shape)
        except (KeyError, TypeError, AttributeError, RuntimeError) as error:
            raise ConversionError(f"{where}: corrupted chunked array ({error})") from error
    if isinstance(leaf, (int, float)):
        return torch.tensor(leaf)
    if not isinstance(leaf, torch.Tensor):
        raise ConversionError(f"{where}: corrupted record (holds {type(leaf).__name__}, not an array)")
    return leaf


def read_records(path: Path, keep=lambda key: True) -> dict:
    """{key tuple: tensor} for the records of `path` whose key `keep` accepts (the others are skipped undecoded:
    an optimizer state's moments cost no memory). A truncated file, bytes after the last record or a record that
    is not a [key, value] pair is one ConversionError."""
    import msgpack

    records, size = {}, path.stat().st_size
    with open(path, "rb") as f:
        unpacker = msgpack.Unpacker(f, raw=False, max_buffer_size=MAX_RECORD_BYTES, strict_map_key=False)
        index, end = -1, 0
        try:
            for index, record in enumerate(unpacker):
                end = unpacker.tell()  # where this complete record ends
                if not (isinstance(record, list) and len(record) == 2 and isinstance(record[0], list)
                        and all(isinstance(k, str) for k in record[0])):
                    raise ConversionError(f"{path}: record {index} is not a [key path, value] pair: the file is "
                                          f"corrupted or not a ttt-lm-jax checkpoint")
                key = tuple(record[0])
                if key in records:
                    raise ConversionError(f"{path}: parameter {'/'.join(key)} appears twice")
                if keep(key):
                    records[key] = decode_leaf(record[1], f"{path}: {'/'.join(key)}")
        except ConversionError:
            raise
        except (ValueError, TypeError, msgpack.UnpackException) as error:  # bytes that are no msgpack
            raise ConversionError(f"{path}: corrupted after record {index} ({error})") from error
        if end != size:  # the Unpacker stops quietly at an incomplete last object
            raise ConversionError(f"{path} is truncated: it ends inside record {index + 1} (the last complete record "
                                  f"ends at byte {end} of {size})")
    if index < 0:
        raise ConversionError(f"{path} holds no records: it is empty or not a ttt-lm-jax checkpoint")
    return records


def read_jax_params(path: Path) -> tuple:
    """(params {"a/b/c": tensor}, step or None) of a train-state or params-only checkpoint file. Keys are joined
    with "/" (unambiguous: an element holding a "/" is a leaf name)."""
    keep = lambda key: key[:2] == PARAMS_PREFIX or key == ("step",) or key[0] != "opt_state"
    records = read_records(path, keep)
    train_state = any(key[:2] == PARAMS_PREFIX for key in records)
    step = records.pop(("step",), None)
    if train_state:
        params = {"/".join(k[2:]): v for k, v in records.items() if k[:2] == PARAMS_PREFIX}
    else:
        params = {"/".join(k): v for k, v in records.items()}
    if not params:
        raise ConversionError(f"{path} holds no parameters (no params/params/... records)")
    return params, (int(step) if step is not None else None)


# ----------------------------------------------------------------------------------------------------------------
# TTT-Linear / TTT-MLP (ttt-lm-jax) -> ttt.py


def _layer_indices(params: dict) -> list:
    indices = sorted({int(m.group(1)) for k in params if (m := re.match(r"model/h/(\d+)/", k))})
    if indices != list(range(len(indices))) or not indices:
        raise ConversionError(f"the checkpoint's layers are {indices or 'missing'}, not 0..N-1: not a complete "
                              f"ttt-lm-jax model")
    return indices


def _shape(params: dict, key: str) -> list:
    if key not in params:
        raise ConversionError(f"missing parameter {key}: not a ttt-lm-jax TTT model, or a damaged checkpoint")
    return list(params[key].shape)


def infer_ttt_architecture(params: dict) -> dict:
    """The TTTConfig fields the tensors determine (read from layer 0; every layer is checked by mapping)."""
    vocab_size, hidden_size = _shape(params, "model/wte/embedding")
    layers = _layer_indices(params)
    block = "model/h/0/seq_modeling_block/"
    heads = _shape(params, block + "learnable_ttt_lr/kernel")[0]
    if heads < 1 or hidden_size % heads:
        raise ConversionError(f"{block}learnable_ttt_lr/kernel has {heads} heads, which do not divide hidden size "
                              f"{hidden_size}")
    arch = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=len(layers),
                num_attention_heads=heads, intermediate_size=_shape(params, "model/h/0/feed_forward/w1/kernel")[-1],
                ttt_layer_type="mlp" if block + "ttt_dense_1" in params else "linear",
                mini_batch_size=_shape(params, block + "learnable_token_idx")[0],
                pre_conv="model/h/0/conv/conv1/kernel" in params,
                share_qk=block + "wk/kernel" not in params,
                use_gate=block + "wg/kernel" in params,
                tie_word_embeddings="lm_head/kernel" not in params)
    conv = "model/h/0/conv/conv1/kernel" if arch["pre_conv"] else block + "conv_q/kernel"
    arch["conv_kernel"] = _shape(params, conv)[0] if conv in params else 4
    return arch


def ttt_mapping(config) -> dict:
    """ttt.py state_dict key -> (JAX path, None, transform) for `config` (the format of map_state_dict; no stacked
    layer axis here): the table of ../shared/reference_jax/README.md.
    Transforms: "T" Dense kernel [in, out] -> Linear weight [out, in]; "conv" flax Conv [K, 1, C] -> torch
    Conv1d [C, 1, K]; "lr" [H, C, 1] -> [H, 1, C]; None unchanged. A tied lm_head is the embedding, not a key."""
    table = {"model.embed_tokens.weight": ("model/wte/embedding", None, None),
             "model.norm.weight": ("model/ln_f/kernel", None, None)}
    if not config.tie_word_embeddings:
        table["lm_head.weight"] = ("lm_head/kernel", None, "T")
    for n in range(config.num_hidden_layers):
        jax, pt = f"model/h/{n}/", f"model.layers.{n}."
        layer = {"seq_norm.weight": ("seq_norm/kernel", None), "ffn_norm.weight": ("ffn_norm/kernel", None),
                 "mlp.gate_proj.weight": ("feed_forward/w1/kernel", "T"),
                 "mlp.up_proj.weight": ("feed_forward/w3/kernel", "T"),
                 "mlp.down_proj.weight": ("feed_forward/w2/kernel", "T")}
        if config.pre_conv:
            layer |= {"conv.norm.weight": ("conv/conv_norm/kernel", None),
                      "conv.conv.weight": ("conv/conv1/kernel", "conv"), "conv.conv.bias": ("conv/conv1/bias", None)}
        block = {"q_proj.weight": ("wq/kernel", "T"), "v_proj.weight": ("wv/kernel", "T"),
                 "o_proj.weight": ("wo/kernel", "T"), "learnable_token_idx": ("learnable_token_idx", None),
                 "learnable_ttt_lr_weight": ("learnable_ttt_lr/kernel", "lr"),
                 "learnable_ttt_lr_bias": ("learnable_ttt_lr/bias", None),
                 "ttt_norm_weight": ("ttt_norm/scale", None), "ttt_norm_bias": ("ttt_norm/bias", None),
                 "post_norm.weight": ("post_norm/scale", None), "post_norm.bias": ("post_norm/bias", None),
                 "W1": ("ttt_dense_0", None), "b1": ("ttt_bias_0", None)}
        if config.ttt_layer_type == "mlp":
            block |= {"W2": ("ttt_dense_1", None), "b2": ("ttt_bias_1", None)}
        if config.share_qk:
            block |= {"conv_q.weight": ("conv_q/kernel", "conv"), "conv_q.bias": ("conv_q/bias", None),
                      "conv_k.weight": ("conv_k/kernel", "conv"), "conv_k.bias": ("conv_k/bias", None)}
        else:
            block["k_proj.weight"] = ("wk/kernel", "T")
        if config.use_gate:
            block["g_proj.weight"] = ("wg/kernel", "T")
        table |= {pt + k: (jax + p, None, t) for k, (p, t) in layer.items()}
        table |= {pt + "seq_modeling_block." + k: (jax + "seq_modeling_block/" + p, None, t)
                  for k, (p, t) in block.items()}
    return table


TRANSFORMS = {None: lambda x: x, "T": lambda x: x.T, "conv": lambda x: x.permute(2, 1, 0),
              "lr": lambda x: x.permute(0, 2, 1)}


def map_state_dict(params: dict, mapping: dict, expected: dict, extra_hint: str) -> dict:
    """The model's state dict from the official params through `mapping` (key -> (path, index along the path's
    stacked layer axis or None, transform)), every parameter checked: none missing, none left over (`extra_hint`
    says what to check), each floating point, of the model's shape (`expected`: {key: shape}), finite."""
    import torch

    paths = {path for path, _, _ in mapping.values()}
    missing = sorted(paths - set(params))
    if missing:
        raise ConversionError(f"missing parameter {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1
                                                                   else ""))
    extra = sorted(set(params) - paths)
    if extra:
        raise ConversionError(f"unexpected parameter {extra[0]}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1
                                                                    else "") + f": {extra_hint}")
    stacked = {path: sum(1 for p, i, _ in mapping.values() if p == path and i is not None) for path in params}
    state = {}
    for key, (path, index, transform) in mapping.items():
        value = params[path]
        if not value.is_floating_point():
            raise ConversionError(f"parameter {path} is {value.dtype}, not a floating-point array")
        if index is not None:
            if value.ndim == 0 or value.shape[0] != stacked[path]:
                raise ConversionError(f"parameter {path} has shape {list(value.shape)}: its leading (layer) axis "
                                      f"should be {stacked[path]}")
            value = value[index]
        value = TRANSFORMS[transform](value).float().contiguous()
        if list(value.shape) != list(expected[key]):
            if index is not None:
                raise ConversionError(f"parameter {path} has shape {list(params[path].shape)}, which does not give "
                                      f"{list(expected[key])} for {key}")
            raise ConversionError(f"parameter {path} has shape {list(params[path].shape)}, expected "
                                  f"{list(TRANSFORMS[transform](torch.empty(expected[key], device='meta')).shape)} "
                                  f"for {key}")
        if not torch.isfinite(value).all():
            raise ConversionError(f"parameter {path} holds non-finite values: the checkpoint is corrupted")
        state[key] = value
    return state


def read_official_config(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConversionError(f"cannot read --official_config {path}: {error}") from error
    if not isinstance(config, dict):
        raise ConversionError(f"--official_config {path}: expected a JSON object (the JAX ModelConfig.to_dict())")
    return config


def settle(name: str, flag, official: dict, official_key: str, default):
    """A setting the tensors do not determine: the flag, else the official config's, else the recipe's; a flag
    that contradicts the official config is an error (one source of truth)."""
    value = official.get(official_key)
    if flag is not None and value is not None and float(flag) != float(value):
        raise ConversionError(f"--{name} {flag} contradicts --official_config ({official_key}={value})")
    return flag if flag is not None else value if value is not None else default


def check_expectations(args, arch: dict, official: dict):
    """Sizes the user states (flags, or the official config) must be those of the tensors."""
    from ttt import TTT_STANDARD_CONFIGS

    stated = {}
    if args.model_size is not None:
        stated |= {k: (v, f"--model_size {args.model_size}") for k, v in TTT_STANDARD_CONFIGS[args.model_size].items()}
    if args.ttt_layer_type is not None:
        stated["ttt_layer_type"] = (args.ttt_layer_type, f"--ttt_layer_type {args.ttt_layer_type}")
    block = official.get("seq_modeling_block")
    if block is not None:
        stated["ttt_layer_type"] = ({"ttt_linear": "linear", "ttt_mlp": "mlp"}.get(block, block),
                                    f"--official_config (seq_modeling_block={block})")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "mini_batch_size", "pre_conv", "tie_word_embeddings"):
        if key in official:
            stated[key] = (official[key], f"--official_config ({key}={official[key]})")
    if "conv_width" in official and (arch["pre_conv"] or arch["share_qk"]):
        stated["conv_kernel"] = (official["conv_width"], f"--official_config (conv_width={official['conv_width']})")
    for key, (value, source) in stated.items():
        if arch[key] != value:
            raise ConversionError(f"{source} says {key}={value}, but the checkpoint's tensors have {key}={arch[key]}")


def convert_ttt(args) -> tuple:
    """(model, provenance) from a ttt-lm-jax checkpoint, everything checked; nothing written."""
    import ttt

    source = find_checkpoint_file(Path(args.checkpoint))
    official = read_official_config(args.official_config)
    params, step = read_jax_params(source)
    arch = infer_ttt_architecture(params)
    check_expectations(args, arch, official)
    settings = dict(
        ttt_base_lr=settle("ttt_base_lr", args.ttt_base_lr, official, "ttt_base_lr",
                           RECIPE_TTT_BASE_LR[arch["ttt_layer_type"]]),
        rope_theta=settle("rope_theta", args.rope_theta, official, "rope_theta", RECIPE_ROPE_THETA),
        rms_norm_eps=settle("rms_norm_eps", args.rms_norm_eps, official, "rms_norm_eps", RECIPE_RMS_NORM_EPS),
        max_position_embeddings=settle("max_position_embeddings", args.max_position_embeddings, official,
                                       "max_sequence_length", 2048))
    for name in ("bos_token_id", "eos_token_id"):
        if isinstance(official.get(name), int):
            settings[name] = official[name]
    try:
        config = ttt.TTTConfig(**arch, **settings)
    except ValueError as error:
        raise ConversionError(f"the inferred configuration is invalid: {error}") from error
    import torch

    with torch.device("meta"):
        expected = {k: v.shape for k, v in ttt.TTTForCausalLM(config).state_dict().items()}
    mapping = ttt_mapping(config)
    state = map_state_dict(params, mapping, expected, "not part of the inferred model")
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    if set(state) != set(expected):  # the mapping covers the model exactly (a guard on the table itself)
        raise ConversionError(f"internal: mapping and model disagree on {sorted(set(state) ^ set(expected))[:3]}")
    model = ttt.TTTForCausalLM(config)
    model.load_state_dict(state, strict=True)
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in params.values()})
    provenance = dict(source=str(source.resolve()), kind="ttt-lm-jax", step=step, source_dtypes=dtypes,
                      parameters=len(params), settings=settings, inferred=arch)
    return model, provenance


# ----------------------------------------------------------------------------------------------------------------
# TTT-E2E (test-time-training/e2e) -> ttt_e2e.py

E2E_ROOT = "language_model.model."
# ttt_e2e.py name (under model.layers.N.) -> official equinox path under language_model.model.h.blocks. (stacked
# over the layers, [L, ...]); dense kernels are [in, out] there and [out, in] here.
E2E_BLOCK_KEYS = {
    "self_attn.q_proj.weight": ("seq_modeling_block.wq.weight", "T"),
    "self_attn.k_proj.weight": ("seq_modeling_block.wk.weight", "T"),
    "self_attn.v_proj.weight": ("seq_modeling_block.wv.weight", "T"),
    "self_attn.o_proj.weight": ("seq_modeling_block.wo.weight", "T"),
    "self_attn.q_norm.weight": ("seq_modeling_block.q_norm.weight", None),
    "self_attn.k_norm.weight": ("seq_modeling_block.k_norm.weight", None),
    "mlp.gate_proj.weight": ("feed_forward.w1.weight", "T"),
    "mlp.up_proj.weight": ("feed_forward.w3.weight", "T"),
    "mlp.down_proj.weight": ("feed_forward.w2.weight", "T"),
    "input_layernorm.weight": ("seq_norm.weight", None),
    "post_attention_layernorm.weight": ("seq_post_norm.weight", None),
    "pre_feedforward_layernorm.weight": ("ffn_norm.weight", None),
    "post_feedforward_layernorm.weight": ("ffn_post_norm.weight", None),
}
# The prime sub-layer of suffix block j (= layer L - s + j), under language_model.model.h.prime_storage. ([s, ...]).
E2E_PRIME_KEYS = {
    "prime_mlp.gate_proj.weight": ("feed_forward_prime.w1.weight", "T"),
    "prime_mlp.up_proj.weight": ("feed_forward_prime.w3.weight", "T"),
    "prime_mlp.down_proj.weight": ("feed_forward_prime.w2.weight", "T"),
    "pre_prime_layernorm.weight": ("ffn_prime_norm.weight", None),
    "post_prime_layernorm.weight": ("ffn_prime_post_norm.weight", None),
}


def e2e_mapping(config) -> dict:
    """ttt_e2e.py state_dict key -> (official path, index along its stacked layer axis or None, transform)."""
    table = {"model.embed_tokens.weight": (E2E_ROOT + "wte.weight", None, None),
             "model.norm.weight": (E2E_ROOT + "ln_f.weight", None, None)}
    if not config.tie_word_embeddings:
        table["lm_head.weight"] = ("language_model.lm_head.weight", None, "T")
    first_suffix = config.num_hidden_layers - config.suffix_len
    for n in range(config.num_hidden_layers):
        for key, (path, transform) in E2E_BLOCK_KEYS.items():
            table[f"model.layers.{n}.{key}"] = (E2E_ROOT + "h.blocks." + path, n, transform)
        if n >= first_suffix:
            for key, (path, transform) in E2E_PRIME_KEYS.items():
                table[f"model.layers.{n}.{key}"] = (E2E_ROOT + "h.prime_storage." + path, n - first_suffix, transform)
    return table


def e2e_config_from_official(official: dict):
    """An E2EConfig from the official config (the fixture's config.json: {"model": ..., "training": ...,
    "optimizer_inner": ...}, or the model section alone)."""
    from ttt_e2e import E2EConfig

    model = official.get("model", official)
    training, inner = official.get("training", {}), official.get("optimizer_inner", {})
    try:
        block = model["seq_modeling_block"]
        if block not in ("SWA", "self_attention"):
            raise ConversionError(f"--official_config: seq_modeling_block {block!r} is neither SWA nor self_attention")
        fields = dict(vocab_size=model["vocab_size"], hidden_size=model["hidden_size"],
                      intermediate_size=model["intermediate_size"], num_hidden_layers=model["num_hidden_layers"],
                      num_attention_heads=model["num_attention_heads"], rms_norm_eps=model["rms_norm_eps"],
                      rope_theta=model["rope_theta"], initializer_range=model.get("initializer_range", 0.02),
                      bos_token_id=model.get("bos_token_id"), eos_token_id=model.get("eos_token_id"),
                      tie_word_embeddings=model.get("tie_word_embeddings", True),
                      sliding_window=model["sliding_window_size"] if block == "SWA" else None,
                      mini_batch_size=model["mini_batch_size"],
                      suffix_len=model.get("suffix_len", 0) if model.get("prime", False) else 0,
                      train_mode=training.get("train_mode", "meta" if model.get("prime") else "pretrain"),
                      inner_lr=inner.get("lr", 1.0), inner_clip=inner.get("clip_gradient", 1.0),
                      ilr_init=training.get("ilr_init", 1.0), ilr_warmup_steps=training.get("ilr_warmup_steps", 0))
    except KeyError as error:
        raise ConversionError(f"--official_config lacks {error.args[0]!r} (the official model config)") from error
    if fields["train_mode"] == "meta" and fields["sliding_window"] is None:
        fields["train_mode"] = "pretrain"  # full attention has no inner loop in the official code
    try:
        return E2EConfig(**fields)
    except ValueError as error:
        raise ConversionError(f"--official_config gives an invalid configuration: {error}") from error


def e2e_state_dict(params: dict, config) -> dict:
    """The E2E model's state dict from official parameters {path: tensor}, every one checked (none missing, none
    left over, shapes, finiteness)."""
    import torch

    from ttt_e2e import E2EForCausalLM

    with torch.device("meta"):
        expected = {k: v.shape for k, v in E2EForCausalLM(config).state_dict().items()}
    state = map_state_dict(params, e2e_mapping(config), expected, "not part of the configured model (check "
                           "--official_config: prime, suffix_len, tie_word_embeddings)")
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


def read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise ConversionError(f"--params {path} does not exist")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        raise ConversionError(f"--params {path} is not a readable safetensors file ({error})") from error


def convert_e2e(args) -> tuple:
    """(model, provenance) from an official TTT-E2E parameter tree; nothing written."""
    from ttt_e2e import E2EForCausalLM

    official = read_official_config(args.official_config)
    if not official:
        raise ConversionError("e2e needs --official_config (the official model configuration)")
    config = e2e_config_from_official(official)
    params = read_safetensors(Path(args.params))
    state = e2e_state_dict(params, config)
    model = E2EForCausalLM(config)
    model.load_state_dict(state, strict=True)
    provenance = dict(source=str(Path(args.params).resolve()), kind="ttt-e2e", step=None,
                      source_dtypes=sorted({str(v.dtype).removeprefix("torch.") for v in params.values()}),
                      parameters=len(params), settings={}, inferred=config.to_dict())
    return model, provenance


# ----------------------------------------------------------------------------------------------------------------
# Writing


def check_output_dir(path: Path):
    """Before converting (and again before writing): OUT is new or empty, and can be made and written."""
    from ttt_train.cli import unwritable_folder

    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConversionError(f"--output_dir {path} already exists and is not empty; nothing was written (choose "
                              f"a new folder: a conversion never overwrites)")
    reason = unwritable_folder(path)
    if reason:
        raise ConversionError(f"--output_dir {path}: {reason}; nothing was converted")


def load_tokenizer(name: str | None, vocab_size: int):
    """The tokenizer to save with the model (as the trainer loads it: a Hub id, a folder, or builtin:bytes)."""
    if name is None:
        return None
    from ttt_train.cli import UserError
    from ttt_train.data import load_tokenizer

    try:
        tokenizer = load_tokenizer(name)
    except UserError as error:
        raise ConversionError(f"--tokenizer_name: {error}") from error
    if len(tokenizer) > vocab_size:
        raise ConversionError(f"--tokenizer_name {name} has {len(tokenizer)} tokens, more than the checkpoint's "
                              f"vocabulary of {vocab_size}: not the tokenizer this model was trained with")
    return tokenizer


def write_folder(model, tokenizer, provenance: dict, output_dir: Path, dtype: str):
    """save_pretrained into a temporary folder beside OUT, renamed to OUT once complete: a failure (a full disk)
    leaves no partial folder."""
    import torch

    from ttt_train.card import model_card

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        model.to(getattr(torch, dtype)).save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        with open(tmp / "conversion.json", "w", encoding="utf-8") as f:
            json.dump(provenance | {"dtype": dtype}, f, indent=2)
        origin = {"from": provenance["kind"], "source": provenance["source"], "step": provenance["step"],
                  "dtype": dtype, "details": "conversion.json in this folder"}
        model_card(model, source=origin).save(tmp / "README.md")
        if output_dir.exists():
            output_dir.rmdir()  # empty (checked before), so nothing of the user's is lost
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="kind", required=True)
    t = sub.add_parser("ttt", help="TTT-Linear / TTT-MLP from ttt-lm-jax (StreamingCheckpointer msgpack)")
    t.add_argument("--checkpoint", required=True,
                   help="run folder (latest), step_N milestone folder, or a streaming_train_state/_params file")
    t.add_argument("--output_dir", required=True, help="new folder for the Hugging Face model (never overwritten)")
    t.add_argument("--official_config", type=Path,
                   help="the run's JAX ModelConfig as JSON: ttt_base_lr, rope_theta, rms_norm_eps are taken from it "
                        "and its sizes checked against the tensors")
    t.add_argument("--ttt_base_lr", type=float, help="eta_base (default: the recipe's, 1.0 linear, 0.1 mlp)")
    t.add_argument("--rope_theta", type=float, help=f"default {RECIPE_ROPE_THETA}")
    t.add_argument("--rms_norm_eps", type=float, help=f"default {RECIPE_RMS_NORM_EPS}")
    t.add_argument("--max_position_embeddings", type=int, help="the training length (JAX max_sequence_length; "
                                                               "informational, default 2048)")
    t.add_argument("--model_size", choices=["tiny", "125m", "350m", "760m", "1b"],
                   help="check that the tensors are this standard size")
    t.add_argument("--ttt_layer_type", choices=["linear", "mlp"], help="check that the tensors are this inner model")
    t.add_argument("--tokenizer_name", help="the tokenizer to save with the model (Hub id or folder; the official "
                                            "models use Llama-2's)")
    t.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights written (the checkpoint's bf16 values convert to float32 exactly)")
    e = sub.add_parser("e2e", help="TTT-E2E from test-time-training/e2e (its parameter tree as safetensors)")
    e.add_argument("--params", required=True,
                   help="the official parameter tree as safetensors, keys = equinox paths joined by '.' "
                        "(language_model.model.h.blocks.*, layer-stacked)")
    e.add_argument("--official_config", type=Path, required=True,
                   help="the official configuration as JSON ({'model': ..., 'training': ..., 'optimizer_inner': ...}"
                        " or the model section alone)")
    e.add_argument("--output_dir", required=True, help="new folder for the Hugging Face model (never overwritten)")
    e.add_argument("--tokenizer_name", help="the tokenizer to save with the model (the official models use "
                                            "Llama-3's)")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    for command in (t, e):  # as the trainer's (HF Trainer's spellings); token: HF_TOKEN or `hf auth login`
        command.add_argument("--push_to_hub", action="store_true",
                             help="upload the converted folder (weights, code, model card) to a Hub model repository; "
                                  "the token and the Hub are checked before converting")
        command.add_argument("--hub_model_id", help="the repository (default: <your user>/<output_dir's name>)")
        command.add_argument("--hub_private_repo", action="store_true", help="create the repository private")
    return p


def check_flags(args, parser):
    given = [f for f in ("hub_model_id", "hub_private_repo") if getattr(args, f)]
    if given and not args.push_to_hub:
        parser.error(f"--{given[0]} applies to --push_to_hub: add --push_to_hub, or drop it")
    for name in ("ttt_base_lr", "rope_theta", "rms_norm_eps", "max_position_embeddings"):
        value = getattr(args, name, None)
        if value is not None and not (value > 0 and value != float("inf")):
            parser.error(f"--{name} must be a finite number > 0, got {value}")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_flags(args, parser)
    output_dir = Path(args.output_dir)
    from ttt_train import publish
    from ttt_train.cli import UserError
    from ttt_train.metrics import quiet_libraries

    quiet_libraries()  # the libraries' progress bars: the converter prints its own one line
    try:
        check_output_dir(output_dir)
        repo_id = publish.prepare(args, output_dir) if args.push_to_hub else None
        model, provenance = (convert_ttt if args.kind == "ttt" else convert_e2e)(args)
        tokenizer = load_tokenizer(args.tokenizer_name, model.config.vocab_size)
        check_output_dir(output_dir)  # again: another process may have written there meanwhile
        write_folder(model, tokenizer, provenance, output_dir, args.dtype)
        if repo_id:
            publish.Publisher(repo_id, "end").final_model_saved(output_dir, "the converted checkpoint")
            print(f"pushed {output_dir} to {repo_id}")
    except (ConversionError, UserError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    arch = provenance["inferred"]
    if args.kind == "e2e":
        from ttt_train.models import describe

        print(f"converted {provenance['source']} ({provenance['parameters']} tensors, "
              f"{'/'.join(provenance['source_dtypes'])}) -> {output_dir}: {describe(model.config)}, "
              f"{arch['num_hidden_layers']} layers, hidden {arch['hidden_size']}, vocabulary {arch['vocab_size']}, "
              f"{args.dtype}")
        return 0
    kind = {"linear": "TTT-Linear", "mlp": "TTT-MLP"}[arch["ttt_layer_type"]]
    print(f"converted {provenance['source']} (step {provenance['step']}, {provenance['parameters']} tensors, "
          f"{'/'.join(provenance['source_dtypes'])}) -> {output_dir}: {kind}, {arch['num_hidden_layers']} layers, "
          f"hidden {arch['hidden_size']}, {arch['num_attention_heads']} heads, vocabulary {arch['vocab_size']}, "
          f"ttt_base_lr {provenance['settings']['ttt_base_lr']}, {args.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
