"""Export a Hugging Face LLaMA directory (e.g. the merged Chinese-Alpaca) to one GGUF file for llama.cpp.

    python export_gguf.py --model_dir model_hub/chinese-alpaca-7b
    python export_gguf.py --model_dir model_hub/chinese-alpaca-7b --output model_hub/chinese-alpaca-7b-f16.gguf

fp16 matrices, fp32 norms, q/k in Meta's rotary layout, the SentencePiece vocabulary of the
directory's tokenizer.model or the byte-level BPE (`gpt2`) of its tokenizer.json, and its chat template.
Quantize it afterwards with llama.cpp's `llama-quantize` (README, GGUF section).
To merge LoRAs and export in one go: merge_llama_with_chinese_lora.py --output_type gguf.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tqdm import tqdm

from config_utils import answer_help_first
from llama_ner.io_utils import check_output_file, run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True, help="Hugging Face LlamaForCausalLM directory")
    parser.add_argument("--output", default=None, help="the .gguf to write (default MODEL_DIR/ggml-model-f16.gguf)")
    parser.add_argument(
        "--tokenizer_dir", default=None, help="tokenizer.model / tokenizer.json folder (default: --model_dir)"
    )
    parser.add_argument("--tokenizer_pre", default=None, help="llama.cpp pre-tokenizer of a BPE tokenizer.json "
                        "(gpt-2, llama-bpe, smollm, ...); default: recognized from its pre_tokenizer")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return parser.parse_args(argv)


if __name__ == "__main__":  # answer --help before torch and numpy load (seconds)
    answer_help_first(parse_args)

from llama_ner.io_utils import ModelLoadError
from llama_ner.tokenizer import is_sentencepiece, load_tokenizer
from llama_ner.weights.llama_gguf import GGUF_FILE_NAME, hf_to_gguf_name, tokenizer_pre, write_gguf
from llama_ner.weights.llama_layout import IGNORED_HF_SUFFIXES, hf_sort_key
from llama_ner.weights.model_files import check_model_files, input_files, read_model_config
from llama_ner.weights.tensor_read import TensorSource
from llama_ner.weights.tensor_write import print_summary


def export(model_dir: Path, output: Path, tokenizer_dir: Path, overwrite: bool = False, pre: str | None = None) -> Path:
    config = read_model_config(model_dir)
    files = check_model_files(model_dir)  # headers only: sizes, the index, shapes against config.json
    inputs = [*input_files(model_dir), *input_files(tokenizer_dir), *files]
    check_output_file(output, "--output", inputs)  # --overwrite or not, never over a file this run reads
    if output.exists() and not overwrite:
        raise ModelLoadError(f"{output} exists: choose another --output or pass --overwrite")
    source = TensorSource(files, IGNORED_HF_SUFFIXES)  # each header read, sizes checked before any output
    names = sorted(source.keys(), key=hf_sort_key)
    for name in names:
        try:
            hf_to_gguf_name(name)
        except KeyError:
            raise ModelLoadError(f"{model_dir}: tensor {name} has no llama.cpp name; is this a LLaMA model?") from None
    entries = [(name, source.info(name)) for name in names]
    progress = lambda items: tqdm(items, desc="exporting", unit="tensor")  # noqa: E731
    tokenizer = load_tokenizer(tokenizer_dir)
    rows = source.info("model.embed_tokens.weight").shape[0] if "model.embed_tokens.weight" in source else None
    fits = rows == len(tokenizer) or (rows is not None and rows > len(tokenizer) and not is_sentencepiece(tokenizer))
    if not fits:  # a tokenizer.json model may have padding rows past its tokenizer
        raise ModelLoadError(
            f"{tokenizer_dir}: the tokenizer has {len(tokenizer)} tokens but the model {rows} embedding rows: "
            "pass --tokenizer_dir with the tokenizer this model was merged with"
        )
    if not is_sentencepiece(tokenizer):
        try:
            pre = pre or tokenizer_pre(tokenizer)
        except ValueError as err:
            raise ModelLoadError(f"{tokenizer_dir / 'tokenizer.json'}: {err}") from None
    return write_gguf(output, entries, source.read, config, tokenizer, model_dir.name, progress, pre)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.time()
    model_dir = Path(args.model_dir)
    output = Path(args.output) if args.output else model_dir / GGUF_FILE_NAME
    written = export(model_dir, output, Path(args.tokenizer_dir or model_dir), args.overwrite, args.tokenizer_pre)
    print_summary(str(written), [written], start)


if __name__ == "__main__":
    run_cli(main)
