"""Small models of the new layer kinds train with RandLoRA, and merging reproduces them (SPEC 3.10)."""

from __future__ import annotations

import torch
from torch import nn

from randlora_core import RandLoraConfig, get_randlora_model


def bar_images(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """8x8 noisy images holding a bright bar, vertical (label 1) or horizontal (label 0)."""
    images = 0.3 * torch.randn(n, 1, 8, 8, generator=generator)
    labels = torch.randint(0, 2, (n,), generator=generator)
    where = torch.randint(1, 7, (n, 1, 1), generator=generator)
    index = torch.arange(8)
    vertical = (index[None, None, :] == where).expand(n, 8, 8)
    horizontal = (index[None, :, None] == where).expand(n, 8, 8)
    images[:, 0] += torch.where(labels[:, None, None].bool(), vertical, horizontal).float()
    return images, labels


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU()
        )
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).amax(dim=(2, 3)))


def _train(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, steps: int, lr: float) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach().item())
    return losses


def test_cnn_with_conv2d_targets_trains_and_merges() -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    images, labels = bar_images(64, generator)
    base = SmallCNN()
    config = RandLoraConfig(r=2, randlora_alpha=4.0, target_modules=["features.0", "features.2"], modules_to_save=["head"])
    model = get_randlora_model(base, config)
    assert {type(m).__name__ for _, m in model.named_randlora_layers()} == {"RandLoraConv"}
    losses = _train(model, images, labels, steps=40, lr=3e-2)
    assert losses[-1] < 0.6 * losses[0], losses
    test_images, _ = bar_images(16, generator)
    model.eval()
    with torch.no_grad():
        adapted = model(test_images)
        merged = model.merge_and_unload()
        assert isinstance(merged.features[0], nn.Conv2d) and isinstance(merged.features[2], nn.Conv2d)
        torch.testing.assert_close(merged(test_images), adapted, rtol=1e-5, atol=1e-5)


class TokenModel(nn.Module):
    def __init__(self, vocab: int = 16, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.head = nn.Linear(dim, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids).mean(1))


def test_embedding_target_trains_and_merges() -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 16, (64, 5), generator=generator)
    ids[:, -1] = 0  # a padding position in every sequence
    labels = (ids[:, 0] >= 8).long()  # the first token's half of the vocabulary
    model = get_randlora_model(TokenModel(), RandLoraConfig(r=2, randlora_alpha=4.0, target_modules=["embed"]))
    pad_row = model.model.embed.base_layer.weight[0].clone()
    losses = _train(model, ids, labels, steps=40, lr=5e-2)
    assert losses[-1] < 0.6 * losses[0], losses
    with torch.no_grad():
        adapted = model(ids)
        merged = model.merge_and_unload()
        assert isinstance(merged.embed, nn.Embedding)
        torch.testing.assert_close(merged(ids), adapted, rtol=1e-5, atol=1e-6)
        assert torch.equal(merged.embed.weight[0], pad_row)  # the padding embedding is the base's
