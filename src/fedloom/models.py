"""Reference models: logistic regression, a small MLP and CNN, and the character LSTM.

Every model maps a batch of inputs to logits over classes; the character LSTM maps a batch of
character-id sequences ``(B, T)`` to logits at every position ``(B, T, V)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LogisticRegression(nn.Module):
    """Multinomial logistic regression on flattened inputs."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


class MLP(nn.Module):
    """Fully connected network with ReLU hidden layers, on flattened inputs."""

    def __init__(self, in_features: int, num_classes: int, hidden: tuple[int, ...] = (64,)):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class CNN(nn.Module):
    """Two 3x3 convolutions (ReLU, 2x2 max-pool after the second) and a linear head.

    Input ``(B, C, H, W)``; sized for small images such as the 8x8 digits.
    """

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, channels: int = 16):
        super().__init__()
        c, h, w = in_shape
        self.features = nn.Sequential(
            nn.Conv2d(c, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(2 * channels * (h // 2) * (w // 2), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class CharLSTM(nn.Module):
    """Embedding -> LSTM (``num_layers`` x ``hidden_size``) -> linear, logits at every position.

    The LEAF Shakespeare model (Caldas et al. 2018) is ``embed_dim=8, hidden_size=256,
    num_layers=2``.
    """

    def __init__(self, vocab_size: int, embed_dim: int = 8, hidden_size: int = 128, num_layers: int = 1):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTM(embed_dim, hidden_size, num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(x))
        return self.head(out)


MODELS = ("logreg", "mlp", "cnn", "char_lstm")


def build_model(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    hidden: tuple[int, ...] = (64,),
    channels: int = 16,
    embed_dim: int = 8,
    hidden_size: int = 128,
    num_layers: int = 1,
) -> nn.Module:
    """Build one of :data:`MODELS` for inputs of ``input_shape`` (one sample, no batch axis)."""
    in_features = math.prod(input_shape)
    if name == "logreg":
        return LogisticRegression(in_features, num_classes)
    if name == "mlp":
        return MLP(in_features, num_classes, hidden)
    if name == "cnn":
        if len(input_shape) != 3:
            raise ValueError(f"cnn needs (channels, height, width) inputs, got shape {input_shape}")
        return CNN(input_shape, num_classes, channels)  # type: ignore[arg-type]
    if name == "char_lstm":
        return CharLSTM(num_classes, embed_dim, hidden_size, num_layers)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
