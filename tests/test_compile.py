"""--compile (docs/speed.md): each compiled region (every script's sampler, the RFM scripts' posterior) is one graph
(no breaks, so that CUDA graphs can replay it) and computes what eager does to float tolerance, random draws
included; the compile set-up emits tanh in its exp form on CPU; `rfm_flow.py --compile` trains as eager does."""

import importlib

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import tests.conftest  # noqa: F401  (puts the repository on sys.path)

SCRIPTS = ["rfm_flow", "rfm_diffusion", "qvpo_baseline", "dipo_baseline"]
CPU = torch.device("cpu")


def sampler_call(name, seed=0, states=3, particles=4, obs_dim=5, act_dim=2, steps=3):
    """(script's sampler, its positional arguments) on small random inputs, networks at their default widths, chains
    of `steps` Euler / DDPM steps (a short graph compiles in seconds)."""
    m = importlib.import_module(name)
    torch.manual_seed(seed)
    obs = torch.randn(states, obs_dim)
    if name == "rfm_flow":
        actor, qf, args = m.VelocityField(obs_dim, act_dim), m.TwinQ(obs_dim, act_dim), m.Args(flow_steps=steps)
        noise = torch.randn(states, particles, act_dim)
        return m.sample_particles, (actor, qf, obs, noise, args)
    if name == "rfm_diffusion":
        actor, qf = m.NoiseNet(obs_dim, act_dim, steps), m.TwinQ(obs_dim, act_dim)
        noise, z = torch.randn(states, particles, act_dim), torch.randn(states, steps, particles, act_dim)
        return m.sample_particles, (actor, qf, obs, noise, m.Args(diffusion_steps=steps), z)
    actor = m.Denoiser(obs_dim, act_dim, steps)
    x = torch.randn(states, particles, act_dim)
    return m.ddpm_sample, (actor, obs, x, torch.randn(steps, states, particles, act_dim))


@pytest.mark.parametrize("name", SCRIPTS)
def test_sampler_has_no_graph_breaks(name):
    """The whole sampler (every Euler / DDPM step and the min-Q scoring) is one graph: no host syncs or Python-side
    data dependence, which is what CUDA graphs (--compile on a GPU) need."""
    fn, inputs = sampler_call(name)
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(fn)(*inputs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_sampler_equals_eager():
    """rfm_flow's sampler through the script's own compile set-up (decomposed tanh on CPU) against eager: latents
    and min-Q scores agree to float32 tolerance."""
    m = importlib.import_module("rfm_flow")
    fn, inputs = sampler_call("rfm_flow")
    torch._dynamo.reset()
    with torch.no_grad():
        y, q = fn(*inputs)
        y_c, q_c = m.compiled(fn, CPU)(*inputs)
    torch.testing.assert_close(y_c, y, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(q_c, q, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", SCRIPTS[:3])
def test_sampler_in_state_chunks_equals_whole(name):
    """The CPU chunking of the sampler over states (the script's __main__ on CPU) is the same function: 7 states in
    chunks of 3 (the last one short) give the whole call's outputs, the per-step noise split along its states."""
    m = importlib.import_module(name)
    fn, inputs = sampler_call(name, states=7)
    with torch.no_grad():
        whole, chunked = fn(*inputs), m.in_state_chunks(fn, 3)(*inputs)
    whole, chunked = (whole, chunked) if isinstance(whole, tuple) else ((whole,), (chunked,))
    assert len(chunked) == len(whole)
    for a, b in zip(chunked, whole):  # float rounding only; the DDPM chain's 1/alpha amplifies it to ~1e-4
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", SCRIPTS[:2])
def test_posterior_in_state_chunks_equals_whole(name, monkeypatch):
    """The same for the RFM posterior estimator: with the same proposals (torch.randn handing out rows of one draw in
    order), 7 states in chunks of 3 give the whole call's estimate and diagnostics."""
    m = importlib.import_module(name)
    torch.manual_seed(0)
    states, act_dim, obs_dim, args = 7, 2, 5, m.Args()
    obs, x, t = torch.randn(states, obs_dim), torch.randn(states, act_dim), torch.rand(states, 1) * 0.8 + 0.1
    path = (t,) if name == "rfm_flow" else (t.sqrt(), (1 - t).sqrt())  # flow time, or VP alpha and sigma
    fn = m.posterior_mean if name == "rfm_flow" else m.posterior_noise
    inputs = (m.TwinQ(obs_dim, act_dim).min_q, obs, x, *path)
    options = dict(num_samples=16, temperature=args.temperature, estimator="stein", cv_ridge=args.cv_ridge,
                   cv_clip=args.cv_clip)  # fmt: skip
    pool, handed = torch.randn(states, 16, act_dim), [0]

    def proposals(n, *shape, **kwargs):
        handed[0] += n
        return pool[handed[0] - n : handed[0]].clone()

    monkeypatch.setattr(torch, "randn", proposals)
    whole = fn(*inputs, **options)
    handed[0] = 0
    chunked = m.in_state_chunks(fn, 3)(*inputs, **options)
    assert handed[0] == states and chunked[1].keys() == whole[1].keys()
    torch.testing.assert_close(chunked[0], whole[0], rtol=1e-5, atol=1e-5)
    for key in whole[1]:
        torch.testing.assert_close(chunked[1][key], whole[1][key], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", SCRIPTS[1:])
def test_compiled_sampler_equals_eager_other_scripts(name):
    """The same for rfm_diffusion's particle sampler and the baselines' DDPM chain (slow: a compile each)."""
    m = importlib.import_module(name)
    fn, inputs = sampler_call(name)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = fn(*inputs)
        comp = m.compiled(fn, CPU)(*inputs)
    torch.testing.assert_close(comp, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", SCRIPTS)
def test_compile_setup_emits_tanh_in_exp_form_on_cpu(name):
    """Inductor's CPU tanh is the cost of the tanh-form GELU (docs/speed.md); the set-up has it emitted as
    2 / (1 + exp(-2x)) - 1, which must stay exact at float tolerance, saturate to +-1 and keep NaN."""
    m = importlib.import_module(name)
    x = torch.cat([torch.linspace(-30, 30, 1001), torch.tensor([-1e4, 1e4, 1e-8, -1e-8, 0.0, float("nan")])])
    torch._dynamo.reset()
    out, (code,) = run_and_get_code(m.compiled(torch.tanh, CPU), x)
    assert ".tanh()" not in code and "std::tanh" not in code and ".exp()" in code
    torch.testing.assert_close(out, torch.tanh(x), rtol=0, atol=2e-7, equal_nan=True)


def posterior_call(name, seed=0, states=3, samples=8, obs_dim=5, act_dim=2):
    """(script's posterior estimator, its arguments, the seed its draws start from): the plug-in (Stein) estimator,
    which needs ∇Q, with a TwinQ at its default sizes."""
    m = importlib.import_module(name)
    torch.manual_seed(seed)
    qf, args = m.TwinQ(obs_dim, act_dim), m.Args()
    obs, y_t, t = torch.randn(states, obs_dim), torch.randn(states, act_dim), torch.rand(states, 1) * 0.8 + 0.1
    if name == "rfm_flow":
        return m.posterior_mean, (qf.min_q, obs, y_t, t, samples, args.temperature, "stein", args.cv_ridge, args.cv_clip)
    alpha, sigma = t.sqrt(), (1 - t).sqrt()  # a point of a variance-preserving schedule
    return m.posterior_noise, (qf.min_q, obs, y_t, alpha, sigma, samples, args.temperature, "stein", args.cv_ridge,
                               args.cv_clip)


@pytest.mark.parametrize("name", ["rfm_flow", pytest.param("rfm_diffusion", marks=pytest.mark.slow)])
def test_compiled_posterior_is_one_graph_and_equals_eager(name):
    """The posterior as --compile runs it: Q, ∇Q (torch.autograd.grad) and the weights in one graph, its K draws from
    torch's generator as in eager, so that from one seed the estimate and diagnostics agree to float tolerance."""
    m = importlib.import_module(name)
    fn, inputs = posterior_call(name)
    torch._dynamo.reset()
    compiled_fn = m.compiled(fn, CPU)
    explanation = torch._dynamo.explain(fn)(*inputs)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    torch.manual_seed(1)
    estimate, info = fn(*inputs)
    torch.manual_seed(1)
    estimate_c, info_c = compiled_fn(*inputs)
    torch.testing.assert_close(estimate_c, estimate, rtol=1e-4, atol=1e-4)
    for k in info:
        torch.testing.assert_close(info_c[k], info[k], rtol=1e-4, atol=1e-4)


def test_rfm_flow_compile_end_to_end_matches_eager(run):
    """`rfm_flow.py --compile` (the sampler and the rebound posterior compiled in __main__) trains on the bandit, and
    from one seed its first logged losses equal the eager run's to float tolerance."""
    from tests.conftest import BANDIT, read_scalars

    flags = ["--env-id", BANDIT, "--total-timesteps", 101, "--learning-starts", 100, "--batch-size", 16,
             "--num-particles", 4, "--num-posterior-samples", 8, "--flow-steps", 2, "--eval-every", 1000,
             "--eval-episodes", 1]  # fmt: skip
    losses = {}
    for mode in ["eager", "compile"]:
        proc, run_dir = run("rfm_flow.py", *flags, *(["--compile"] if mode == "compile" else []))
        assert proc.returncode == 0, proc.stderr[-3000:]
        losses[mode] = {k: v for k, v in read_scalars(run_dir).items() if k.startswith(("losses/", "rfm/"))}
        for p in run_dir.parent.iterdir():  # the next run's dir is then the only one
            p.rename(run_dir.parent.parent / f"{mode}_{p.name}")
    assert losses["compile"].keys() == losses["eager"].keys() and "rfm/ess" in losses["eager"]
    for k, series in losses["eager"].items():
        assert series[0][0] == 100
        assert losses["compile"][k][0][1] == pytest.approx(series[0][1], rel=1e-3, abs=1e-5), k
