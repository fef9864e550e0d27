"""mlx-hermes' converter: the Hugging Face checkpoint to MLX quantized weights.

Installed as `mlx_hermes_convert` (there is no top-level `convert` module);
it uses the runtime's model and loader, never the other way round.
"""

from .converter import convert, format_size
from .report import format_report, quality_report

__all__ = ["convert", "format_report", "format_size", "quality_report"]
