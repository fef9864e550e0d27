"""mlx-hermes: Nous Hermes 2 Mixtral 8x7B on Apple Silicon, with MLX."""

__version__ = "0.1.0"

from .batching import batch_generate, stream_batch_generate
from .chat import ChatSession
from .errors import HermesError
from .generate import Chunk, generate, stream_generate
from .loader import load
from .model import Model, ModelArgs
from .specialize import FastPaths
from .tokenizer import Tokenizer

__all__ = [
    "ChatSession",
    "Chunk",
    "FastPaths",
    "HermesError",
    "Model",
    "ModelArgs",
    "Tokenizer",
    "__version__",
    "batch_generate",
    "generate",
    "load",
    "stream_batch_generate",
    "stream_generate",
]
