"""Weight files: tensor-at-a-time readers and writers, Meta <-> HF names and shapes, checks on a model
folder's files, and the GGUF writer. Imports only the package's base (io_utils, tokenizer)."""
