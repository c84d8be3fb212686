"""moelora: router-based mixture-of-LoRA architectures for Hugging Face causal LMs.

    import moelora
    cfg = moelora.SMoRAConfig(r=64, k=8, alpha=16)
    model = moelora.get_moelora_model(base_model, cfg)
"""

__version__ = "0.1.0"

from .errors import BaseModelError, CheckpointError, ConfigError, DataError, MoeloraError  # noqa: E402
from . import methods as _methods  # noqa: E402  (imports and registers every method module)
from .methods import *  # noqa: E402,F401,F403  (each method's config, layer and model classes, e.g. SMoRAConfig)
from .model import MoELoRAModel, get_moelora_model, load  # noqa: E402
from .generation import generate_answers  # noqa: E402  (greedy answers to chat prompts, text or with media)
from .ops import rank_activation  # noqa: E402
from .registry import METHODS, config_from_dict, get_method, register_method  # noqa: E402
from .training.parts import parameter_groups  # noqa: E402  (optimizer groups with per-part rates, for own loops)

__all__ = [
    "__version__", "MoeloraError", "ConfigError", "DataError", "CheckpointError", "BaseModelError",
    "MoELoRAModel", "get_moelora_model", "load", "generate_answers", "rank_activation",
    "METHODS", "config_from_dict", "get_method", "register_method", "parameter_groups", *_methods.__all__,
]
