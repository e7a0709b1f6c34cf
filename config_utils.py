"""Dict-based configs with command-line overrides, in the spirit of nanoGPT's configurator.

    args = ConfigParser({"lora_r": 8, "optimizer": {"adam": {"lr": 5e-3}}}).parse_main()
    args.lora_r, args.optimizer_adam_lr

Overrides come from sys.argv as `key=value`, `--key=value` or `--key value`; nested keys
are joined by `_`. A value takes the type of its default; unknown keys are rejected.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import json
import sys
import tokenize
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from llama_ner.io_utils import UserError, atomic_write_text, read_json_object

TRUE_WORDS = {"true", "1", "yes", "y", "on"}
FALSE_WORDS = {"false", "0", "no", "n", "off"}


class ConfigError(UserError):
    """A bad override or config file."""

    prefix = "config error"


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a_b": 1}."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}_{key}" if prefix else str(key)
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def infer_value(text: str) -> Any:
    """Type of a value whose default is None: a Python literal if it is one, else the string."""
    if text.lower() in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def convert_value(key: str, text: str, default: Any) -> Any:
    """Convert the command-line string `text` to the type of `default`."""
    fix = f"pass {key}=<{type(default).__name__}>"
    if default is None:
        return infer_value(text)
    if isinstance(default, bool):
        low = text.strip().lower()
        if low in TRUE_WORDS:
            return True
        if low in FALSE_WORDS:
            return False
        raise ConfigError(f"{key}={text!r} is not a bool: use true/false, 1/0 or yes/no")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r} is not an int: {fix}") from None
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r} is not a float: {fix}") from None
    if isinstance(default, (list, tuple, dict)):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            if isinstance(default, (list, tuple)):  # q_proj,v_proj is a fine way to write a list
                return type(default)(part.strip() for part in text.split(",") if part.strip())
            raise ConfigError(f"{key}={text!r} is not a {type(default).__name__} literal: {fix}") from None
        if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
            return type(default)(value)
        if not isinstance(value, type(default)):
            raise ConfigError(f"{key}={text!r} is not a {type(default).__name__}: {fix}")
        return value
    return text


def split_argv(argv: list[str]) -> list[tuple[str, str]]:
    """['a=1', '--b=2', '--c', '3'] -> [('a', '1'), ('b', '2'), ('c', '3')]."""
    pairs, i = [], 0
    while i < len(argv):
        arg = argv[i]
        body = arg[2:] if arg.startswith("--") else arg
        if "=" in body:
            key, value = body.split("=", 1)
        elif arg.startswith("--") and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            key, value = body, argv[i + 1]
            i += 1
        elif arg.startswith("--"):
            key, value = body, "true"  # a bare --flag switches a bool on
        else:
            raise ConfigError(f"cannot read argument {arg!r}: write key=value or --key=value")
        pairs.append((key.replace("-", "_"), value))  # torchrun passes --local-rank
        i += 1
    return pairs


class Config:
    """The resolved config: attributes are the flattened keys."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __repr__(self) -> str:
        return f"Config({self.__dict__!r})"


def key_comments(*sources: str | Path) -> dict[str, str]:
    """{key: meaning} from the trailing comment beside each `"key": default,  # meaning` in source files.

    The defaults dict is the documentation; --help reads it from there. A later file wins.
    """
    comments: dict[str, str] = {}
    for source in sources:
        with open(source, encoding="utf-8") as f:
            tokens = [t for t in tokenize.generate_tokens(f.readline) if t.type not in (tokenize.NL, tokenize.NEWLINE)]
        key_of_line: dict[int, str] = {}
        for token, after in zip(tokens, tokens[1:], strict=False):
            if token.type == tokenize.STRING and after.string == ":" and token.start[0] not in key_of_line:
                with contextlib.suppress(ValueError, SyntaxError):
                    key_of_line[token.start[0]] = ast.literal_eval(token.string)
            if token.type == tokenize.COMMENT and token.start[0] in key_of_line:
                comments[str(key_of_line[token.start[0]])] = token.string.lstrip("#").strip()
    return comments


def answer_help_first(parse: Callable[[], Any]) -> None:
    """Call `parse` (which prints the options and exits) when the command line asks for help.

    A script calls this before importing torch and transformers, which take seconds to load,
    so that `--help` answers at once.
    """
    if "-h" in sys.argv[1:] or "--help" in sys.argv[1:]:
        parse()


class ConfigParser:
    """Resolve a defaults dict against command-line overrides.

    `sources`: the files whose dict literals define the defaults; --help shows each key's comment.
    """

    def __init__(self, config_dict: dict, description: str = "", sources: Iterable[str | Path] = ()) -> None:
        self.defaults = flatten(config_dict)
        self.description = description
        self.sources = list(sources)

    def help_text(self) -> str:
        meanings = key_comments(*self.sources)
        lines = [self.description.strip(), "", "options (key=value, --key=value or --key value), default (type):"]
        width = max(len(k) for k in self.defaults)
        for key, value in self.defaults.items():
            kind = type(value).__name__ if value is not None else "any"
            lines.append(f"  {key:<{width}}  {value!r} ({kind})")
            if key in meanings:
                lines.append(f"  {'':<{width}}    {meanings[key]}")
        return "\n".join(lines).lstrip()

    def parse(self, argv: list[str]) -> Config:
        if "-h" in argv or "--help" in argv:
            print(self.help_text())
            raise SystemExit(0)
        values = dict(self.defaults)
        for key, text in split_argv(argv):
            if key not in self.defaults:
                close = difflib.get_close_matches(key, self.defaults, n=3, cutoff=0.6)
                hint = f"; did you mean {', '.join(close)}?" if close else "; see --help for every key"
                raise ConfigError(f"unknown key {key!r}{hint}")
            values[key] = convert_value(key, text, self.defaults[key])
        return Config(values)

    def parse_main(self, argv: list[str] | None = None) -> Config:
        return self.parse(sys.argv[1:] if argv is None else argv)


def print_config(config: Config | dict) -> None:
    values = config.to_dict() if isinstance(config, Config) else config
    width = max(len(k) for k in values)
    print("config:")
    for key, value in values.items():
        print(f"  {key:<{width}} = {value!r}")


def save_config(config: Config | dict, path: str | Path) -> None:
    """Write the resolved config as JSON (train_args.json), atomically."""
    values = config.to_dict() if isinstance(config, Config) else config
    atomic_write_text(path, json.dumps(values, ensure_ascii=False, indent=2) + "\n")


def load_config(
    path: str | Path, fix: str = "train first, or pass --train_args_path=<dir>/train_args.json"
) -> dict[str, Any]:
    """A JSON object from `path` (train_args.json, deepspeed.json); `fix` says what to do when it is missing."""
    return read_json_object(path, fix, ConfigError)


def require(config: Config, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()) -> None:
    """Numbers that cannot be right stop the run before any work: `positive` keys > 0, `non_negative` >= 0."""
    for key in positive:
        if getattr(config, key) <= 0:
            raise ConfigError(f"{key}={getattr(config, key)} must be > 0")
    for key in non_negative:
        if getattr(config, key) < 0:
            raise ConfigError(f"{key}={getattr(config, key)} must be >= 0")
