"""Peak memory of LoRA training on a bf16 base vs a 4-bit one (quantization_bit=4), and the 7B table.

    python bench/qlora_memory.py            # measured on the CPU at 16 x 2048, then the computed 7B table
    python bench/qlora_memory.py --table    # only the computed 7B table

Measured: train_deepspeed.py in one process with deepspeed.json switched to bf16 (ZeRO-1, Adam
offloaded as shipped), the same single batch for both runs, on a random fp16 LLaMA of hidden
2048 x 16 layers (7B's proportions at half the width, the 49954-token Chinese-Alpaca
vocabulary; made once under .bench/qlora/). Peak RSS is the child's, split at the end of model
loading (`measure`, io_utils.run_measured_phases); a process that only imports the libraries
gives the part that does not scale with the model. This parent never imports torch. The 7B table is
arithmetic from the 7B geometry, printed with its assumptions.
"""

from __future__ import annotations

import argparse
import json
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


def measure(cmd: list[str], marker: str = "trainable params:") -> tuple[float, float, float]:
    """(peak RSS while loading, peak RSS while training, wall seconds) of one training process.

    Loading reads the fp16 checkpoint through mmap, whose pages count as resident while mapped,
    so its peak says little about training: io_utils.run_measured_phases splits the peak where
    the child prints `marker` (the model is built).
    """
    # glibc keeps freed heap chunks (below its mmap threshold) for reuse: loading a 4-bit model frees
    # every 16-bit projection after quantizing it, and ~0.7 GB of that would stay resident. With a
    # fixed 4 MB threshold, big tensors are mmap'd and freed back to the system, so RSS follows them.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(4 * 2**20)}
    code, wall, (load, train), output = run_measured_phases(cmd, marker, cwd=ROOT, env=env)
    if code != 0 or marker not in output:
        raise SystemExit(f"{' '.join(cmd[:3])} failed:\n{output[-3000:]}")
    return load / GB, train / GB, wall


def inputs() -> tuple[Path, Path, Path]:
    """(model dir, one training row, bf16 deepspeed.json), made once."""
    base, rows, ds_path = WORK / "base-16x2048", WORK / "row.txt", WORK / "deepspeed_bf16.json"
    if not (base / "config.json").is_file():
        code = f"import merge_memory, pathlib; merge_memory.make_base(pathlib.Path({str(base)!r}), 16, 'alpaca')"
        subprocess.run([sys.executable, "-c", code], cwd=ROOT / "bench", check=True)
    rows.write_text((ROOT / "tests" / "data" / "msra_dev_instruct.txt").read_text("utf-8").splitlines()[0] + "\n")
    ds = json.loads((ROOT / "deepspeed.json").read_text("utf-8"))
    ds.pop("fp16", None)
    ds["bf16"] = {"enabled": True}
    ds_path.write_text(json.dumps(ds, indent=2))
    return base, rows, ds_path


def run_training(bits: int, base: Path, rows: Path, ds_path: Path) -> tuple[float, float, float]:
    cmd = [sys.executable, str(ROOT / "train_deepspeed.py"), f"model_dir={base}", f"train_path={rows}", "dev_path="]
    cmd += [f"save_dir={WORK / f'out-{bits}'}", "train_batch_size=1", "num_train_epochs=1", "save_steps=100000"]
    cmd += [f"quantization_bit={bits}", f"deepspeed_json_path={ds_path}", "learning_rate=1e-4"]
    return measure(cmd)


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
        base, rows, ds_path = inputs()
        results = {}
        for bits in (0, 4):
            results[bits] = run_training(bits, base, rows, ds_path)
            load, train, wall = results[bits]
            print(f"quantization_bit={bits}: peak RSS loading {load:.2f} GB, training {train:.2f} GB, {wall:.0f} s")
        libs = libraries_only()
        size = sum(p.stat().st_size for p in base.glob("*.safetensors")) / GB
        when = f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores"
        print(f"\n{when}; base 16 x 2048 ({size:.2f} GB fp16), batch 1; libraries alone {libs:.2f} GB\n")
        print("| base | peak RSS loading | peak RSS training | training minus libraries | vs bf16 | wall |")
        print("|---|---|---|---|---|---|")
        for bits, (load, train, wall) in results.items():
            name = "bf16" if bits == 0 else "4-bit NF4"
            ratio = (train - libs) / (results[0][1] - libs)
            print(f"| {name} | {load:.2f} GB | {train:.2f} GB | {train - libs:.2f} GB | {ratio:.2f}x | {wall:.0f} s |")
        print()
    print(table_7b())


if __name__ == "__main__":
    main()
