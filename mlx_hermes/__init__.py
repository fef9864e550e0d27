"""mlx-hermes: Nous Hermes 2 Mixtral 8x7B on Apple Silicon, with MLX."""

__version__ = "0.1.0"

from .errors import HermesError
from .loader import load
from .model import Model, ModelArgs
from .tokenizer import Tokenizer

__all__ = ["HermesError", "Model", "ModelArgs", "Tokenizer", "load", "__version__"]
