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


# ---------------------------------------------------------------------------- prediction_type
from diffusers_psld import parameterization as _P  # noqa: E402
from diffusers_psld.exact import GaussianMixture  # noqa: E402

_DATA = GaussianMixture([0.4, 0.6], [[-0.8, 0.3], [0.6, -0.2]], [[[0.06, 0.02], [0.02, 0.05]], [[0.09, 0.0], [0.0, 0.03]]])


class _PerSample(torch.nn.Module):
    """A 'network' whose output for sample b is ``fn(z_b, t_b)`` with the true float64 time; records its input."""

    def __init__(self, fn, times):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(1.0))
        self.fn, self.times, self.seen = fn, times, []

    def forward(self, z, t, class_labels=None):
        self.seen.append(z.detach().clone())
        b = z.shape[0]
        flat = z.double().reshape(b, -1)
        out = torch.cat([self.fn(flat[i:i + 1], float(self.times[i])) for i in range(b)])
        return (self.w * out.float()).reshape(b, -1, *z.shape[2:])


def _exact(kind, sde):
    def fn(z, t):
        eps = _DATA.eps(sde, z, t)
        if kind == "epsilon":
            return eps
        kern = sde.hsm_kernel(t)
        return _P.output_maps(kind, kern.mean_coef, kern.chol).from_eps(eps, z)
    return fn


@pytest.mark.parametrize("kind", ["vp", "psld", "cld"])
@pytest.mark.parametrize("snr_gamma", [None, 5.0])
def test_loss_identity_on_exact_gaussian_mixture_inputs(kind, snr_gamma):
    """With the exact posterior quantities, the three parameterizations give the same HSM loss (the Bayes risk of
    the paper's ε-loss), sample by sample; a perturbation of the C-channel output raises it by exactly
    λ(t)·δ², and for any output f the C-channel loss equals the paper's ε-loss of its lift."""
    k = _sched(kind).num_components
    g = torch.Generator().manual_seed(0)
    n = 8
    x0 = _DATA.sample(n, g).float().reshape(n, 2, 1, 1)
    noise = torch.randn(n, k * 2, 1, 1, generator=g)
    # (not below 1e-3: a float32 x̂₀ output carries ε-equivalent rounding √λ·6e-8, 1e-3 relative for CLD at t = 1e-4)
    t = torch.tensor([1e-3, 3e-3, 0.01, 0.05, 0.2, 0.4, 0.7, 1.0], dtype=torch.float64)
    losses = {}
    for ptype in ("epsilon", "sample", "sufficient_epsilon"):
        s = {"vp": lambda: PSLDScheduler(diffusion="vp", prediction_type=ptype),
             "psld": lambda: PSLDScheduler(prediction_type=ptype),
             "cld": lambda: PSLDScheduler(gamma=0.0, nu=4.0, prediction_type=ptype)}[kind]()
        per = [hsm_loss(_PerSample(_exact(ptype, s.sde), t[i:i + 1]), s, x0[i:i + 1], t=t[i:i + 1], noise=noise[i:i + 1],
                        snr_gamma=snr_gamma).item() for i in range(n)]
        losses[ptype] = torch.tensor(per, dtype=torch.float64)
    torch.testing.assert_close(losses["sample"], losses["epsilon"], rtol=2e-4, atol=1e-6)
    torch.testing.assert_close(losses["sufficient_epsilon"], losses["epsilon"], rtol=2e-4, atol=1e-6)
    assert losses["epsilon"].max() > 1e-3  # not trivially zero


@pytest.mark.parametrize("kind", ["vp", "psld", "cld"])
@pytest.mark.parametrize("ptype", ["sample", "sufficient_epsilon"])
def test_c_channel_loss_equals_paper_loss_of_the_lift(kind, ptype):
    s_c = {"vp": lambda: PSLDScheduler(diffusion="vp", prediction_type=ptype), "psld": lambda: PSLDScheduler(prediction_type=ptype),
           "cld": lambda: PSLDScheduler(gamma=0.0, nu=4.0, prediction_type=ptype)}[kind]()
    s_e = PSLDScheduler.from_config(s_c.config, prediction_type="epsilon")
    k, c = s_c.num_components, 2
    g = torch.Generator().manual_seed(4)
    x0 = torch.rand(4, c, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(4, k * c, 4, 4, generator=g)
    t = torch.tensor([1e-3, 0.1, 0.5, 1.0], dtype=torch.float64)

    def f_net(z, tm, class_labels=None):  # any C-channel function of the input
        return torch.tanh(z[:, :c] * 0.7 + 0.2) + 0.3 * z[:, -c:]

    def lifted(z, tm, class_labels=None):
        return s_c.model_output_to_eps(f_net(z, tm).double(), z.double(), t).float()

    l_c = hsm_loss(f_net, s_c, x0, t=t, noise=noise)
    l_e = hsm_loss(lifted, s_e, x0, t=t, noise=noise)
    assert torch.isclose(l_c.double(), l_e.double(), rtol=1e-5), (l_c, l_e)
    with pytest.raises(ValueError, match="prediction_type"):
        hsm_loss(f_net, s_c, x0, t=t, noise=noise, prediction_type="epsilon")
    with pytest.raises(ValueError, match="output 1\\*C = 2 channels"):
        hsm_loss(lambda z, tm: torch.cat([z, z], 1), s_c, x0, t=t, noise=noise)
    with pytest.raises(ValueError, match="snr_gamma"):
        hsm_loss(f_net, s_c, x0, t=t, noise=noise, snr_gamma=0.0)


def test_training_sees_the_preconditioned_input():
    s = PSLDScheduler(prediction_type="sufficient_epsilon", input_preconditioning=True, sigma_data=0.7)
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(3, 1, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0.01, 0.3, 0.9], dtype=torch.float64)
    seen = []

    def net(z, tm, class_labels=None):
        seen.append(z)
        return z[:, :1]

    hsm_loss(net, s, x0, t=t, noise=noise)
    z = s.add_noise(x0.double(), noise.double(), t)
    torch.testing.assert_close(seen[0], s.scale_model_input(z, t).float(), rtol=0, atol=0)
    assert (seen[0] - z.float()).abs().max() > 0.1  # the input is not the raw state
