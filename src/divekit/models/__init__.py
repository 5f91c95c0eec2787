"""The model zoo. ``create_model(name, **kw)`` builds any registered model."""

from divekit.models.registry import (
    ModelInfo,
    create_model,
    list_models,
    model_info,
    register_model,
)

# Importing a family registers its builders.
from divekit.models import (  # noqa: E402,F401  isort: skip
    lenet,
    alexnet,
    vgg,
    nin,
    googlenet,
    resnet,
    densenet,
    rnn,
    seq2seq,
    transformer,
    ssd,
    yolo,
    centernet,
    rcnn,
    bert,
    fcn,
)

__all__ = ["ModelInfo", "create_model", "list_models", "model_info", "register_model"]
