"""serve.py's FastAPI app, its request batcher and its page (web/index.html). Imports generation and below."""
