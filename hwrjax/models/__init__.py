"""The networks, chosen by name (`create_model(config.model, num_classes)`), and their layers."""

from hwrjax.models.networks import MLP, ConvNet, ResNet, create_model

__all__ = ["MLP", "ConvNet", "ResNet", "create_model"]
