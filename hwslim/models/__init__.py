"""The model zoo. Importing this package registers every model."""
from hwslim.models.registry import create_model, list_models, register_model  # noqa: F401
from hwslim.models import mnasnet, mobilenet_v1, mobilenet_v2, resnet  # noqa: F401  (registration)

__all__ = ["create_model", "list_models", "register_model"]
