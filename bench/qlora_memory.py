"""Peak memory of LoRA training on an fp32 base vs a 4-bit one (quantization_bit=4), and the 7B table.

    python bench/qlora_memory.py            # measured on the CPU on two geometries, then the computed 7B table
    python bench/qlora_memory.py --table    # only the computed 7B table

Measured: train_deepspeed.py in one process with deepspeed.json as shipped (ZeRO-1, Adam offloaded; on
a CPU it trains in fp32, so the 4-bit base computes in fp32 and keeps embed_tokens and lm_head in fp32),
one optimizer step on one MSRA row, on random LLaMAs stored in bf16 with the 49954-token Chinese-Alpaca
vocabulary and 7B's proportions: hidden 2048 x 12 layers (0.82 B parameters) and 1536 x 8 (0.38 B),
made once under .bench/qlora/. Peak RSS is the child's whole run (/proc VmHWM, sampled), also split where
the model is built (io_utils.run_measured_phases) to show which phase sets it; a process that only
imports the libraries gives the part that does not scale with the model. This parent never imports
torch. The 7B table is arithmetic from the 7B geometry, printed with its assumptions.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from llama_ner.io_utils import run_measured_phases  # noqa: E402

WORK = ROOT / ".bench" / "qlora"
GB = 1e9
GEOMETRIES = [(2048, 12), (1536, 8)]  # (hidden, layers)


def measure(cmd: list[str], marker: str = "trainable params:") -> tuple[float, float, float]:
    """(peak RSS while loading, peak RSS after the model is built, wall seconds) of one process, run as a
    user runs it (no allocator settings from outside)."""
    code, wall, (load, train), output = run_measured_phases(cmd, marker, cwd=ROOT)
    if code != 0 or marker not in output:
        raise SystemExit(f"{' '.join(cmd[:3])} failed:\n{output[-3000:]}")
    return load / GB, train / GB, wall


def inputs(hidden: int, layers: int) -> tuple[Path, Path]:
    """(model dir, one training row), made once."""
    base, rows = WORK / f"base-{layers}x{hidden}-bf16", WORK / "row.txt"
    if not (base / "config.json").is_file():
        code = f"import merge_memory, pathlib; merge_memory.make_base(pathlib.Path({str(base)!r}), {layers}, "
        code += f"'alpaca', 'bfloat16', {hidden})"
        subprocess.run([sys.executable, "-c", code], cwd=ROOT / "bench", check=True)
    rows.write_text((ROOT / "tests" / "data" / "msra_dev_instruct.txt").read_text("utf-8").splitlines()[0] + "\n")
    return base, rows


def run_training(bits: int, base: Path, rows: Path) -> tuple[float, float, float]:
    cmd = [sys.executable, str(ROOT / "train_deepspeed.py"), f"model_dir={base}", f"train_path={rows}", "dev_path="]
    cmd += [f"save_dir={WORK / f'out-{bits}'}", "train_batch_size=1", "num_train_epochs=1", "save_steps=100000"]
    cmd += [f"quantization_bit={bits}", "learning_rate=1e-4"]
    return measure(cmd)


def loading_4bit(base: Path) -> dict[str, float]:
    """Peak RSS of loading the base in 4 bits (fp32 compute) alone: transformers' own from_pretrained, which
    maps every shard until the last tensor is in, against model_loading.load_base (tensor by tensor)."""
    plain = "from transformers import AutoModelForCausalLM; from llama_ner.model_loading import pretrained_kwargs; "
    plain += f"AutoModelForCausalLM.from_pretrained({str(base)!r}, **pretrained_kwargs(4, torch.float32, 'cpu'))"
    ours = f"from llama_ner.model_loading import load_base; load_base({str(base)!r}, 4, torch.float32, 'cpu')"
    peaks = {}
    for way, code in (("transformers' from_pretrained", plain), ("load_base", ours)):
        _, peak, _ = measure([sys.executable, "-c", f"import torch; print('trainable params:'); {code}"])
        peaks[way] = peak
    return peaks


def libraries_only() -> float:
    """Peak RSS of a process that only imports what training imports (no model): the part of
    each training peak that does not scale with the model."""
    imports = "import torch, transformers, peft, deepspeed, bitsandbytes, llama_ner.training.model"
    code = f"{imports}; print('trainable params: 0')"

    load, _, _ = measure([sys.executable, "-c", code])
    return load


# ----------------------------------------------------------------------------- computed 7B table

HIDDEN, INTER, LAYERS, VOCAB, RANK = 4096, 11008, 32, 49954, 8
TOKENS = 12 * 192  # batch 12 x max_seq_length 192 (MSRA rows average 121 tokens: an upper bound)


def table_7b() -> str:
    """Memory of 7B LoRA training on one GPU, computed from the geometry (assumptions in the text)."""
    proj = LAYERS * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTER)  # the 7 projections: what 4-bit shrinks
    embed_head = 2 * VOCAB * HIDDEN
    lora = LAYERS * RANK * (4 * 2 * HIDDEN + 3 * (HIDDEN + INTER))
    weights = {"fp16": 2 * (proj + embed_head), "4-bit": proj * (4 + 8 / 64 + 32 / 64 / 256) / 8 + 2 * embed_head}
    lora_bytes = lora * (2 + 2)  # 16-bit weights + gradients on the GPU (fp32 master and Adam: offloaded)
    lora_adam = lora * 12  # fp32 master + two Adam moments, when not offloaded
    # saved for backward per token and layer, 16-bit: two RMSNorms (fp32 inside) ~20h, q/k/v/o/gate/up
    # inputs 2h each shared as 4h, RoPE'd q,k 4h, attention q,k,v,out 8h, MLP 8i; LoRA dropout 0.1
    # on 7 inputs adds output + mask, 3 bytes per element: 18h + 3i.
    per_token_layer = 20 * HIDDEN + 4 * HIDDEN + 4 * HIDDEN + 8 * HIDDEN + 8 * INTER + 18 * HIDDEN + 3 * INTER
    activations = {"off": per_token_layer * LAYERS * TOKENS, "on": (2 * HIDDEN * LAYERS + per_token_layer) * TOKENS}
    lines = ["| base | gradient checkpointing | weights | LoRA + grads | activations | total | + Adam on GPU |"]
    lines.append("|---|---|---|---|---|---|---|")
    for base, weight in weights.items():
        for ckpt, act in activations.items():
            total = weight + lora_bytes + act
            lines.append(
                f"| {base} | {ckpt} | {weight / GB:.1f} GB | {lora_bytes / GB:.2f} GB | {act / GB:.1f} GB "
                f"| {total / GB:.1f} GB | {(total + lora_adam) / GB:.1f} GB |"
            )
    head = f"7B: {proj / 1e9:.2f} B projection weights, {embed_head / 1e9:.2f} B embed_tokens + lm_head, "
    head += f"LoRA r={RANK} on the 7 projections: {lora / 1e6:.1f} M parameters; {per_token_layer / 1e3:.0f} KB "
    head += "of activations per token and layer"
    return head + "\n\n" + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", action="store_true", help="only print the computed 7B table")
    cli = parser.parse_args()
    if not cli.table:
        libs = libraries_only()
        when = f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores"
        lines = ["| base | stored | run | peak RSS loading | peak RSS after | whole run | vs fp32 | wall |"]
        lines.append("|---|---|---|---|---|---|---|---|")
        for hidden, layers in GEOMETRIES:
            base, rows = inputs(hidden, layers)
            size = sum(p.stat().st_size for p in base.glob("*.safetensors")) / GB
            results = {bits: run_training(bits, base, rows) for bits in (0, 4)}
            for bits, (load, after, wall) in results.items():
                name, whole = "fp32" if bits == 0 else "4-bit NF4", max(load, after)
                ratio = whole / max(results[0][:2])
                print(f"{layers} x {hidden} {name}: loading {load:.2f} GB, after {after:.2f} GB, {wall:.0f} s")
                lines.append(f"| {layers} x {hidden} | {size:.2f} GB bf16 | {name} | {load:.2f} GB | {after:.2f} GB "
                             f"| {whole:.2f} GB | {ratio:.2f}x | {wall:.0f} s |")  # fmt: skip
        loading = loading_4bit(inputs(*GEOMETRIES[0])[0])
        print(f"\n{when}; one step, batch 1; libraries alone {libs:.2f} GB\n")
        print("\n".join(lines) + "\n")
        hidden, layers = GEOMETRIES[0]
        for way, peak in loading.items():
            print(f"loading {layers} x {hidden} in 4 bits alone, {way}: peak RSS {peak:.2f} GB")
        print()
    print(table_7b())


if __name__ == "__main__":
    main()
