"""Model registry: `create_model(name, **overrides)` builds any registered FaceMoE backbone."""

from trainer.models.registry import create_model, list_models, model_config, register_model

# Importing the modules registers their models.
from trainer.models import vit as _vit  # noqa: E402,F401  isort: skip
from trainer.models import swin as _swin  # noqa: E402,F401  isort: skip
from trainer.models import resnet as _resnet  # noqa: E402,F401  isort: skip
from trainer.models import sface as _sface  # noqa: E402,F401  isort: skip

__all__ = ["create_model", "list_models", "model_config", "register_model"]
