"""Peak memory and wall time of merging two Plus-shaped LoRAs: our streaming merge vs the seed's way.

    python bench/merge_memory.py                   # 16 and 8 layers, hidden 2048 (needs ~8 GB disk, ~4 GB RAM)
    python bench/merge_memory.py --layers 16       # one depth only
    python bench/merge_memory.py --convert         # convert_llama_weights_to_hf.py on 2-shard originals instead

The seed's way (2023 merge script): load the whole fp16 model, then per LoRA resize the
embeddings, wrap in PeftModel and merge_and_unload, then save_pretrained. Ours:
merge_llama_with_chinese_lora.py --output_type huggingface (and --output_type gguf). Each side runs in its own
subprocess; peak RSS comes from io_utils.run_measured (that child's rusage, or its process
tree's sum if larger). The parent never imports torch: Linux carries the parent's resident size
into a forked child's ru_maxrss. Inputs are
made (in a subprocess too) and cached under .bench/merge/; outputs are deleted after each run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llama_ner.io_utils import run_measured  # noqa: E402

WORK = ROOT / ".bench" / "merge"
HIDDEN, HEADS, INTER, VOCAB = 2048, 16, 5504, 32000  # 7B's proportions at half the width


def make_base(out: Path, layers: int, vocab: str = "llama", dtype: str = "float16", hidden: int = HIDDEN) -> Path:
    """A random LLaMA (float16 or bfloat16) written tensor by tensor (a real init of 1 B params would take
    minutes), 7B's proportions at width `hidden`.

    vocab: the tokenizer written beside it, 'llama' (32000 tokens) or 'alpaca' (49954).
    """
    import torch
    from transformers import LlamaForCausalLM

    from llama_ner.io_utils import atomic_dir
    from llama_ner.tiny_models import tiny_llama_config, write_tokenizer

    if (out / "config.json").is_file():
        return out
    heads, inter = HEADS * hidden // HIDDEN, INTER * hidden // HIDDEN
    config = tiny_llama_config({"llama": VOCAB, "alpaca": 49954}[vocab], hidden, layers, heads, inter)
    config.dtype = torch_dtype = getattr(torch, dtype)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    with atomic_dir(out) as tmp:
        from safetensors.torch import save_file

        shard, shard_bytes, n_files, weight_map = {}, 0, 0, {}
        names = list(shapes)
        for i, name in enumerate(names):
            shape = shapes[name]
            if len(shape) == 1:
                shard[name] = torch.ones(shape, dtype=torch_dtype)
            else:
                shard[name] = (torch.randn(shape, generator=gen) * 0.02).to(torch_dtype)
            shard_bytes += shard[name].nbytes
            if shard_bytes > 500e6 or i == len(names) - 1:
                n_files += 1
                file = f"model-{n_files:05d}.safetensors"
                save_file(shard, tmp / file, metadata={"format": "pt"})
                weight_map |= {k: file for k in shard}
                shard, shard_bytes = {}, 0
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        config.save_pretrained(tmp)
        write_tokenizer(tmp, vocab)
    return out


def input_paths(layers: int) -> tuple[Path, list[Path]]:
    folder = WORK / f"L{layers}"
    return folder / "base", [folder / "chinese-llama-plus-lora-7b", folder / "chinese-alpaca-plus-lora-7b"]


def make_inputs(layers: int) -> None:
    from llama_ner.tiny_models import make_tiny_chinese_loras

    base, loras = input_paths(layers)
    make_base(base, layers)
    if not all((p / "adapter_model.bin").is_file() for p in loras):
        make_tiny_chinese_loras(base, base.parent, r_llama=8, r_alpaca=64)


def seed_merge(base: str, loras: list[str], out: str) -> None:
    """What the 2023 script did: whole model in fp16, PeftModel.merge_and_unload per LoRA, save."""
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from llama_ner.tokenizer import load_tokenizer

    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float16)
    for path in loras:
        tokens = len(load_tokenizer(path))
        if model.get_input_embeddings().weight.size(0) != tokens:
            model.resize_token_embeddings(tokens, mean_resizing=False)
        model = PeftModel.from_pretrained(model, path, dtype=torch.float16).merge_and_unload()
    model.save_pretrained(out)


def make_original(layers: int) -> None:
    from llama_ner.tiny_models import make_tiny_original

    out = WORK / f"orig-L{layers}"
    if not (out / "7B" / "params.json").is_file():
        make_tiny_original(out, n_shards=2, dim=HIDDEN, n_layers=layers, n_heads=HEADS, multiple_of=256)


def measure(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in GB, wall seconds) of a command run as a child of this small process."""
    with tempfile.TemporaryFile() as log:
        code, wall, peak = run_measured(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
        if code != 0:
            log.seek(0)
            raise SystemExit(f"{cmd[1]} failed:\n{log.read().decode(errors='replace')[-2000:]}")
    return peak / 1024**3, wall


def bench_convert(layers: int) -> str:
    subprocess.run([sys.executable, __file__, "--make_original", str(layers)], check=True)
    original, out = WORK / f"orig-L{layers}", WORK / "out-convert"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(ROOT / "convert_llama_weights_to_hf.py"), "--input_dir", str(original)]
    rss, wall = measure(cmd + ["--model_size", "7B", "--output_dir", str(out)])
    size = sum(p.stat().st_size for p in (original / "7B").glob("*.pth")) / 1e9
    shutil.rmtree(out, ignore_errors=True)
    return f"| convert, 2 shards, {layers} x {HIDDEN} ({size:.2f} GB fp16) | {rss:.2f} GB | {wall:.1f} s |"


def run_side(side: str, base: Path, loras: list[Path], out: Path) -> tuple[float, float]:
    """(peak RSS in GB, wall seconds) of one side, in its own process."""
    shutil.rmtree(out, ignore_errors=True)
    if side.startswith("ours"):
        output_type = "gguf" if side == "ours_gguf" else "huggingface"
        cmd = [sys.executable, str(ROOT / "merge_llama_with_chinese_lora.py"), "--base_model", str(base)]
        cmd += ["--lora_model", ",".join(map(str, loras)), "--output_type", output_type, "--output_dir", str(out)]
    else:
        cmd = [sys.executable, __file__, "--seed_side", str(base), ",".join(map(str, loras)), str(out)]
    rss, wall = measure(cmd)
    shutil.rmtree(out, ignore_errors=True)
    return rss, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[16, 8])
    parser.add_argument("--seed_side", nargs=3, metavar=("BASE", "LORAS", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--convert", action="store_true", help="measure convert_llama_weights_to_hf.py instead")
    parser.add_argument("--make_inputs", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--make_original", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.seed_side:
        base, loras, out = args.seed_side
        seed_merge(base, loras.split(","), out)
        return
    if args.make_inputs:
        make_inputs(args.make_inputs)
        return
    if args.make_original:
        make_original(args.make_original)
        return
    if args.convert:
        rows = [bench_convert(layers) for layers in args.layers]
        print("| conversion | peak RSS | wall |\n|---|---|---|\n" + "\n".join(rows))
        return
    rows = []
    for layers in args.layers:
        subprocess.run([sys.executable, __file__, "--make_inputs", str(layers)], check=True)
        base, loras = input_paths(layers)
        size = sum(p.stat().st_size for p in base.glob("*.safetensors")) / 1e9
        results = {side: run_side(side, base, loras, WORK / f"out-{side}") for side in ("seed", "ours", "ours_gguf")}
        (seed_rss, seed_wall), (our_rss, our_wall) = results["seed"], results["ours"]
        gguf_rss, gguf_wall = results["ours_gguf"]
        rows.append(
            f"| {layers} x {HIDDEN} ({size:.2f} GB fp16) | {seed_rss:.2f} GB | {seed_wall:.1f} s "
            f"| {our_rss:.2f} GB | {our_wall:.1f} s | {our_rss / seed_rss:.2f}x "
            f"| {gguf_rss:.2f} GB | {gguf_wall:.1f} s |"
        )
        print(rows[-1], flush=True)
    print(f"\n{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores; two LoRAs (r=8, 49953 tokens; r=64, 49954)\n")
    print(
        "| base | seed's way peak RSS | seed's way wall | ours peak RSS | ours wall | RSS ratio "
        "| ours -> gguf RSS | wall |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
