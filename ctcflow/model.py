"""Acoustic models: each maps features (batch, frames, n_mels) to CTC log-probabilities.

- recipe:    the original notebook's network — Conv1d (kernel 10, stride 2) → two dense
             layers of 128 → unidirectional LSTM → LayerNorm/GELU/dropout → linear.
- bilstm:    a convolutional front end that subsamples time, then a bidirectional LSTM stack.
- conformer: the same front end, then Conformer blocks (Gulati et al. 2020) with rotary positions.
"""

from __future__ import annotations

import torch
from torch import nn
from torchaudio.models.conformer import _FeedForwardModule

from ctcflow.data import frame_mask

# The train.model keys each architecture is built from; any other key is ignored by it.
ARCHITECTURE_KEYS = {
    "recipe": ("hidden_size", "num_layers", "dropout"),
    "bilstm": ("hidden_size", "num_layers", "dropout", "subsample", "conv_channels"),
    "conformer": ("model_dim", "blocks", "attention_heads", "ffn_size", "conv_kernel", "dropout", "subsample"),
}
ARCHITECTURES = tuple(ARCHITECTURE_KEYS)


def conv_output_lengths(lengths: torch.Tensor, kernel: int, stride: int, padding: int) -> torch.Tensor:
    return torch.div(lengths + 2 * padding - kernel, stride, rounding_mode="floor") + 1


def reverse_within_lengths(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse each utterance's real frames; padding stays at the end."""
    t = torch.arange(x.shape[1], device=x.device)[None, :]
    index = torch.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)
    return x.gather(1, index[..., None].expand_as(x))


class BiLSTMLayer(nn.Module):
    """A bidirectional LSTM layer that never lets padding into real frames.

    Not nn.LSTM(bidirectional=True) on packed sequences: on CPU the packed backward pass is
    ~8x slower (quadratic slicing). Running the backward direction on per-utterance reversed
    input keeps the fused kernels and the exact semantics of packing.
    """

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.ahead = nn.LSTM(input_size, hidden_size, batch_first=True)
        self.back = nn.LSTM(input_size, hidden_size, batch_first=True)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        ahead = self.ahead(x)[0]
        back = reverse_within_lengths(self.back(reverse_within_lengths(x, lengths))[0], lengths)
        return torch.cat([ahead, back], dim=-1)


class RecipeModel(nn.Module):
    def __init__(self, n_mels: int, num_classes: int, hidden_size: int, num_layers: int, dropout: float):
        super().__init__()
        self.conv = nn.Conv1d(n_mels, n_mels, kernel_size=10, stride=2, padding=5)
        self.conv_out = nn.Sequential(nn.LayerNorm(n_mels), nn.GELU(), nn.Dropout(dropout))
        self.dense = nn.Sequential(
            nn.Linear(n_mels, 128), nn.LayerNorm(128), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(128, 128), nn.LayerNorm(128), nn.GELU(), nn.Dropout(dropout),
        )
        self.lstm = nn.LSTM(128, hidden_size, num_layers=num_layers, batch_first=True)
        self.head = nn.Sequential(nn.LayerNorm(hidden_size), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden_size, num_classes))

    @staticmethod
    def output_lengths(lengths: torch.Tensor) -> torch.Tensor:  # self.conv's
        return conv_output_lengths(lengths, 10, 2, 5)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.conv(feats.transpose(1, 2)).transpose(1, 2)
        lengths = self.output_lengths(lengths)
        x = self.dense(self.conv_out(x))
        x = self.lstm(x)[0]  # unidirectional: padding after the real frames cannot reach them
        return self.head(x).log_softmax(dim=-1), lengths


class Subsampler(nn.Module):
    """Two 1-D convolutions; the first strides by `factor` to shorten the sequence."""

    def __init__(self, n_mels: int, channels: int, factor: int, dropout: float):
        super().__init__()
        self.factor = factor
        self.conv1 = nn.Conv1d(n_mels, channels, kernel_size=5, stride=factor, padding=2)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size=3, padding=1)
        self.dropout = nn.Dropout(dropout)

    @staticmethod
    def output_lengths(lengths: torch.Tensor, factor: int) -> torch.Tensor:  # self.conv1's
        return conv_output_lengths(lengths, 5, factor, 2)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = self.output_lengths(lengths, self.factor)
        x = nn.functional.gelu(self.conv1(feats.transpose(1, 2)))
        # Zero the frames past each utterance so conv2 sees the same padding batched or alone.
        x = x * frame_mask(lengths, x.shape[2]).unsqueeze(1)
        x = nn.functional.gelu(self.conv2(x))
        return self.dropout(x.transpose(1, 2)), lengths


class BiLSTMModel(nn.Module):
    def __init__(self, n_mels: int, num_classes: int, hidden_size: int, num_layers: int, dropout: float,
                 subsample: int, conv_channels: int):
        super().__init__()
        self.front = Subsampler(n_mels, conv_channels, subsample, dropout)
        self.layers = nn.ModuleList(
            BiLSTMLayer(conv_channels if i == 0 else 2 * hidden_size, hidden_size) for i in range(num_layers)
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(2 * hidden_size, num_classes)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, lengths = self.front(feats, lengths)
        for layer in self.layers:
            x = self.dropout(layer(x, lengths))
        return self.head(x).log_softmax(dim=-1), lengths


def rotary_angles(frames: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, (frames, head_dim), of rotary position embedding (RoFormer, Su et al. 2021)."""
    inv_freq = 10000.0 ** -(torch.arange(0, head_dim, 2, device=device) / head_dim)
    angles = torch.arange(frames, device=device)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Turn each pair of channels (i, i + head_dim/2) of x (..., frames, head_dim) by its frame's angle."""
    first, second = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-second, first], dim=-1) * sin.to(x.dtype)


class RotarySelfAttention(nn.Module):
    """Multi-head self-attention over the real frames, with rotary positions on queries and keys.

    By hand because nn.MultiheadAttention (torchaudio's choice) has no hook for rotary positions.
    """

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, real: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, frames, dim = x.shape
        qkv = self.qkv(self.norm(x)).view(batch, frames, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        q, k = rotate(qkv[:2], cos, sin)
        # real (batch, 1, 1, frames): every query attends to its utterance's real frames only.
        x = nn.functional.scaled_dot_product_attention(
            q, k, qkv[2], attn_mask=real, dropout_p=self.dropout if self.training else 0.0)
        return self.out(x.transpose(1, 2).reshape(batch, frames, dim))


class MaskedConvModule(nn.Module):
    """The Conformer convolution module with padding kept out of the depthwise convolution.

    By hand because torchaudio's convolves padded frames into real ones, and normalizes with
    BatchNorm, whose statistics mix in padding and other utterances: LayerNorm normalizes each
    frame alone.
    """

    def __init__(self, dim: int, kernel: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.pointwise_in = nn.Linear(dim, 2 * dim)
        self.depthwise = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.depthwise_norm = nn.LayerNorm(dim)
        self.pointwise_out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """real: (batch, frames, 1), True on each utterance's real frames."""
        x = nn.functional.glu(self.pointwise_in(self.norm(x)), dim=-1) * real
        x = self.depthwise(x.transpose(1, 2)).transpose(1, 2)
        x = nn.functional.silu(self.depthwise_norm(x))
        return self.dropout(self.pointwise_out(x))


class ConformerBlock(nn.Module):
    """Half feed-forward, self-attention, convolution, half feed-forward, each residual; then LayerNorm."""

    def __init__(self, dim: int, heads: int, ffn_size: int, kernel: int, dropout: float):
        super().__init__()
        self.ffn1 = _FeedForwardModule(dim, ffn_size, dropout)  # torchaudio's: per frame, so padding-safe
        self.attention = RotarySelfAttention(dim, heads, dropout)
        self.attention_dropout = nn.Dropout(dropout)
        self.conv = MaskedConvModule(dim, kernel, dropout)
        self.ffn2 = _FeedForwardModule(dim, ffn_size, dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, real: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + 0.5 * self.ffn1(x)
        x = x + self.attention_dropout(self.attention(x, real[:, None, None, :], cos, sin))
        x = x + self.conv(x, real[:, :, None])
        x = x + 0.5 * self.ffn2(x)
        return self.norm(x)


def check_conformer_shape(model_dim: int, attention_heads: int, conv_kernel: int) -> None:
    if model_dim % (2 * attention_heads):
        raise ValueError(f"model_dim {model_dim} must split into {attention_heads} heads of even width (rotary pairs)")
    if conv_kernel % 2 == 0:
        raise ValueError(f"conv_kernel {conv_kernel} must be odd, to keep every frame centred")


class ConformerModel(nn.Module):
    def __init__(self, n_mels: int, num_classes: int, model_dim: int, blocks: int, attention_heads: int,
                 ffn_size: int, conv_kernel: int, dropout: float, subsample: int):
        super().__init__()
        check_conformer_shape(model_dim, attention_heads, conv_kernel)
        self.head_dim = model_dim // attention_heads
        self.front = Subsampler(n_mels, model_dim, subsample, dropout)
        self.blocks = nn.ModuleList(
            ConformerBlock(model_dim, attention_heads, ffn_size, conv_kernel, dropout) for _ in range(blocks))
        self.head = nn.Linear(model_dim, num_classes)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, lengths = self.front(feats, lengths)
        real = frame_mask(lengths, x.shape[1])
        cos, sin = rotary_angles(x.shape[1], self.head_dim, x.device)
        for block in self.blocks:
            x = block(x, real, cos, sin)
        return self.head(x).log_softmax(dim=-1), lengths


def build_model(config: dict, n_mels: int, num_classes: int) -> nn.Module:
    """`config` is the train.model params section (a dict): every key its architecture is built from."""
    arch = config["arch"]
    if arch not in ARCHITECTURE_KEYS:
        raise ValueError(f"unknown model architecture {arch!r}; choose one of {ARCHITECTURES}")
    model_class = {"recipe": RecipeModel, "bilstm": BiLSTMModel, "conformer": ConformerModel}[arch]
    return model_class(n_mels, num_classes, **{k: config[k] for k in ARCHITECTURE_KEYS[arch]})


def output_lengths(config: dict, lengths: torch.Tensor) -> torch.Tensor:
    """The output frames that the model of `config` (the train.model params) gives for inputs of
    `lengths` frames: recipe strides time by 2, bilstm and conformer by `subsample`."""
    if config["arch"] == "recipe":
        return RecipeModel.output_lengths(lengths)
    return Subsampler.output_lengths(lengths, config["subsample"])


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def freeze(model: nn.Module, prefixes: list[str]) -> None:
    """Stop the gradients of every parameter under each prefix of its dotted name ("front",
    "layers.0", "head"): the optimizer leaves them where they started."""
    def under(name: str, prefix: str) -> bool:
        return name == prefix or name.startswith(f"{prefix}.")

    params = dict(model.named_parameters())
    for prefix in prefixes:
        if not any(under(name, prefix) for name in params):
            modules = sorted({name.rsplit(".", 1)[0] for name in params})
            raise ValueError(f"{prefix!r} names no parameter of the model; its modules: {', '.join(modules)}")
    if params and all(any(under(name, prefix) for prefix in prefixes) for name in params):
        raise ValueError(f"{', '.join(prefixes)} cover every parameter of the model: nothing would train")
    for name, param in params.items():
        if any(under(name, prefix) for prefix in prefixes):
            param.requires_grad_(False)
