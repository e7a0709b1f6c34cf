"""Wall time, peak memory and disk of the real pipeline at LLaMA-7B geometry, on random weights.

    python bench/pipeline_7b.py                    # ~60 GB free disk needed; everything deleted at the end
    python bench/pipeline_7b.py --keep             # keep .bench/7b (inputs, HF model, merged model, GGUF)
    python bench/pipeline_7b.py --cold             # inputs read from disk, not from the page cache

Builds, in a subprocess, a random original checkpoint with 7B's geometry (dim 4096, 32 layers,
32 heads, multiple_of 256, vocab 32000: one 13.5 GB consolidated.00.pth written tensor by
tensor, plus params.json and the real tokenizer.model) and two LoRAs shaped like the published
Chinese-LLaMA-Plus-7B (r=8, alpha 32, 49953 rows) and Chinese-Alpaca-Plus-7B (r=64, alpha 128,
49954 rows). Then runs the real commands, each as a child of this process (which never imports
torch: Linux carries a parent's resident size into a forked child's ru_maxrss): convert to HF,
merge both LoRAs to huggingface, merge to pth, export the merged HF model to GGUF, merge straight
to GGUF (`--steps` picks some). Per step: wall time, the child's peak RSS (io_utils.run_measured), bytes
written, load average (the box may be shared). Results: BENCHMARKS.md. Not part of the tests.
Inputs just written sit in the page cache when RAM allows; --cold drops them first (fadvise).
Outputs no later step needs are deleted as soon as they are measured, to bound the disk used.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llama_ner.io_utils import run_measured  # noqa: E402

WORK = ROOT / ".bench" / "7b"
MIN_FREE_GB = 60  # LoRAs 1.9 + HF 13.5 + merged HF 13.8 + one more 13.8 output (or the original), with margin
MIN_FREE_GB_KEEP = 90  # --keep: original, HF, and all four 13.8 GB outputs
GEOMETRY = {"dim": 4096, "n_layers": 32, "n_heads": 32, "multiple_of": 256}  # LLaMA-7B params.json
SMOKE_GEOMETRY = {"dim": 256, "n_layers": 2, "n_heads": 4, "multiple_of": 32}  # --smoke: check the script itself
STEPS = ["convert", "merge_hf", "merge_pth", "gguf", "merge_gguf"]


@dataclass
class Result:
    step: str
    command: str
    wall_s: float
    peak_rss_gb: float
    written_gb: float
    load: float  # 1-minute load average when the step ended


def dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def check_disk(work: Path, min_free_gb: float) -> None:
    """Refuse to start without room for the largest moment (what work already holds counts as room)."""
    probe = work if work.exists() else next(p for p in work.parents if p.exists())
    free = shutil.disk_usage(probe).free + (dir_bytes(work) if work.exists() else 0)
    if free < min_free_gb * 1e9:
        raise SystemExit(
            f"{probe}: only {free / 1e9:.0f} GB free, this benchmark needs {min_free_gb:.0f} GB "
            "(a 7B checkpoint is 13.5 GB and up to four copies exist at once); free some disk or pass --work_dir"
        )


def evict_from_page_cache(path: Path) -> None:
    """Flush and drop the cached pages of every file under path (only these files; no root needed),
    so the next step reads from disk as after a download, not from RAM."""
    for file in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measure(step: str, cmd: list[str], output: Path, log: Path) -> Result:
    """Run cmd as a child; its wall time, peak RSS (io_utils.run_measured), and size of output."""
    with open(log, "ab") as sink:
        sink.write(f"\n$ {' '.join(cmd)}\n".encode())
        sink.flush()
        code, wall, peak = run_measured(cmd, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)
    if code != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise SystemExit(f"{step} failed (exit {code}); end of {log}:\n{tail}")
    shown = " ".join(str(c).replace(str(ROOT) + "/", "") for c in cmd[1:])
    return Result(step, shown, wall, peak / 1024**3, dir_bytes(output) / 1e9, os.getloadavg()[0])


def make_inputs(work: Path, geometry: dict) -> None:
    """Random 7B original + the two Plus-shaped LoRAs (run in a child: it imports torch)."""
    from tqdm import tqdm

    from llama_ner.tiny_models import make_tiny_chinese_loras, make_tiny_original

    original = work / "original"
    if not (original / "7B" / "params.json").is_file():
        shutil.rmtree(original, ignore_errors=True)
        bar = lambda items: tqdm(list(items), desc="random 7B", unit="tensor")  # noqa: E731
        make_tiny_original(original, n_shards=1, progress=bar, **geometry)
    if not all((work / name / "adapter_model.bin").is_file() for name in lora_names()):
        make_tiny_chinese_loras(original, work, r_llama=8, r_alpaca=64)


def lora_names() -> list[str]:
    return ["chinese-llama-plus-lora-7b", "chinese-alpaca-plus-lora-7b"]


def python(script: str, *args: str | Path) -> list[str]:
    return [sys.executable, str(ROOT / script), *map(str, args)]


def run_steps(work: Path, steps: list[str], keep: bool, cold: bool, log: Path, results: list[Result]) -> None:
    """Run the steps in order, appending each one's Result (results so far survive a failure)."""
    original, hf, merged = work / "original", work / "7B-hf", work / "chinese-alpaca-7b"
    pth, gguf = work / "chinese-alpaca-7b-pth", work / "chinese-alpaca-7b.gguf"
    merged_gguf = work / "chinese-alpaca-7b-gguf"
    loras = ",".join(str(work / name) for name in lora_names())
    merge = ["merge_llama_with_chinese_lora.py", "--base_model", hf, "--lora_model", loras]
    commands = {
        "convert": (python("convert_llama_weights_to_hf.py", "--input_dir", original, "--model_size", "7B",
                           "--output_dir", hf), hf),
        "merge_hf": (python(*merge, "--output_type", "huggingface", "--output_dir", merged), merged),
        "merge_pth": (python(*merge, "--output_type", "pth", "--output_dir", pth), pth),
        "gguf": (python("export_gguf.py", "--model_dir", merged, "--output", gguf), gguf),
        "merge_gguf": (python(*merge, "--output_type", "gguf", "--output_dir", merged_gguf), merged_gguf),
    }  # fmt: skip
    for step in steps:
        cmd, output = commands[step]
        if output.exists():
            shutil.rmtree(output) if output.is_dir() else output.unlink()
        if cold:
            evict_from_page_cache(work)
        print(f"[{time.strftime('%H:%M:%S')}] {step} ...", flush=True)
        results.append(measure(step, cmd, output, log))
        r = results[-1]
        print(f"    {r.wall_s:.0f} s, peak RSS {r.peak_rss_gb:.2f} GB, wrote {r.written_gb:.2f} GB", flush=True)
        if not keep and step == "convert":
            shutil.rmtree(original / "7B")  # nothing later reads it: bounds the disk used
        if not keep and step in ("merge_pth", "gguf", "merge_gguf"):
            shutil.rmtree(output) if output.is_dir() else output.unlink()  # nothing later reads it


def table(results: list[Result], inputs: Result | None) -> str:
    rows = ["| step | command | wall | peak RSS | written | load avg |", "|---|---|---|---|---|---|"]
    for r in ([inputs] if inputs else []) + results:
        rows.append(
            f"| {r.step} | `{r.command}` | {r.wall_s / 60:.1f} min ({r.wall_s:.0f} s) | {r.peak_rss_gb:.2f} GB "
            f"| {r.written_gb:.2f} GB | {r.load:.1f} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default=str(WORK), help="inputs and outputs go here (default .bench/7b)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (inputs are then reused)")
    parser.add_argument("--steps", nargs="+", default=STEPS, choices=STEPS, help="which steps, in this order")
    parser.add_argument("--cold", action="store_true", help="drop the inputs from the page cache before each step")
    parser.add_argument("--make_inputs", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="a 2-layer, hidden-256 model: checks this script")
    args = parser.parse_args()
    work = Path(args.work_dir).resolve()
    if args.make_inputs:
        make_inputs(work, SMOKE_GEOMETRY if args.smoke else GEOMETRY)
        return
    check_disk(work, 1 if args.smoke else MIN_FREE_GB_KEEP if args.keep else MIN_FREE_GB)
    work.mkdir(parents=True, exist_ok=True)
    log = work.parent / f"{work.name}.log"
    started, inputs, results = time.time(), None, []
    try:
        if not (work / "original" / "7B" / "params.json").is_file():
            print(f"[{time.strftime('%H:%M:%S')}] making random 7B inputs ...", flush=True)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--work_dir", str(work), "--make_inputs"]
            cmd += ["--smoke"] if args.smoke else []
            inputs = measure("make inputs", cmd, work, log)
            inputs.command = "(random 7B original + 2 LoRAs, tiny_models.py)"
        run_steps(work, args.steps, args.keep, args.cold, log, results)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        report(results, inputs, started, log)


def report(results: list[Result], inputs: Result | None, started: float, log: Path) -> None:
    print(f"\n{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, {total_ram_gb():.0f} GB RAM; log: {log}")
    print(f"total {(time.time() - started) / 60:.1f} min\n")
    print(table(results, inputs))


def total_ram_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


if __name__ == "__main__":
    main()
