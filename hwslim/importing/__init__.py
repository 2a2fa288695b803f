"""Bringing the user's things in: model specs (zoo names, torchvision/timm, module:function,
graph files, checkpoints), the torch.fx and torch.export importers, weights, channel
importance for a trained start, checkpoints and datasets."""
