"""Import a GGUF of architecture llama (a llama.cpp file) as a Hugging Face folder every script here loads.

    python import_gguf.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --output_dir model_hub/smollm2-135m-instruct
    python import_gguf.py --gguf model.gguf --output_dir model_hub/x --dtype bfloat16

Quantized tensors (Q4_1, Q8_0, ...) are dequantized to --dtype; names and the q/k rotary layout go back to
Hugging Face's. The folder holds model.safetensors, config.json, generation_config.json and the tokenizer
(tokenizer.json, tokenizer_config.json, chat_template.jinja). `make smollm2` runs this on SmolLM2-135M-Instruct.
Another architecture is refused naming it; the folder appears only once complete.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from config_utils import answer_help_first
from llama_ner.io_utils import run_cli

DTYPES = ("float32", "float16", "bfloat16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", required=True, help="the .gguf file to import (architecture llama)")
    parser.add_argument("--output_dir", required=True, help="the Hugging Face folder to write")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of the saved weights")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    return parser.parse_args(argv)


if __name__ == "__main__":  # answer --help before torch loads (seconds)
    answer_help_first(parse_args)

import torch

from llama_ner.io_utils import atomic_dir
from llama_ner.weights.gguf_import import check_gguf, import_gguf
from llama_ner.weights.model_files import check_output_dir, report_checksums
from llama_ner.weights.tensor_write import print_summary


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    start = time.time()
    gguf, output_dir = Path(args.gguf), Path(args.output_dir)
    info = check_gguf(gguf)
    check_output_dir(output_dir, [gguf], args.overwrite)
    print(f"{gguf}: {info['architecture']} '{info['name']}', {info['tensors']} tensors")
    report_checksums([(gguf, None)])
    with atomic_dir(output_dir) as tmp:
        import_gguf(gguf, tmp, getattr(torch, args.dtype))
    print_summary(str(output_dir), sorted(p for p in output_dir.iterdir() if p.is_file()), start)
    return output_dir


if __name__ == "__main__":
    run_cli(main)
