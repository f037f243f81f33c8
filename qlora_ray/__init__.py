"""qlora-ray: grids of QLoRA fine-tuning experiments on Ray.

Light on purpose: importing the package pulls in neither torch nor Ray.
"""

from qlora_ray.config import ConfigError, ExperimentConfig

__version__ = "0.1.0"
__all__ = ["ConfigError", "ExperimentConfig", "__version__"]
