"""Chat with a (merged) Chinese-Alpaca model, optionally with a LoRA: a REPL or a file of inputs.

    python chat_ner.py --base_model ./model_hub/chinese-alpaca-7b --with_prompt --interactive
    python chat_ner.py --base_model ./model_hub/chinese-alpaca-7b \
        --lora_model ./checkpoint/msra/train_trainer/adapter_model --ner --interactive
    python chat_ner.py --base_model ./model_hub/chinese-alpaca-7b --data_file inputs.txt --with_prompt

After ymcui/Chinese-LLaMA-Alpaca's scripts/inference_hf.py. The REPL is single-turn and
ends on an empty line or end of input. --data_file (one input per line) writes
--predictions_file and generation_config.json beside it. --ner treats each input as a plain
sentence and wraps it in the NER instruction with the training prompt and decodes as test.py
does (greedy, no repetition penalty, max_new_tokens 256, constrained answers: ner_constraint.py)
unless sampling options or --constrained false are given.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from config_utils import answer_help_first, convert_value
from dataset import DataError, build_prompt
from llama_ner.generation.inference import EVAL_DEFAULTS, ner_answers, ner_prompt
from llama_ner.generation.loading import add_model_args, load, spec_from_args
from llama_ner.io_utils import UserError, atomic_write_text, check_output_file, read_lines, run_cli

CHAT_DECODING = {"temperature": 0.2, "top_p": 0.9, "top_k": 40, "repetition_penalty": 1.3, "max_new_tokens": 400}
NER_DECODING = {  # test.py's: greedy, no penalty (answers repeat their type names on every line)
    **CHAT_DECODING,
    "temperature": 0.0,
    "repetition_penalty": 1.0,
    "max_new_tokens": EVAL_DEFAULTS["max_new_tokens"],
}
SAMPLE_DATA = ["为什么要减少污染，保护环境？"]
BANNER = (
    "=" * 85
    + "\n+ 该模式下仅支持单轮问答，无多轮对话能力。\n+ 如要进行多轮对话，请使用llama.cpp或llamachat工具。\n"
    + "-" * 85
    + "\n+ This mode only supports single-turn QA.\n"
    "+ If you want to experience multi-turn dialogue, please use llama.cpp or llamachat.\n" + "=" * 85
)


def parse_bool(text: str) -> bool:
    return convert_value("--constrained", text, True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--data_file", default=None, help="a file with one input per line (batch mode)")
    p.add_argument("--with_prompt", action="store_true", help="wrap each input in the Alpaca prompt")
    p.add_argument("--ner", action="store_true", help="each input is a sentence: wrap it in the NER instruction")
    p.add_argument("--constrained", type=parse_bool, default=True, help="with --ner: valid answers only (true/false)")
    p.add_argument("--interactive", action="store_true", help="single-turn REPL")
    p.add_argument("--predictions_file", default="./predictions.json", help="batch mode output")
    p.add_argument("--batch_size", type=int, default=8, help="inputs generated together in batch mode")
    p.add_argument("--temperature", type=float, help="0 = greedy; default 0.2, with --ner 0 (as test.py)")
    p.add_argument("--top_p", type=float, help=f"default {CHAT_DECODING['top_p']}")
    p.add_argument("--top_k", type=int, help=f"default {CHAT_DECODING['top_k']}")
    p.add_argument("--max_new_tokens", type=int, help="default 400, with --ner test.py's 256")
    p.add_argument("--repetition_penalty", type=float, help="1.0 = none; default 1.3, with --ner 1.0 (as test.py)")
    p.add_argument("--seed", type=int, default=None, help="seed the sampler for repeatable output")
    args = p.parse_args(argv)
    defaults = NER_DECODING if args.ner else CHAT_DECODING
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


if __name__ == "__main__":  # answer --help before torch and transformers load (seconds)
    answer_help_first(parse_args)

import torch

from llama_ner.generation.generate import generate_answers
from llama_ner.weights.model_files import input_files


def check_args(args: argparse.Namespace) -> None:
    """Numbers that cannot be right, and output paths that cannot be written, stop the run before loading."""
    for name, ok, rule in (
        ("batch_size", args.batch_size > 0, "> 0"),
        ("max_new_tokens", args.max_new_tokens > 0, "> 0"),
        ("temperature", args.temperature >= 0, ">= 0 (0 = greedy)"),
        ("top_p", 0 < args.top_p <= 1, "in (0, 1]"),
        ("top_k", args.top_k >= 0, ">= 0"),
        ("repetition_penalty", args.repetition_penalty > 0, "> 0 (1 = none)"),
    ):
        if not ok:
            raise UserError(f"--{name} {getattr(args, name)} must be {rule}")
    if args.interactive:
        return  # the REPL writes no file
    inputs = [args.data_file] if args.data_file else []
    for folder in (args.base_model, args.lora_model, args.tokenizer_path):
        inputs += input_files(folder) if folder else []
    out = check_output_file(args.predictions_file, "--predictions_file", inputs)
    check_output_file(out.parent / "generation_config.json", "--predictions_file's folder", inputs)


def generation_config(args: argparse.Namespace) -> dict[str, Any]:
    """The generate() settings; temperature 0 means greedy, repetition penalty 1.0 none."""
    config: dict[str, Any] = {"num_beams": 1}
    if args.repetition_penalty != 1.0:
        config["repetition_penalty"] = args.repetition_penalty
    if args.temperature > 0:
        config.update(do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    else:
        config.update(do_sample=False)
    config["max_new_tokens"] = args.max_new_tokens
    return config


def describe_decoding(settings: dict[str, Any], ner: bool) -> str:
    """One line saying how answers are decoded."""
    if settings["do_sample"]:
        keys = ("temperature", "top_k", "top_p")
        words = "sampling (" + ", ".join(f"{k} {settings[k]}" for k in keys) + ")"
    else:
        words = "greedy"
    words += (
        f", repetition_penalty {settings.get('repetition_penalty', 1.0)}, max_new_tokens {settings['max_new_tokens']}"
    )
    if ner and settings == generation_config(argparse.Namespace(**NER_DECODING)):
        words += " (as test.py; pass --temperature etc. to sample)"
    return f"decoding: {words}"


def make_prompt(text: str, args: argparse.Namespace) -> str:
    """The model input for one user input."""
    if args.ner:
        return ner_prompt(text, args.fmt)
    return build_prompt(text, "", args.fmt) if args.with_prompt else text


def respond(model: Any, tokenizer: Any, inputs: list[str], args: argparse.Namespace, settings: dict, **kw) -> list[str]:
    """Answers for user inputs: NER goes through inference.ner_answers, as every NER path does."""
    gen = {k: v for k, v in settings.items() if k != "max_new_tokens"}
    if args.ner:
        types = args.types if args.constrained else None
        return ner_answers(
            model,
            tokenizer,
            inputs,
            args.batch_size,
            settings["max_new_tokens"],
            types=types,
            fmt=args.fmt,
            window_chars=args.window_chars,
            **kw,
            **gen,
        )
    prompts = [make_prompt(text, args) for text in inputs]
    fmt = {"prompt_format": args.fmt} if args.with_prompt else {}
    return generate_answers(model, tokenizer, prompts, args.batch_size, settings["max_new_tokens"], **fmt, **kw, **gen)


def read_inputs(path: str) -> list[str]:
    """Non-blank lines of --data_file."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{file}: --data_file not found; pass a text file with one input per line")
    inputs = [line.strip() for line in read_lines(file, DataError) if line.strip()]
    if not inputs:
        raise DataError(f"{file}: no inputs; write one per line")
    return inputs


def interact(model: Any, tokenizer: Any, args: argparse.Namespace, settings: dict[str, Any]) -> int:
    """Single-turn REPL; returns the number of answered inputs."""
    print("Start inference with instruction mode.")
    print(BANNER)
    answered = 0
    while True:
        try:
            text = input("Input:")
        except (EOFError, KeyboardInterrupt):
            print()
            break
        if not text.strip():
            break
        response = respond(model, tokenizer, [text.strip()], args, settings, progress=False)
        print("Response: ", response[0])
        print("\n")
        answered += 1
    return answered


def run_file(model: Any, tokenizer: Any, inputs: list[str], args: argparse.Namespace, settings: dict) -> None:
    """Batch mode: answer every input, write predictions_file and generation_config.json."""
    print("Start inference.")
    prompts = [make_prompt(text, args) for text in inputs]
    responses = respond(model, tokenizer, inputs, args, settings, progress=True)
    results = []
    for index, (text, prompt, response) in enumerate(zip(inputs, prompts, responses, strict=True)):
        print(f"======={index}=======")
        print(f"Input: {text}\n")
        print(f"Output: {response}\n")
        results.append({"Input": prompt, "Output": response})
    out = Path(args.predictions_file)
    atomic_write_text(out, json.dumps(results, ensure_ascii=False, indent=2) + "\n")
    atomic_write_text(out.parent / "generation_config.json", json.dumps(settings, ensure_ascii=False, indent=2) + "\n")
    print(f"{len(results)} inputs answered; wrote {out} and {out.parent / 'generation_config.json'}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_args(args)
    inputs = read_inputs(args.data_file) if args.data_file else SAMPLE_DATA
    settings = generation_config(args)
    print(describe_decoding(settings, args.ner))
    if args.seed is not None:
        torch.manual_seed(args.seed)
    spec = spec_from_args(args, with_types=args.ner and args.constrained)
    model, tokenizer = load(spec)
    args.fmt = spec.prompt_format(tokenizer)  # the prompt the LoRA was trained with
    args.window_chars = spec.window_chars  # --ner: longer texts than the trained ones go in windows
    args.types = spec.entity_types
    if args.interactive:
        interact(model, tokenizer, args, settings)
    else:
        if args.data_file:
            print("first 10 examples:", *inputs[:10], sep="\n")
        run_file(model, tokenizer, inputs, args, settings)


if __name__ == "__main__":
    run_cli(main)
