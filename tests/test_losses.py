"""HSM loss (paper Eq. 10): one code path for VP / PSLD / CLD via the recipe's eps_mask."""
import pytest
import torch

from diffusers_psld import PSLDScheduler
from diffusers_psld.losses import T_MIN, hsm_loss, sample_times
from diffusers_psld.models import build_unet


def _sched(kind):
    return {"vp": lambda: PSLDScheduler(diffusion="vp"), "psld": lambda: PSLDScheduler(gamma=0.01, nu=4.01),
            "cld": lambda: PSLDScheduler(gamma=0.0, nu=4.0)}[kind]()


class Stub(torch.nn.Module):
    """Deterministic 'network': ε̂ = a·z + b (+ extra on the x half); records what it receives."""

    def __init__(self, k, c, a=0.5, b=0.1, x_extra=0.0):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(a))
        self.k, self.c, self.b, self.x_extra = k, c, b, x_extra
        self.seen = []

    def forward(self, z, t, class_labels=None):
        self.seen.append((z.dtype, t.clone(), class_labels))
        out = self.w * z + self.b
        if self.x_extra:
            out = out.clone()
            out[:, : self.c] += self.x_extra
        return out


@pytest.mark.parametrize("kind", ["vp", "psld", "cld"])
def test_loss_matches_hand_computation(kind):
    s = _sched(kind)
    k, c = s.num_components, 2
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(4, c, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(4, k * c, 4, 4, generator=g)
    t = torch.tensor([1e-5, 0.1, 0.5, 1.0], dtype=torch.float64)
    net = Stub(k, c)
    loss = hsm_loss(net, s, x0, t=t, noise=noise)
    # by hand from the recipe: z = a(t) x0 + L ε per component, prediction 0.5 z + 0.1
    kern = s.sde.hsm_kernel(t)
    eps = noise.double().reshape(4, k, c, 4, 4)
    z = torch.einsum("bij,bjcxy->bicxy", kern.chol, eps) + kern.mean_coef[:, :, None, None, None] * x0.double()[:, None]
    err = (0.5 * z + 0.1 - eps) ** 2
    mask = {"vp": [0], "psld": [0, 1], "cld": [1]}[kind]
    expected = err[:, mask].mean()
    assert torch.isclose(loss.double(), expected, rtol=1e-5, atol=1e-6), (loss, expected)
    assert torch.equal(net.seen[0][1], s.model_time(t, 4))  # the UNet sees model_time(t), a float tensor
    assert net.seen[0][0] == torch.float32


def test_cld_ignores_x_half_psld_does_not():
    for kind, same in (("cld", True), ("psld", False)):
        s = _sched(kind)
        x0, t = torch.rand(3, 1, 4, 4) * 2 - 1, torch.tensor([0.2, 0.6, 0.9], dtype=torch.float64)
        noise = torch.randn(3, 2, 4, 4)
        l1 = hsm_loss(Stub(2, 1), s, x0, t=t, noise=noise)
        l2 = hsm_loss(Stub(2, 1, x_extra=5.0), s, x0, t=t, noise=noise)
        assert torch.equal(l1, l2) == same, kind


def test_masks_from_recipe():
    assert _sched("vp").sde.eps_mask().tolist() == [True]
    assert _sched("psld").sde.eps_mask().tolist() == [True, True]
    assert _sched("cld").sde.eps_mask().tolist() == [False, True]


def test_times_and_reproducibility_and_stats():
    t = sample_times(10000, torch.Generator().manual_seed(0))
    assert t.dtype == torch.float64 and t.min() >= T_MIN and t.max() <= 1.0
    s = _sched("psld")
    unet = build_unet("tiny", 1, 2, sample_size=8)
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    l1, st = hsm_loss(unet, s, x0, generator=torch.Generator().manual_seed(1), return_stats=True)
    l2 = hsm_loss(unet, s, x0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(l1, l2) and set(st) >= {"loss_eps_x", "loss_eps_m", "t"}
    l1.backward()
    assert all(p.grad is not None for p in unet.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="channels"):
        hsm_loss(build_unet("tiny", 1, 1, sample_size=8), s, x0)
