"""What train_trainer.py and train_deepspeed.py share once torch is loaded: checks, model, batches,
loss, processes, saving. Their config (TRAIN_DEFAULTS, parse_train_args) is train_config.py.

    args = parse_train_args({**TRAIN_DEFAULTS, "save_dir": "./checkpoint/msra/x/"}, __doc__)
    rows = check_inputs(args)                       # every user error, before any model is loaded
    model = build_model(args, load_train_tokenizer(args), "fp32")
    loss = causal_lm_loss(model, TrainCollate(args, tokenizer).collate_fn(rows[:12]))

Each trainer keeps its own loop; this module holds what both need once, including the resume
contract: both save save_dir/adapter_model/ with the adapter, train_args.json and STATE_FILE
(`resume_state`: step, total steps, process count, resolved config, optimizer checkpoint), both
read it back with `state_to_resume`, which refuses a resume whose SAME_FOR_RESUME keys differ,
and both end with `run_summary`. Batches are padded to their own length and left-aligned, so
every answer token sits in the last few positions and the LM head runs only there
(`logits_to_keep`): on LLaMA's 49954-token vocabulary the head is most of a small model's
compute and most of a big one's memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from config_utils import Config, ConfigError, load_config, print_config, save_config
from dataset import IGNORE_INDEX, NerCollate, load_data
from llama_ner.io_utils import UserError, atomic_dir, check_output_dir_path
from llama_ner.weights.model_files import check_model_files
from llama_ner.model_utils import (
    adapter_weights_file,
    check_adapter_fits,
    check_model_dir,
    check_quantization,
    load_tokenizer,
    match_vocab,
    pretrained_kwargs,
)
from llama_ner.training.train_config import TRAIN_DEFAULTS

ADAPTER_DIR = "adapter_model"  # save_dir/adapter_model holds the adapter and train_args.json
STATE_FILE = "resume_state.json"  # beside the adapter: step, total steps, world size, resolved config
# a resumed run must agree with the saved one on these (model, data, batch settings, process count)
SAME_FOR_RESUME = ("model_dir", "peft_path", "lora_r", "lora_target_modules", "train_path", "train_batch_size")
SAME_FOR_RESUME += ("gradient_accumulation_steps", "num_train_epochs", "seed", "quantization_bit", "precision")
SAME_FOR_RESUME += ("world_size",)

# ----------------------------------------------------------------------------- checks


def check_inputs(args: Config) -> tuple[list[dict], list[dict]]:
    """Read and check every input (data, model dir, adapter, DeepSpeed JSON) before any model loads.

    Returns (train_rows, dev_rows); dev_rows is empty when dev_path is "".
    """
    columns = (args.instruct_column, args.response_column)
    train_rows = load_data(args.train_path, columns)
    dev_rows = load_data(args.dev_path, columns) if args.dev_path else []
    if args.dev_max_rows > 0:
        dev_rows = dev_rows[: args.dev_max_rows]
    check_model_files(args.model_dir)
    if args.peft_path:
        adapter_weights_file(args.peft_path)
    check_kbit(args, read_deepspeed_json(args.deepspeed_json_path))
    check_save_dir(args)
    check_lora_targets(args)
    return train_rows, dev_rows


def check_save_dir(args: Config) -> None:
    """save_dir must be a directory path, and no input may lie in a folder that saving replaces or deletes
    (adapter_model, the Trainer's rotated checkpoint-N, DeepSpeed's checkpoints)."""
    save_dir = check_output_dir_path(args.save_dir, "save_dir").resolve()
    for key in ("model_dir", "peft_path", "train_path", "dev_path", "deepspeed_json_path"):
        value = getattr(args, key)
        path = Path(value).resolve() if value else None
        if path is None or save_dir not in path.parents:
            continue
        top = path.relative_to(save_dir).parts[0]
        if top in (ADAPTER_DIR, "deepspeed_checkpoint") or top.startswith("checkpoint-"):
            raise ConfigError(
                f"{key}={value} is inside {Path(args.save_dir) / top}, which training replaces or deletes: "
                "choose another save_dir (or copy the input elsewhere first)"
            )


def check_lora_targets(args: Config) -> None:
    """Every lora_target_modules name must match a layer of the model: peft would skip a typo silently.

    The model is built on the meta device (no memory, no weights read) from config.json.
    """
    if args.peft_path:
        return  # the LoRA's own targets are used
    from transformers import AutoConfig, AutoModelForCausalLM

    config_file = Path(args.model_dir) / "config.json"
    try:
        config = AutoConfig.from_pretrained(args.model_dir)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError, OSError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{config_file}: transformers cannot build a model from it ({reason})") from None
    layers = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]
    for target in args.lora_target_modules:
        if not any(name == target or name.endswith("." + target) for name in layers):
            existing = sorted({name.rsplit(".", 1)[-1] for name in layers})
            raise ConfigError(
                f"lora_target_modules: {target!r} matches no layer of {args.model_dir}; its layers are "
                f"{', '.join(existing)} (e.g. lora_target_modules=q_proj,v_proj)"
            )


def check_kbit(args: Config, ds_config: dict[str, Any]) -> None:
    """quantization_bit must be 0/4/8, runnable by bitsandbytes here, and not under ZeRO-3."""
    stage = args.zero_stage if args.zero_stage >= 0 else ds_config.get("zero_optimization", {}).get("stage", 0)
    if args.quantization_bit and stage == 3:
        raise ConfigError(
            f"quantization_bit={args.quantization_bit} with ZeRO-3: ZeRO-3 partitions every parameter, and "
            "bitsandbytes' packed 4/8-bit weights cannot be partitioned; use zero_stage=1 or 2 (the frozen "
            "quantized base is small, only the LoRA's optimizer state is sharded)"
        )
    check_quantization(args.quantization_bit, train_device())


def train_device() -> str:
    """This process's device: its GPU under a launcher (LOCAL_RANK), else the CPU."""
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"


def read_deepspeed_json(path: str | Path) -> dict[str, Any]:
    return load_config(path, fix="pass deepspeed_json_path=<the DeepSpeed config file>")


def resolve_precision(ds_config: dict[str, Any], cuda: bool | None = None) -> str:
    """'fp16', 'bf16' or 'fp32' from deepspeed.json's fp16/bf16 sections; fp16 needs CUDA.

    bf16 on hardware without it (a pre-Ampere GPU, a CPU torch has no bf16 kernels for) is a
    ConfigError, raised before any model loads, whose advice fits the device.
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    fp16 = ds_config.get("fp16", {}).get("enabled", False)
    bf16 = ds_config.get("bf16", {}).get("enabled", False)
    if bf16 is True:
        if bf16_supported(cuda):
            return "bf16"
        if cuda:
            raise ConfigError(
                f"deepspeed.json enables bf16, but this GPU ({torch.cuda.get_device_name()}) cannot train in bf16 "
                '(GPUs need Ampere or newer): set "bf16": {"enabled": false} and "fp16": {"enabled": true} instead'
            )
        raise ConfigError(
            "deepspeed.json enables bf16, but torch cannot compute in bf16 on this CPU: set "
            '"bf16": {"enabled": false} to train in fp32 (fp16 needs a CUDA GPU)'
        )
    if fp16 in (True, "auto"):
        if cuda:
            return "fp16"
        if is_main_process():
            print("note: deepspeed.json asks for fp16, which needs CUDA; training in fp32 on the CPU")
    return "fp32"


def bf16_supported(cuda: bool) -> bool:
    """The Hugging Face Trainer's own test, so the two trainers accept the same machines."""
    from transformers.utils import is_torch_bf16_available_on_device, is_torch_bf16_gpu_available

    return is_torch_bf16_gpu_available() if cuda else is_torch_bf16_available_on_device("cpu")


def deepspeed_config(args: Config, precision: str) -> dict[str, Any]:
    """deepspeed.json with every value the trainers also know filled from `args`.

    Batch size, accumulation, clipping, learning rate and precision come from one place, so
    the HF Trainer and DeepSpeed cannot disagree. learning_rate=None keeps the file's lr.
    """
    ds = read_deepspeed_json(args.deepspeed_json_path)
    ds.pop("train_batch_size", None)  # derived by DeepSpeed: micro batch * accumulation * processes
    ds["train_micro_batch_size_per_gpu"] = args.train_batch_size
    ds["gradient_accumulation_steps"] = args.gradient_accumulation_steps
    ds["gradient_clipping"] = args.max_grad_norm
    params = ds.setdefault("optimizer", {"type": "Adam"}).setdefault("params", {})
    file_lr = params.get("lr", "auto")
    if args.learning_rate is None and not isinstance(file_lr, (int, float)):
        raise ConfigError(f"{args.deepspeed_json_path}: optimizer lr is {file_lr!r}: pass learning_rate=<float>")
    params["lr"] = float(args.learning_rate if args.learning_rate is not None else file_lr)
    for key, default in (("betas", [0.9, 0.999]), ("eps", 1e-8), ("weight_decay", 0.0)):
        if params.get(key, "auto") == "auto":
            params[key] = default
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": precision == "fp16"}
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": precision == "bf16"}
    zero = ds.setdefault("zero_optimization", {})
    if args.zero_stage >= 0:
        zero["stage"] = args.zero_stage
    if zero.get("stage", 0) == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # else HF saves an empty adapter
    ds.setdefault("steps_per_print", 10**9)  # the trainers print their own losses
    return ds


def print_run_config(args: Config) -> None:
    if is_main_process():
        print_config(args)


# ----------------------------------------------------------------------------- model and data


def load_train_tokenizer(args: Config):
    """The LoRA's own tokenizer when peft_path ships one (Chinese-Alpaca LoRA), else model_dir's."""
    if args.peft_path and (Path(args.peft_path) / "tokenizer.model").is_file():
        return load_tokenizer(args.peft_path)
    return load_tokenizer(args.model_dir)


def lora_config(args: Config):
    from peft import LoraConfig

    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=list(args.lora_target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def build_model(args: Config, tokenizer: Any, precision: str) -> torch.nn.Module:
    """The base model in the training dtype with a new LoRA (or peft_path's, trainable)."""
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    torch.manual_seed(args.seed)
    kwargs = pretrained_kwargs(args.quantization_bit, dtype, train_device())
    model = AutoModelForCausalLM.from_pretrained(check_model_dir(args.model_dir), **kwargs)
    match_vocab(model, tokenizer)
    model.config.use_cache = False
    if args.quantization_bit:
        model = prepare_kbit(model, dtype)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if args.peft_path:
        check_adapter_fits(model, args.peft_path, args.model_dir)
        model = PeftModel.from_pretrained(model, args.peft_path, is_trainable=True)
    else:
        try:
            model = get_peft_model(model, lora_config(args))
        except ValueError as err:  # peft names the modules it could not find
            raise ConfigError(f"lora_target_modules={args.lora_target_modules}: {err}") from None
    if is_main_process():
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        print(f"trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    return model


def prepare_kbit(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """peft's preparation of a 4/8-bit base (every base weight frozen), back in the training dtype.

    prepare_model_for_kbit_training upcasts every unquantized weight (norms, embed_tokens,
    lm_head) to fp32; DeepSpeed casts them to the training dtype again. Casting here keeps the
    model consistent on its own and the fp32 copies out of the peak (at 7B, embed_tokens and
    lm_head in fp32 are 1.6 GB, a third of what the 4-bit layers weigh).
    """
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for param in model.parameters():
        if param.dtype == torch.float32 and dtype != torch.float32:
            param.data = param.data.to(dtype)
    return model


class TrainCollate(NerCollate):
    """NerCollate's batches left-aligned, with position ids, so all answer tokens end each row."""

    def collate_fn(self, batch: list[dict[str, Any] | str]) -> dict[str, torch.Tensor]:
        return left_align(super().collate_fn(batch))


def left_align(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Move each right-padded row's tokens to the end; position ids count real tokens only."""
    mask = batch["attention_mask"]
    width = mask.shape[1]
    shift = width - mask.sum(1, keepdim=True)
    source = (torch.arange(width).unsqueeze(0) - shift) % width
    out = {key: value.gather(1, source) for key, value in batch.items()}
    out["position_ids"] = (out["attention_mask"].cumsum(1) - 1).clamp(min=0)
    return out


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the label tokens, with logits only where labels are.

    The LM head runs on the positions from the first label onward (all of a left-aligned
    batch's answers): the same loss as the model's own, without the full logits tensor.
    """
    labels = batch["labels"]
    has_label = labels != IGNORE_INDEX
    first = torch.where(has_label.any(1), has_label.float().argmax(1), labels.shape[1]).min()
    keep = max(int(labels.shape[1] - first) + 1, 2)  # the logit before the first label predicts it
    keep = min(keep, labels.shape[1])
    kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    logits = model(**kwargs, logits_to_keep=keep, use_cache=False).logits
    logits = logits[:, :-1].float()
    targets = labels[:, labels.shape[1] - keep + 1 :]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)


# ----------------------------------------------------------------------------- distributed helpers


def init_distributed(timeout_s: float = TRAIN_DEFAULTS["ddp_timeout"]) -> None:
    """One process per rank under deepspeed/torchrun (env) or mpirun (mpi4py discovery); or just one.

    Joining waits at most `timeout_s` for the other processes (so does every later exchange):
    a machine that cannot reach the master, or a wrong --node_rank, fails with what to check.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    launched = any(key in os.environ for key in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"))
    default_port = 29500 if launched else free_port()  # a lone `python x.py` must not collide with a running job
    try:
        deepspeed.init_distributed(
            dist_backend=get_accelerator().communication_backend_name(),
            auto_mpi_discovery=True,
            distributed_port=int(os.environ.get("MASTER_PORT", default_port)),  # mpirun -x MASTER_PORT=... picks one
            timeout=timedelta(seconds=timeout_s),
        )
    except RuntimeError as err:  # torch's store and gloo/NCCL connection errors and timeouts
        raise UserError(join_error(err, timeout_s)) from None


def join_error(err: Exception, timeout_s: float) -> str:
    """One line: who failed to join whom, torch's reason, and what to check on a multi-machine run."""
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    reason = str(err).strip().splitlines()[0].rstrip(".") if str(err).strip() else type(err).__name__
    return (
        f"rank {os.environ.get('RANK', '?')} of {os.environ.get('WORLD_SIZE', '?')} could not join the other "
        f"processes at MASTER_ADDR:MASTER_PORT={where} within ddp_timeout={timeout_s:g}s ({reason}). Check that "
        "every machine can reach that address and port (firewall), that each machine was started with its own "
        "--node_rank (0 on the master) and the same --master_addr, --master_port and hostfile, and that "
        "GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME name the interface of that network; raise ddp_timeout if a "
        "machine starts much later than the others"
    )


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", os.environ.get("OMPI_COMM_WORLD_SIZE", "1")))


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


# ----------------------------------------------------------------------------- saving and resuming


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the trainable parameters, gathered first when ZeRO-3 has partitioned them.

    Every process must call this (the gather is collective).
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    partitioned = [p for _, p in named if hasattr(p, "ds_id")]
    gather = contextlib.nullcontext()
    if partitioned:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)
    with gather:
        return {name: p.detach().to("cpu", copy=True).contiguous() for name, p in named}


def save_adapter(model: torch.nn.Module, save_dir: str | Path, args: Config, state: dict | None = None) -> Path:
    """Write save_dir/adapter_model (safetensors adapter, train_args.json, state) on rank 0, atomically.

    `model` is the PeftModel (engine.module under DeepSpeed). Every process must call this.
    """
    weights = trainable_state_dict(model)
    out = Path(save_dir) / ADAPTER_DIR
    if is_main_process():
        with atomic_dir(out) as tmp:
            model.save_pretrained(str(tmp), state_dict=weights, safe_serialization=True)
            save_config(args, tmp / "train_args.json")
            if state is not None:
                (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    barrier()
    return out


def resume_state(args: Config, global_step: int, total_steps: int, checkpoint: str) -> dict[str, Any]:
    """What both trainers save beside the adapter (STATE_FILE): the step reached, the run's length,
    the process count, the resolved config, and the optimizer checkpoint (relative to save_dir)."""
    return {
        "global_step": global_step,
        "total_steps": total_steps,
        "world_size": world_size(),
        "checkpoint": checkpoint,
        "train_args": args.to_dict(),
    }


def load_state(save_dir: str | Path) -> dict[str, Any] | None:
    """The state saved beside the last adapter, or None when there is none."""
    path = Path(save_dir) / ADAPTER_DIR / STATE_FILE
    if not path.is_file():
        return None
    return load_config(path, fix="start over with resume=false")


def state_to_resume(args: Config) -> dict[str, Any] | None:
    """resume=true: the state saved beside the adapter, checked against `args` (call before the model
    loads); None (with a note when resume=true) when the run starts from step 0."""
    if not args.resume:
        return None
    state = load_state(args.save_dir)
    if state is None:
        if is_main_process():
            print(f"resume: nothing saved in {Path(args.save_dir) / ADAPTER_DIR} yet; starting from step 0")
        return None
    check_resume(state, args)
    if is_main_process():
        print(f"resuming from {args.save_dir} at step {state['global_step']}/{state['total_steps']}")
    return state


def check_resume(state: dict[str, Any], args: Config) -> None:
    """A resumed run must see the same model, data, batch settings, quantization, precision and
    process count as the saved one."""
    saved = {**state["train_args"], "world_size": state["world_size"]}
    now = {**args.to_dict(), "world_size": world_size()}
    for key in SAME_FOR_RESUME:
        if key in saved and saved[key] != now.get(key):  # a state saved by an older version may lack a key
            fix = f"pass {key}={saved[key]}"
            if key == "world_size":
                fix = f"start {saved[key]} processes"
            elif key == "precision":  # not a key: resolved from deepspeed.json's fp16/bf16 sections
                fix = f"train in {saved[key]} again ({args.deepspeed_json_path}'s fp16/bf16 sections)"
            raise ConfigError(
                f"resume: {key} was {saved[key]!r} in the saved run, now {now.get(key)!r}; "
                f"{fix} or start over with resume=false"
            )


def run_summary(steps: int, seconds: float, train_loss: float, dev_loss: float | None, save_dir: str | Path) -> str:
    """The one line both trainers end with."""
    dev = f", dev loss {dev_loss:.4f}" if dev_loss is not None else ""
    adapter = Path(save_dir) / ADAPTER_DIR
    return f"done: {steps} steps in {seconds:.0f}s, train loss {train_loss:.4f}{dev}; adapter in {adapter}"


def remove_old_checkpoints(folder: str | Path, keep: str) -> None:
    """Delete every DeepSpeed checkpoint tag in `folder` but `keep` (rank 0)."""
    folder = Path(folder)
    if not is_main_process() or not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.is_dir() and path.name != keep:
            shutil.rmtree(path, ignore_errors=True)
