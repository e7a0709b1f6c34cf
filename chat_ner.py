"""Chat with a (merged) Chinese-Alpaca model, optionally with a LoRA: a REPL or a file of inputs.

    python chat_ner.py --base_model ./model_hub/chinese-alpaca-7b --with_prompt --interactive
    python chat_ner.py --base_model ./model_hub/chinese-alpaca-7b \
        --lora_model ./checkpoint/msra/train_trainer/adapter_model --ner --interactive
    python chat_ner.py --base_model ./model_hub/chinese-alpaca-7b --data_file inputs.txt --with_prompt

After ymcui/Chinese-LLaMA-Alpaca's scripts/inference_hf.py. The REPL is single-turn and
ends on an empty line or end of input. --data_file (one input per line) writes
--predictions_file and generation_config.json beside it. --ner treats each input as a plain
sentence and wraps it in the NER instruction with the training prompt (as test.py does).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch

from dataset import DataError, build_prompt, ner_row
from io_utils import atomic_write_text, run_cli
from model_utils import generate_answers, load_model, load_tokenizer

SAMPLE_DATA = ["为什么要减少污染，保护环境？"]
BANNER = (
    "=" * 85
    + "\n+ 该模式下仅支持单轮问答，无多轮对话能力。\n+ 如要进行多轮对话，请使用llama.cpp或llamachat工具。\n"
    + "-" * 85
    + "\n+ This mode only supports single-turn QA.\n"
    "+ If you want to experience multi-turn dialogue, please use llama.cpp or llamachat.\n" + "=" * 85
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base_model", required=True, help="Hugging Face model directory (merged Chinese-Alpaca)")
    p.add_argument("--lora_model", default=None, help="LoRA adapter directory; none = the base model alone")
    p.add_argument("--tokenizer_path", default=None, help="default: lora_model if it has a tokenizer, else base_model")
    p.add_argument("--data_file", default=None, help="a file with one input per line (batch mode)")
    p.add_argument("--with_prompt", action="store_true", help="wrap each input in the Alpaca prompt")
    p.add_argument("--ner", action="store_true", help="each input is a sentence: wrap it in the NER instruction")
    p.add_argument("--interactive", action="store_true", help="single-turn REPL")
    p.add_argument("--predictions_file", default="./predictions.json", help="batch mode output")
    p.add_argument("--gpus", default="0", help="CUDA_VISIBLE_DEVICES")
    p.add_argument("--only_cpu", action="store_true", help="run on the CPU even when a GPU exists")
    p.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA, fp32 on CPU), float16, bfloat16, float32")
    p.add_argument(
        "--load_in_kbits", type=int, choices=[4, 8, 16], default=16, help="base in 4 or 8 bits (bitsandbytes); 16: not"
    )
    p.add_argument("--batch_size", type=int, default=8, help="inputs generated together in batch mode")
    p.add_argument("--temperature", type=float, default=0.2, help="0 = greedy decoding")
    p.add_argument("--top_p", type=float, default=0.9)
    p.add_argument("--top_k", type=int, default=40)
    p.add_argument("--max_new_tokens", type=int, default=400)
    p.add_argument("--repetition_penalty", type=float, default=1.3)
    p.add_argument("--seed", type=int, default=None, help="seed the sampler for repeatable output")
    return p.parse_args(argv)


def generation_config(args: argparse.Namespace) -> dict[str, Any]:
    """The generate() settings; temperature 0 means greedy."""
    config: dict[str, Any] = {"num_beams": 1, "repetition_penalty": args.repetition_penalty}
    if args.temperature > 0:
        config.update(do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    else:
        config.update(do_sample=False)
    config["max_new_tokens"] = args.max_new_tokens
    return config


def make_prompt(text: str, args: argparse.Namespace) -> str:
    """The model input for one user input."""
    if args.ner:
        row = ner_row(text)
        return build_prompt(row["instruct"], row["query"])
    return build_prompt(text) if args.with_prompt else text


def read_inputs(path: str) -> list[str]:
    """Non-blank lines of --data_file."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{file}: --data_file not found; pass a text file with one input per line")
    try:
        lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as err:
        raise DataError(f"{file}: not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    inputs = [line for line in lines if line]
    if not inputs:
        raise DataError(f"{file}: no inputs; write one per line")
    return inputs


def tokenizer_dir(args: argparse.Namespace) -> str:
    if args.tokenizer_path:
        return args.tokenizer_path
    if args.lora_model and (Path(args.lora_model) / "tokenizer.model").is_file():
        return args.lora_model
    return args.base_model


def load(args: argparse.Namespace) -> tuple[Any, Any]:
    """(model, tokenizer); embeddings grow to a larger tokenizer, a smaller one is an error."""
    device = "cpu" if args.only_cpu else None
    tokenizer = load_tokenizer(tokenizer_dir(args))
    print(f"Vocab of the tokenizer: {len(tokenizer)}")
    bits = 0 if args.load_in_kbits == 16 else args.load_in_kbits
    model = load_model(args.base_model, args.lora_model, args.dtype, device, tokenizer, bits)
    print(f"Vocab of the model: {model.get_input_embeddings().weight.shape[0]}")
    return model, tokenizer


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
        response = generate_answers(model, tokenizer, [make_prompt(text.strip(), args)], 1, progress=False, **settings)
        print("Response: ", response[0])
        print("\n")
        answered += 1
    return answered


def run_file(model: Any, tokenizer: Any, inputs: list[str], args: argparse.Namespace, settings: dict) -> None:
    """Batch mode: answer every input, write predictions_file and generation_config.json."""
    print("Start inference.")
    prompts = [make_prompt(text, args) for text in inputs]
    responses = generate_answers(model, tokenizer, prompts, args.batch_size, **settings)
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
    os.environ["CUDA_VISIBLE_DEVICES"] = "" if args.only_cpu else args.gpus  # torch reads it at its first CUDA call
    inputs = read_inputs(args.data_file) if args.data_file else SAMPLE_DATA
    if args.seed is not None:
        torch.manual_seed(args.seed)
    model, tokenizer = load(args)
    settings = generation_config(args)
    if args.interactive:
        interact(model, tokenizer, args, settings)
    else:
        if args.data_file:
            print("first 10 examples:", *inputs[:10], sep="\n")
        run_file(model, tokenizer, inputs, args, settings)


if __name__ == "__main__":
    run_cli(main)
