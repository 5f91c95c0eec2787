"""The model zoo. ``create_model(name, **kw)`` builds any registered model."""

from divekit.models.registry import (
    ModelInfo,
    create_model,
    list_models,
    model_info,
    register_model,
)

__all__ = ["ModelInfo", "create_model", "list_models", "model_info", "register_model"]
