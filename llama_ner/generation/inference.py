"""What the inference scripts share: the trained run's config, the model, the prompts, NER answers.

    config = resolve_config(sys.argv[1:], {"predict_path": ""})
    model, tokenizer = load_trained(config)
    prompts = [row_prompt(row, config) for row in rows]
    answers = ner_answers(model, tokenizer, ["北京是中国的首都。"], 16, 256, types=("人名", "地名", "机构名"))

test.py and predict.py take the training run's train_args.json (every key can be overridden
on the command line, e.g. --dev_path=...) plus the evaluation keys below; chat_ner.py and
serve.py take the model flags of `add_model_args` and load through `load_from_args`.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from config_utils import Config, ConfigError, ConfigParser, load_config, require, split_argv
from dataset import ALPACA, PromptFormat, build_prompt, ner_row, prompt_format

if TYPE_CHECKING:
    import torch

    from llama_ner.generation.ner_constraint import NerConstraint

PACKAGE = Path(__file__).resolve().parent.parent
HELP_SOURCES = [
    PACKAGE / "training" / "train_config.py",
    PACKAGE / "generation" / "inference.py",
]  # where the keys' meanings are written

EVAL_DEFAULTS = {
    "train_args_path": "",  # '' = ./checkpoint/{data_name}/train_trainer/adapter_model/train_args.json
    "adapter_path": "",  # LoRA to apply: '' = {save_dir}/adapter_model; 'none' = model_dir is a merged model
    "tokenizer_path": "",  # '' = model_dir
    "eval_batch_size": 16,  # prompts generated together (left padding); 1 = one at a time
    "max_new_tokens": 256,  # generation stops at </s> or after this many tokens (MSRA dev: 4 answers are longer)
    "dtype": "auto",  # auto (fp16 on CUDA, fp32 on CPU), float16, bfloat16, float32
    "device": "",  # cpu, cuda, cuda:N; '' or auto = cuda when available, else cpu
    "prefix_cache": True,  # run the prompt start every row shares once, reuse its KV cache (same answers)
    "window_chars": "auto",  # longer texts are answered in windows of at most this many characters, merged;
    # auto: the longest text the model was trained on (train_args.json's trained_text_chars), 0: never split
    "constrained": True,  # answers only '没有' or distinct '实体_类型' lines with entities from the text
    "entity_types": "",  # the types allowed when constrained, e.g. 人名,地名; '' = those in train_path's answers
    "quantization_bit": 0,  # base model in 4 or 8 bits (bitsandbytes); train_args.json's value when it has one
    "engine": "hf",  # hf: generate in this process; vllm: on a vLLM server (docs/vllm.md), same answers in fp32
    "engine_url": "",  # engine vllm: a running vLLM OpenAI server; '' = start one (.venv-vllm, make vllm)
    "engine_model": "",  # the id to ask engine_url for; '' = ner with an adapter, else model_dir
    "vllm_python": "",  # python of vLLM's environment; '' = $VLLM_PYTHON, else ./.venv-vllm/bin/python
    "vllm_args": "",  # more flags for the vLLM started here, e.g. "--tensor-parallel-size 2"
    "vllm_constraint": "grammar",  # grammar: structured outputs, then checked; check: plain greedy, then checked
}
REQUIRED_KEYS = ("model_dir", "save_dir", "instruct_column", "query_column", "response_column")


def default_train_args_path(data_name: str = "msra") -> str:
    return f"./checkpoint/{data_name}/train_trainer/adapter_model/train_args.json"


def train_args_path_from_argv(argv: list[str]) -> str:
    """--train_args_path if given, else the default path for --data_name (msra)."""
    pairs = dict(split_argv(argv))
    return pairs.get("train_args_path") or default_train_args_path(pairs.get("data_name", "msra"))


def resolve_config(argv: list[str], extra: dict[str, Any], description: str = "", source: str = "") -> Config:
    """train_args.json + EVAL_DEFAULTS + `extra`, overridden by argv. Training values win over defaults.

    `source`: the calling script's file, whose defaults dict's comments --help shows too.
    """
    path = train_args_path_from_argv(argv)
    sources = [*HELP_SOURCES, source] if source else HELP_SOURCES
    if ("-h" in argv or "--help" in argv) and not Path(path).is_file():
        ConfigParser({**EVAL_DEFAULTS, **extra}, description, sources).parse(["--help"])  # prints, exits 0
    trained = load_config(path)
    missing = [key for key in REQUIRED_KEYS if key not in trained]
    if missing:
        raise ConfigError(f"{path}: missing key {missing[0]!r}; this is not a train_args.json written by training")
    defaults = {**trained, **{k: v for k, v in {**EVAL_DEFAULTS, **extra}.items() if k not in trained}}
    defaults["train_args_path"] = path
    config = ConfigParser(defaults, description, sources).parse(argv)
    require(config, ("eval_batch_size", "max_new_tokens"), tuple(k for k in ("max_rows",) if hasattr(config, k)))
    window_limit(config)  # a bad window_chars fails before any model loads
    if config.engine not in ("hf", "vllm"):
        raise ConfigError(f"engine={config.engine!r}: use hf (this process) or vllm (a vLLM server)")
    if config.vllm_constraint not in ("grammar", "check"):
        raise ConfigError(f"vllm_constraint={config.vllm_constraint!r}: use grammar or check (docs/vllm.md)")
    if config.engine == "hf" and (config.engine_url or config.vllm_args):
        raise ConfigError("engine_url / vllm_args are for engine=vllm: pass --engine=vllm, or drop them")
    if not re.fullmatch(r"|auto|cpu|cuda(:\d+)?", config.device):
        raise ConfigError(
            f"device={config.device!r}: use cpu, cuda, cuda:N (a GPU's index) or auto (cuda if any, else cpu)"
        )
    return config


def adapter_dir(config: Config) -> Path | None:
    """The LoRA directory to load, or None for a merged model."""
    if config.adapter_path.lower() == "none":
        return None
    return Path(config.adapter_path or Path(config.save_dir) / "adapter_model")


def load_trained(config: Config) -> tuple[torch.nn.Module, Any]:
    """(model in eval mode, tokenizer): base model_dir + adapter, embeddings matched to the tokenizer."""
    from llama_ner.model_loading import load_model
    from llama_ner.tokenizer import load_tokenizer
    from llama_ner.weights.model_files import (
        adapter_weights_file,
        check_model_files,  # torch and transformers: after the command line is read
    )

    device = None if config.device in ("", "auto") else config.device
    check_gpu_visible(device)
    adapter = adapter_dir(config)
    check_model_files(config.model_dir)
    if adapter:
        adapter_weights_file(adapter)  # a missing or empty LoRA folder fails before the model loads
    tokenizer = load_tokenizer(config.tokenizer_path or config.model_dir)
    print(f"loading {config.model_dir}" + (f" + adapter {adapter}" if adapter else " (no adapter)"))
    model = load_model(config.model_dir, adapter, config.dtype, device, tokenizer, config.quantization_bit)
    return model, tokenizer


def check_gpu_visible(device: str | None) -> None:
    """A cuda or cuda:N device that this machine does not have fails here, before any model loads."""
    import torch

    if device and device.startswith("cuda"):
        index, count = int(device.partition(":")[2] or 0), torch.cuda.device_count()
        if index >= count:
            visible = f"GPUs cuda:0 to cuda:{count - 1}" if count else "no CUDA GPU"
            raise ConfigError(f"device={device}: this machine has {visible}; pass --device=cpu or a GPU it has")


def config_prompt_format(config: Config, tokenizer: Any) -> PromptFormat:
    """The prompt format the model was trained with (train_args.json's prompt_template, alpaca before it
    existed; its ner_instruction, the seed's before it existed)."""
    name, instruction = getattr(config, "prompt_template", "alpaca"), getattr(config, "ner_instruction", "")
    return prompt_format(name, tokenizer, instruction)


def row_prompt(row: dict[str, Any], config: Config, fmt: PromptFormat = ALPACA) -> str:
    """The training prompt of one data row."""
    return build_prompt(row[config.instruct_column], row.get(config.query_column) or "", fmt)


def ner_prompt(text: str, fmt: PromptFormat = ALPACA) -> str:
    """The training prompt for a plain sentence: the NER instruction it was trained with, then `文本：text`."""
    row = ner_row(text, instruction=fmt.instruction)
    return build_prompt(row["instruct"], row["query"], fmt)


def ner_answers(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: list[str],
    batch_size: int = EVAL_DEFAULTS["eval_batch_size"],
    max_new_tokens: int = EVAL_DEFAULTS["max_new_tokens"],
    progress: bool = False,
    types: Sequence[str] | None = None,
    fmt: PromptFormat = ALPACA,
    window_chars: int = 0,
    **gen_kwargs: Any,
) -> list[str]:
    """The `实体_类型` answer for each plain sentence, generated as test.py generates (greedy).

    With `types`, answers are constrained (ner_constraint.py) to `没有` or distinct lines whose
    entity is in the sentence and whose type is one of `types`; None: plain decoding. Texts longer
    than `window_chars` (0: none) are answered in windows, as test.py does (windows.py).
    """
    from llama_ner.generation.generate import generate_answers
    from llama_ner.generation.ner_constraint import NerConstraint
    from llama_ner.generation.windows import answer_in_windows

    def answer(pieces: list[tuple[int, str]]) -> list[str]:
        piece_texts = [piece for _, piece in pieces]
        constraint = NerConstraint(tokenizer, piece_texts, types) if types else None
        prompts = [ner_prompt(text, fmt) for text in piece_texts]
        return generate_answers(
            model, tokenizer, prompts, batch_size, max_new_tokens, progress=progress, constraint=constraint,
            prompt_format=fmt, **gen_kwargs,
        )  # fmt: skip

    return answer_in_windows(texts, window_chars, answer)


def answer_rows(
    model: torch.nn.Module, tokenizer: Any, rows: list[dict[str, Any]], config: Config, progress: bool = True
) -> tuple[list[str], NerConstraint | None]:
    """test.py's and predict.py's answers for data rows: the training prompt, the constraint (unless
    constrained=false), batched greedy generation, long texts in windows. Returns (answers, the
    constraint used or None)."""
    from llama_ner.generation.generate import generate_answers

    fmt = config_prompt_format(config, tokenizer)

    def answer(pieces: list[dict[str, Any]]) -> tuple[list[str], NerConstraint | None]:
        prompts = [row_prompt(row, config, fmt) for row in pieces]
        constraint = answer_constraint(config, tokenizer, pieces)
        answers = generate_answers(
            model, tokenizer, prompts, config.eval_batch_size, config.max_new_tokens, progress=progress,
            constraint=constraint, prompt_format=fmt, prefix_cache=getattr(config, "prefix_cache", True),
        )  # fmt: skip
        return answers, constraint

    return in_windows(rows, config, answer)


def engine_answer_rows(rows: list[dict[str, Any]], config: Config) -> tuple[list[str], NerConstraint | None]:
    """answer_rows on the configured engine: the model loaded here (hf), or a vLLM server (the same answers)."""
    if config.engine == "hf":
        model, tokenizer = load_trained(config)
        return answer_rows(model, tokenizer, rows, config)
    return in_windows(rows, config, lambda pieces: vllm_answer_rows(pieces, config))


def window_limit(config: Config) -> int:
    """window_chars as a number of characters (0: texts are never split)."""
    value = str(getattr(config, "window_chars", "auto")).strip().lower()
    if value == "auto":
        return int(getattr(config, "trained_text_chars", 0) or 0)
    if not value.isdigit():
        raise ConfigError(f"window_chars={value!r}: use auto (the trained texts' length), 0 (never split) or a number")
    return int(value)


def in_windows(
    rows: list[dict[str, Any]], config: Config, answer: Callable[[list[dict[str, Any]]], tuple[list[str], Any]]
) -> tuple[list[str], Any]:
    """`answer` over the rows with each text longer than window_chars split into windows (windows.py),
    their answers merged back into one a row. Returns (answers, what `answer` returned beside them)."""
    from llama_ner.generation.ner_constraint import text_of_query
    from llama_ner.generation.windows import answer_in_windows

    column, beside = config.query_column, []
    queries = [row.get(column) or "" for row in rows]
    texts = [text_of_query(q, row[config.instruct_column]) if q else "" for row, q in zip(rows, queries, strict=True)]

    def answer_pieces(pieces: list[tuple[int, str]]) -> list[str]:
        prefixes = [query[: len(query) - len(text)] for query, text in zip(queries, texts, strict=True)]
        piece_rows = [rows[i] if piece == texts[i] else {**rows[i], column: prefixes[i] + piece} for i, piece in pieces]
        answers, extra = answer(piece_rows)
        beside.append(extra)
        return answers

    return answer_in_windows(texts, window_limit(config), answer_pieces), beside[0]


def vllm_answer_rows(rows: list[dict[str, Any]], config: Config) -> tuple[list[str], NerConstraint | None]:
    """answer_rows on vLLM: the same prompts as token ids, the same constraint, checked token by token."""
    import shlex

    from tqdm import tqdm

    from llama_ner.generation.vllm_client import EngineError, EngineRefused, connect, prompt_ids
    from llama_ner.generation.vllm_process import VllmLaunch, vllm_dtype
    from llama_ner.tokenizer import load_tokenizer
    from llama_ner.weights.model_files import adapter_weights_file, check_model_files

    if config.quantization_bit:
        raise ConfigError("engine=vllm runs the base unquantized here: pass --quantization_bit=0, or engine=hf")
    adapter = adapter_dir(config)
    if not config.engine_url:
        check_model_files(config.model_dir)
        if adapter:
            adapter_weights_file(adapter)
    tokenizer_path = config.tokenizer_path or config.model_dir
    tokenizer = load_tokenizer(tokenizer_path)
    dtype = vllm_dtype(config.dtype, config.device == "cpu")
    adapter_name = str(adapter) if adapter else None
    launch = VllmLaunch(config.model_dir, adapter_name, tokenizer_path, dtype, 0, config.vllm_python,
                        shlex.split(config.vllm_args))  # fmt: skip
    grammar = config.vllm_constraint == "grammar"
    client, server, positions = connect(tokenizer, config.model_dir, adapter_name, config.engine_url,
                                        config.engine_model, None, launch, grammar)  # fmt: skip
    try:
        fmt = config_prompt_format(config, tokenizer)
        prompts = [row_prompt(row, config, fmt) for row in rows]
        ids = prompt_ids(tokenizer, prompts, positions, config.max_new_tokens, fmt)
        constraint = answer_constraint(config, tokenizer, rows)
        with tqdm(total=len(rows), desc=f"generate ({client.url})", unit="row") as progress:
            try:
                answers = client.ner_answers(ids, config.max_new_tokens, constraint, progress)
            except EngineError as err:
                if server is None or isinstance(err, EngineRefused):
                    raise
                raise server.request_failed(err) from None
        if constraint is not None:
            checks = client.checks
            print(f"vLLM: {checks['answers_corrected']} of {checks['constrained_answers']} constrained answers went "
                  f"past the grammar (a repeated line) and were finished token by token ({checks['tokens_corrected']} "
                  "tokens)")  # fmt: skip
    finally:
        if server is not None:
            server.stop()
    return answers, constraint


def answer_constraint(config: Config, tokenizer: Any, rows: list[dict[str, Any]]) -> NerConstraint | None:
    """test.py's and predict.py's constraint for these data rows (None when constrained=false)."""
    from llama_ner.generation.ner_constraint import NerConstraint, load_entity_types, text_of_query

    if not config.constrained:
        return None
    trained = getattr(config, "trained_entity_types", "")
    types = load_entity_types(config.entity_types, getattr(config, "train_path", ""), config.response_column,
                              trained=trained)  # fmt: skip
    texts = [text_of_query(row.get(config.query_column) or "", row[config.instruct_column]) for row in rows]
    return NerConstraint(tokenizer, texts, types)


def adapter_entity_types(args: argparse.Namespace) -> tuple[str, ...]:
    """The entity types for chat_ner.py / serve.py: --entity_types, else those the LoRA was trained on
    (its train_args.json's trained_entity_types, else its train_path's answers), else MSRA's."""
    from llama_ner.generation.ner_constraint import load_entity_types

    config = adapter_train_args(args.lora_model)
    column, trained = config.get("response_column", "answer"), config.get("trained_entity_types", "")
    return load_entity_types(args.entity_types, config.get("train_path"), column, trained=trained)


def adapter_window_chars(args: argparse.Namespace) -> int:
    """chat_ner.py's / serve.py's window length: the longest text the LoRA was trained on (its
    train_args.json's trained_text_chars); longer texts are answered in windows. 0: none recorded."""
    return int(adapter_train_args(args.lora_model).get("trained_text_chars") or 0)


def adapter_train_args(lora_model: str | None) -> dict[str, Any]:
    """The train_args.json that training saves inside the adapter folder, or {} (no LoRA, or none saved)."""
    trained = Path(lora_model or "") / "train_args.json"
    return load_config(trained) if lora_model and trained.is_file() else {}


def base_bits(args: argparse.Namespace) -> int:
    """The base's bit width (0 = unquantized), printed: --load_in_kbits, else the quantization_bit the
    LoRA was trained with (its train_args.json), so a QLoRA adapter runs on the base it learned on."""
    recorded = adapter_train_args(args.lora_model).get("quantization_bit")
    if args.load_in_kbits is not None:
        bits, source = (0 if args.load_in_kbits == 16 else args.load_in_kbits), "--load_in_kbits"
    elif recorded is not None:
        bits = recorded
        source = f"quantization_bit in {Path(args.lora_model) / 'train_args.json'}; --load_in_kbits overrides it"
    else:
        bits, source = 0, "default"
    print(f"base model: {f'{bits}-bit (bitsandbytes)' if bits else 'not quantized'} ({source})")
    return bits


def none_or_path(value: str) -> str | None:
    """--lora_model none (any case, or empty) means no adapter, as --help says."""
    return None if value.strip().lower() in ("", "none") else value


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The model flags of chat_ner.py and serve.py."""
    parser.add_argument("--base_model", required=True, help="Hugging Face model directory (merged Chinese-Alpaca)")
    parser.add_argument("--lora_model", default=None, type=none_or_path,
                        help="LoRA adapter directory; none = the base model alone")  # fmt: skip
    parser.add_argument("--tokenizer_path", default=None, help="default: lora_model if it has one, else base_model")
    parser.add_argument("--gpus", default="0", help="CUDA_VISIBLE_DEVICES")
    parser.add_argument("--only_cpu", action="store_true", help="run on the CPU even when a GPU exists")
    parser.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA, fp32 on CPU), float16, bfloat16, float32")
    parser.add_argument(
        "--load_in_kbits", type=int, choices=[4, 8, 16], default=None,
        help="base in 4 or 8 bits (bitsandbytes), 16: not quantized; default: the LoRA's train_args.json "
        "quantization_bit (as it was trained), else 16",
    )  # fmt: skip
    parser.add_argument("--prompt_template", default=None, choices=["alpaca", "chat", "raw"],
                        help="default: the LoRA's train_args.json prompt_template, else alpaca")  # fmt: skip
    parser.add_argument("--entity_types", default="", help="types of constrained NER answers, e.g. 人名,地名; "
                        "default: those in the LoRA's training data (its train_args.json), else MSRA's")  # fmt: skip


def args_prompt_format(args: argparse.Namespace, tokenizer: Any) -> PromptFormat:
    """chat_ner.py's / serve.py's prompt format: --prompt_template, else the LoRA's train_args.json's, else alpaca."""
    trained = adapter_train_args(args.lora_model)
    name = args.prompt_template or trained.get("prompt_template", "alpaca")
    return prompt_format(name, tokenizer, trained.get("ner_instruction", ""))


def tokenizer_dir(args: argparse.Namespace) -> str:
    """--tokenizer_path, else the adapter's own tokenizer when it ships one, else the base model's."""
    if args.tokenizer_path:
        return args.tokenizer_path
    if args.lora_model and any((Path(args.lora_model) / n).is_file() for n in ("tokenizer.model", "tokenizer.json")):
        return args.lora_model
    return args.base_model


def load_from_args(args: argparse.Namespace) -> tuple[torch.nn.Module, Any]:
    """(model in eval mode, tokenizer) from the `add_model_args` flags; embeddings grow to a larger tokenizer."""
    from llama_ner.model_loading import load_model
    from llama_ner.tokenizer import load_tokenizer
    from llama_ner.weights.model_files import adapter_weights_file, check_model_files

    os.environ["CUDA_VISIBLE_DEVICES"] = "" if args.only_cpu else args.gpus  # torch reads it at its first CUDA call
    check_model_files(args.base_model)
    if args.lora_model:
        adapter_weights_file(args.lora_model)  # a missing or empty LoRA folder fails before the model loads
    tokenizer = load_tokenizer(tokenizer_dir(args))
    print(f"Vocab of the tokenizer: {len(tokenizer)}")
    bits = base_bits(args)
    model = load_model(args.base_model, args.lora_model, args.dtype, "cpu" if args.only_cpu else None, tokenizer, bits)
    print(f"Vocab of the model: {model.get_input_embeddings().weight.shape[0]}")
    return model, tokenizer
