"""Small in-memory datasets shared by the tests."""
import torch


class Images(torch.utils.data.Dataset):
    def __init__(self, n, seed, classes=3):
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(classes, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])
