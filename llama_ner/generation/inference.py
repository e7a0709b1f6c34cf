"""What the inference scripts share: the trained run's config, the prompts, NER answers.

    config = resolve_config(sys.argv[1:], {"predict_path": ""})
    spec = spec_from_config(config)                     # loading.py: what to load, and load(spec)
    answers, constraint = engine_answer_rows(rows, config, spec)
    answers = ner_answers(model, tokenizer, ["北京是中国的首都。"], 16, 256, types=("人名", "地名", "机构名"))

test.py and predict.py take the training run's train_args.json (every key can be overridden
on the command line, e.g. --dev_path=...) plus the evaluation keys below; chat_ner.py and
serve.py take the model flags of loading.add_model_args.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from config_utils import Config, ConfigError, ConfigParser, load_config, require, split_argv
from dataset import ALPACA, PromptFormat, build_prompt, ner_row
from llama_ner.generation.loading import ModelSpec, window_limit

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
    "continuous_batching": True,  # a finished answer leaves the batch, the next prompt joins (same answers)
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
    model: torch.nn.Module,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    config: Config,
    spec: ModelSpec,
    progress: bool = True,
) -> tuple[list[str], NerConstraint | None]:
    """test.py's and predict.py's answers for data rows: the training prompt, the constraint (the spec's
    entity types; none when constrained=false), batched greedy generation, long texts in windows.
    Returns (answers, the constraint used or None)."""
    from llama_ner.generation.generate import generate_answers

    fmt = spec.prompt_format(tokenizer)

    def answer(pieces: list[dict[str, Any]]) -> tuple[list[str], NerConstraint | None]:
        prompts = [row_prompt(row, config, fmt) for row in pieces]
        constraint = answer_constraint(config, spec, tokenizer, pieces)
        answers = generate_answers(
            model, tokenizer, prompts, config.eval_batch_size, config.max_new_tokens, progress=progress,
            constraint=constraint, prompt_format=fmt, prefix_cache=getattr(config, "prefix_cache", True),
            continuous=getattr(config, "continuous_batching", True),
        )  # fmt: skip
        return answers, constraint

    return in_windows(rows, config, spec.window_chars, answer)


def engine_answer_rows(
    rows: list[dict[str, Any]], config: Config, spec: ModelSpec
) -> tuple[list[str], NerConstraint | None]:
    """answer_rows on the configured engine: the model loaded here (hf), or a vLLM server (the same answers)."""
    from llama_ner.generation import loading

    if config.engine == "hf":
        model, tokenizer = loading.load(spec)
        return answer_rows(model, tokenizer, rows, config, spec)
    return in_windows(rows, config, spec.window_chars, lambda pieces: vllm_answer_rows(pieces, config, spec))


def in_windows(
    rows: list[dict[str, Any]],
    config: Config,
    limit: int,
    answer: Callable[[list[dict[str, Any]]], tuple[list[str], Any]],
) -> tuple[list[str], Any]:
    """`answer` over the rows with each text longer than `limit` characters split into windows (windows.py),
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

    return answer_in_windows(texts, limit, answer_pieces), beside[0]


def vllm_answer_rows(
    rows: list[dict[str, Any]], config: Config, spec: ModelSpec
) -> tuple[list[str], NerConstraint | None]:
    """answer_rows on vLLM: the same prompts as token ids, the same constraint, checked token by token."""
    import shlex

    from tqdm import tqdm

    from llama_ner.generation.loading import check_files
    from llama_ner.generation.vllm_client import EngineError, EngineRefused, connect, prompt_ids
    from llama_ner.generation.vllm_process import VllmLaunch, vllm_dtype
    from llama_ner.tokenizer import load_tokenizer

    if spec.bits:
        raise ConfigError("engine=vllm runs the base unquantized here: pass --quantization_bit=0, or engine=hf")
    if not config.engine_url:
        check_files(spec)
    tokenizer = load_tokenizer(spec.tokenizer)
    dtype = vllm_dtype(spec.dtype, spec.device == "cpu")
    launch = VllmLaunch(spec.base, spec.adapter, spec.tokenizer, dtype, 0, config.vllm_python,
                        shlex.split(config.vllm_args))  # fmt: skip
    grammar = config.vllm_constraint == "grammar"
    client, server, positions = connect(tokenizer, spec.base, spec.adapter, config.engine_url,
                                        config.engine_model, None, launch, grammar)  # fmt: skip
    try:
        fmt = spec.prompt_format(tokenizer)
        prompts = [row_prompt(row, config, fmt) for row in rows]
        ids = prompt_ids(tokenizer, prompts, positions, config.max_new_tokens, fmt)
        constraint = answer_constraint(config, spec, tokenizer, rows)
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


def answer_constraint(
    config: Config, spec: ModelSpec, tokenizer: Any, rows: list[dict[str, Any]]
) -> NerConstraint | None:
    """The constraint for these data rows: the spec's entity types over the rows' texts (None: unconstrained)."""
    from llama_ner.generation.ner_constraint import NerConstraint, text_of_query

    if spec.entity_types is None:
        return None
    texts = [text_of_query(row.get(config.query_column) or "", row[config.instruct_column]) for row in rows]
    return NerConstraint(tokenizer, texts, spec.entity_types)
