"""Generation throughput of test.py's batched greedy decoding: eval_batch_size 16 vs 1, plain vs constrained.

    python bench/eval_throughput.py
    python bench/eval_throughput.py --rows 64 --hidden_size 128 --max_new_tokens 32
    python bench/eval_throughput.py --batch_sizes 16 --repeats 3     # only plain vs constrained at 16

Same tiny random model (real 49954-token Alpaca tokenizer), same 64 MSRA prompts, same
settings; only the batch size changes. A random model rarely says </s>, so every row
generates max_new_tokens tokens in the plain runs. The constrained runs (ner_constraint.py, at
the largest batch size) may stop earlier, so time per generation step is compared too.
Runs alternate plain/constrained `--repeats` times; the fastest of each is reported.
Prints a Markdown block for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import LogitsProcessor, LogitsProcessorList  # noqa: E402

from dataset import build_prompt, load_data  # noqa: E402
from llama_ner.generation.generate import generate_answers  # noqa: E402
from llama_ner.generation.metrics import parse_answer  # noqa: E402
from llama_ner.generation.ner_constraint import NerConstraint, text_of_query  # noqa: E402
from llama_ner.model_loading import load_model  # noqa: E402
from llama_ner.tiny_models import make_tiny_model  # noqa: E402
from llama_ner.tokenizer import load_tokenizer  # noqa: E402


def timed(fn, *args, **kwargs) -> tuple[object, float]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


class StepCounter(LogitsProcessor):
    """Counts generation steps (one call per step and batch); changes nothing."""

    def __init__(self) -> None:
        self.steps = 0

    def __call__(self, input_ids, scores):
        self.steps += 1
        return scores


class Timed(LogitsProcessor):
    """Runs a logits processor and adds its time to `owner.seconds`."""

    def __init__(self, inner, owner) -> None:
        self.inner, self.owner = inner, owner

    def __call__(self, input_ids, scores):
        start = time.perf_counter()
        scores = self.inner(input_ids, scores)
        self.owner.seconds += time.perf_counter() - start
        return scores


class TimedConstraint:
    """A constraint whose set-up and per-step masking time is summed in `seconds`."""

    def __init__(self, constraint) -> None:
        self.constraint, self.seconds = constraint, 0.0

    def processor(self, indices, width):
        start = time.perf_counter()
        inner = self.constraint.processor(indices, width)
        self.seconds += time.perf_counter() - start
        return Timed(inner, self)

    def close(self, index, answer):
        return self.constraint.close(index, answer)


def malformed(answers: list[str]) -> int:
    return sum(parse_answer(a)[1] for a in answers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--batch_sizes", default="16,1")
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--num_hidden_layers", type=int, default=2)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--data", default=str(ROOT / "tests/data/msra_dev_instruct.txt"))
    parser.add_argument("--repeats", type=int, default=1, help="plain/constrained pairs at the largest batch size")
    args = parser.parse_args()

    rows = load_data(args.data)[: args.rows]
    prompts = [build_prompt(r["instruct"], r["query"]) for r in rows]
    with tempfile.TemporaryDirectory() as tmp:
        geometry = {"hidden_size": args.hidden_size, "num_hidden_layers": args.num_hidden_layers}
        base = make_tiny_model(Path(tmp) / "tiny", **geometry)
        tokenizer = load_tokenizer(base)
        model = load_model(base, dtype="float32", device="cpu", tokenizer=tokenizer)
    constraint = NerConstraint(tokenizer, [text_of_query(r["query"]) for r in rows])  # builds the vocab table
    generate_answers(model, tokenizer, prompts[:2], 2, 4, progress=False)  # warm-up
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    fast, slow = max(sizes), min(sizes)
    results = {}
    for batch_size in sizes:
        if batch_size == fast:
            continue
        results[batch_size] = timed(generate_answers, model, tokenizer, prompts, batch_size, args.max_new_tokens, False)
        print(f"eval_batch_size {batch_size:>3}: {results[batch_size][1]:.1f}s", flush=True)
    plain, constrained = [], []
    for _ in range(max(1, args.repeats)):
        counter = StepCounter()
        settings = {"logits_processor": LogitsProcessorList([counter])}
        answers, seconds = timed(
            generate_answers, model, tokenizer, prompts, fast, args.max_new_tokens, False, **settings
        )
        plain.append((seconds, counter.steps, answers))
        counter, clocked = StepCounter(), TimedConstraint(constraint)
        settings = {"logits_processor": LogitsProcessorList([counter]), "constraint": clocked}
        answers, seconds = timed(
            generate_answers, model, tokenizer, prompts, fast, args.max_new_tokens, False, **settings
        )
        constrained.append((seconds, counter.steps, answers, clocked.seconds))
        print(
            f"eval_batch_size {fast:>3}: plain {plain[-1][0]:.1f}s, constrained {seconds:.1f}s "
            f"(of which the constraint {clocked.seconds:.2f}s)",
            flush=True,
        )
    best_plain, best_constrained = min(plain), min(constrained)
    results[fast] = (best_plain[2], best_plain[0])

    same = results[fast][0] == results[slow][0]
    speedup = results[slow][1] / results[fast][1]
    print()
    print(f"`python bench/eval_throughput.py` on {date.today()}, {platform.machine()} CPU, {os.cpu_count()} cores,")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads. Tiny LLaMA: {args.num_hidden_layers} layers,")
    print(f"hidden {args.hidden_size}, 49954-token vocab; {len(prompts)} MSRA prompts, greedy, ")
    print(f"max_new_tokens {args.max_new_tokens} (a random model rarely stops early).")
    print()
    print("| eval_batch_size | rows/s | seconds |")
    print("|---:|---:|---:|")
    for batch_size in sizes:
        seconds = results[batch_size][1]
        print(f"| {batch_size} | {len(prompts) / seconds:.2f} | {seconds:.1f} |")
    print()
    if slow != fast:
        print(f"Batch {fast} is {speedup:.1f}x faster than batch {slow}; outputs identical: {'yes' if same else 'NO'}.")
    print()
    print(f"Constrained decoding at eval_batch_size {fast} (fastest of {len(plain)} alternating runs each):")
    print()
    print("| decoding | seconds | generation steps | ms per step | malformed lines |")
    print("|---|---:|---:|---:|---:|")
    for name, (seconds, steps, answers, *_) in (("plain", best_plain), ("constrained", best_constrained)):
        print(f"| {name} | {seconds:.1f} | {steps} | {1000 * seconds / steps:.1f} | {malformed(answers)} |")
    per_step = (best_constrained[0] / best_constrained[1]) / (best_plain[0] / best_plain[1])
    own = [c[3] for c in constrained]
    print()
    print(f"Constrained / plain: {best_constrained[0] / best_plain[0]:.2f}x the time, {per_step:.2f}x per step.")
    print(
        f"Time inside the constraint (set-up + masking, summed over batches): {min(own):.2f}-{max(own):.2f}s "
        f"per run, {1000 * min(own) / best_constrained[1]:.1f} ms per step at best; that is "
        f"{min(own) / best_plain[0]:.1%} of the fastest plain run."
    )
    runs = ", ".join(f"{p[0]:.1f}/{c[0]:.1f}s" for p, c in zip(plain, constrained, strict=True))
    print(f"Every run, plain/constrained: {runs}")


if __name__ == "__main__":
    main()
