"""The code the root scripts share, in layers; a module imports only from its own layer or below.

    io_utils, tokenizer   base: one-line user errors, atomic writes, checksums; loading tokenizers
    weights/              weight files: formats, Meta <-> HF layout, checks, GGUF (imports only the base)
    model_loading         loading a model for training or inference (base, weights)
    training/             the trainers' shared code (base, weights, model_loading)
    generation/           generation, NER answers and their scores (base, weights, model_loading)
    serving/              serve.py's HTTP app and its batcher (generation and below)
    tiny_models           tiny random models for tests, the demo and benchmarks (any layer but serving)

The root's config_utils.py and dataset.py (the original project's names) sit beside the base:
every layer may import them, and they import only io_utils. Package modules import no torch at
import time where a script's --help must stay instant (training.train_config, generation.inference).
"""
