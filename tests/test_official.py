"""Equivalence with the authors' code: the official networks' weights are copied into this repository's modules, both
sides get the same random draws, and the outputs are compared.

The equivalence tests are marked `official`; each is skipped, with the reason, unless its checkout is named and its
packages import:
    RFM_OFFICIAL=/path/to/ReverseFlowMatching   (azizanlab/ReverseFlowMatching 7e6410a; JAX 0.6.2, Flax 0.10.7,
                                                 Optax 0.2.6)
    QVPO_OFFICIAL=/path/to/qvpo                 (wadx2019/qvpo 40a1974; PyTorch)
    DIPO_OFFICIAL=/path/to/DIPO                 (BellmanTimeHut/DIPO c6d8d1b; PyTorch)
    python -m pytest -m official -v -s          (-s prints the measured differences)
Set-up and measured figures: benchmark/official/README.md. Nothing of the official code is copied here: its modules are
imported from the user's checkout. The last tests (unmarked, no checkout needed) check that
benchmark/official/run_official.py converts an official log into a run folder that benchmark/plot.py reads.

All comparisons run in float32 on CPU. `rel` below is max|ours - official| / max|official|; the tolerance is 1e-4
unless a comment says why the computation is more sensitive.
"""

import importlib
import inspect
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import dipo_baseline as dp
import qvpo_baseline as qv
import rfm_flow as rf
from benchmark import plot
from tests.conftest import run_script

official = pytest.mark.official  # every test below that needs an official checkout

OBS_DIM, ACT_DIM, BATCH = 6, 3, 64


# ----------------------------------------------------------------------------------------------------------------
# Adapters: the only places that know how the official parameters map onto this repository's modules and how our
# functions are called. Each says what it assumes of our code.
# ----------------------------------------------------------------------------------------------------------------


def t32(x):
    return torch.tensor(np.array(x), dtype=torch.float32)


def rfm_actor_from_flax(params):
    """Official ScoreMLP params -> rf.VelocityField. Assumes VelocityField(obs_dim, act_dim) with `inp` over the input
    [s, y, emb(t), emb(T)] (the official concatenation order), `blocks[0..1]` (residual GELU) and `out`."""
    p = params["params"]
    actor = rf.VelocityField(OBS_DIM, ACT_DIM)
    layers = [actor.inp, actor.blocks[0], actor.blocks[1], actor.out]
    names = [p["Dense_0"], p["Block_0"]["Dense_0"], p["Block_1"]["Dense_0"], p["Dense_1"]]
    with torch.no_grad():
        for layer, d in zip(layers, names):
            layer.weight.copy_(t32(d["kernel"]).T)
            layer.bias.copy_(t32(d["bias"]))
    return actor


def rfm_critic_from_flax(q_params):
    """Official vmapped critic ensemble (leading member axis) -> rf.TwinQ. Assumes TwinQ(obs_dim, act_dim) with
    `members[j]` = Sequential(Linear, ReLU, Linear, ReLU, Linear) on [s, a]."""
    p = q_params["params"]
    qf = rf.TwinQ(OBS_DIM, ACT_DIM)
    names = [p["NormedLinear_0"]["Dense_0"], p["NormedLinear_1"]["Dense_0"], p["Dense_0"]]
    with torch.no_grad():
        for j, member in enumerate(qf.members):
            for layer, d in zip([member[0], member[2], member[4]], names):
                layer.weight.copy_(t32(d["kernel"][j]).T)
                layer.bias.copy_(t32(d["bias"][j]).reshape(-1))
    return qf


def rfm_actor_params(actor):
    """The actor's weights as (in, out) kernels and biases, in the order of rfm_actor_from_flax."""
    layers = [actor.inp, actor.blocks[0], actor.blocks[1], actor.out]
    return [t for layer in layers for t in (layer.weight.T, layer.bias)]


def flax_actor_params(params):
    p = params["params"]
    return [t32(d[k]) for d in [p["Dense_0"], p["Block_0"]["Dense_0"], p["Block_1"]["Dense_0"], p["Dense_1"]]
            for k in ("kernel", "bias")]  # fmt: skip


def rfm_posterior(qf, obs, y_t, t, y0, estimator, args):
    """Our posterior mean E[y1 | y_t] with the proposals' noise y0 (B, K, D) given. Assumes posterior_mean(q_fn, obs,
    y_t, t, num_samples, temperature, estimator, cv_ridge, cv_clip) draws its proposal noise with a single
    torch.randn(B, K, D) call, which is replaced here by y0."""
    with replaced(torch, "randn", lambda *size, **kw: y0.clone()):
        return rf.posterior_mean(qf.min_q, obs, y_t, t, args.num_posterior_samples, args.temperature, estimator,
                                 args.cv_ridge, args.cv_clip)  # fmt: skip


def rfm_particles(actor, qf, obs, noise, args):
    """Flow particles and their min-Q. Assumes sample_particles(actor, qf, obs, noise (B, N, D), args) -> y (B, N, D),
    q (B, N)."""
    return rf.sample_particles(actor, qf, obs, noise, args)


def rfm_eval_action(actor, qf, obs, noise, args):
    """Our evaluation action with the initial noise given. Assumes act_eval draws it as
    state_noise(obs, (N, D), seed)."""
    with replaced(rf, "state_noise", lambda *a, **kw: noise.clone()):
        return rf.act_eval(actor, qf, obs, args)


def rfm_update(batch, actor, qf, qf_target, actor_opt, q_opt, args, y1, next_y):
    """One rf.update with the resampled particles fixed: y1 at s and next_y at s' (both (B, D)). Assumes update(Batch
    (obs, actions, rewards (B,), next_obs, dones (B,)), actor, qf, qf_target, actor_optimizer, q_optimizer, args,
    sample=..., posterior=...) calls `sample` once on [obs; next_obs] and Boltzmann-picks from its (y, q): particle 0
    gets a Q so far above the others that it is picked. Returns update's diagnostics and what the posterior estimator
    was called with and returned."""
    seen = {}

    def sample(actor_, qf_, both, noise, *rest, **kw):
        y = torch.cat([y1, next_y])[:, None].repeat(1, noise.shape[1], 1)
        q = torch.full(noise.shape[:2], -1e6)
        q[:, 0] = 0.0
        return y, q

    real = rf.posterior_mean

    def recording(*a, **kw):
        bound = inspect.signature(real).bind(*a, **kw)
        out = real(*a, **kw)
        seen.update(bound.arguments, y1_hat=out[0])
        return out

    batch = rf.Batch(batch[0], batch[1], batch[2].flatten(), batch[3], batch[4].flatten())
    info = rf.update(batch, actor, qf, qf_target, actor_opt, q_opt, args, sample=sample, posterior=recording)
    return info, seen


def diffusion_from_official(model, steps):
    """Official agent.model.Model (QVPO and DIPO share it) -> our Denoiser (qv.Denoiser and dp.Denoiser are the same
    class body). Assumes Denoiser(obs_dim, act_dim, steps) with time_mlp = Sequential(Linear, Mish, Linear) after the
    sinusoid, `inp` over [x, t_emb, s] (the official order), `mid[0..1]` and `out`."""
    ours = qv.Denoiser(OBS_DIM, ACT_DIM, steps)
    pairs = [(ours.time_mlp[0], model.time_mlp[1]), (ours.time_mlp[2], model.time_mlp[3]), (ours.inp, model.layer[0]),
             (ours.mid[0], model.layer[2]), (ours.mid[1], model.layer[4]), (ours.out, model.layer[6])]  # fmt: skip
    with torch.no_grad():
        for a, b in pairs:
            a.weight.copy_(b.weight)
            a.bias.copy_(b.bias)
    return ours


def schedule_of(denoiser):
    """Our schedule buffers under the official names. Assumes Denoiser buffers sqrt_ac, sqrt_1m_ac, recip, recipm1,
    c1, c2, sigma (docs/baselines.md §0)."""
    return {"sqrt_alphas_cumprod": denoiser.sqrt_ac, "sqrt_one_minus_alphas_cumprod": denoiser.sqrt_1m_ac,
            "sqrt_recip_alphas_cumprod": denoiser.recip, "sqrt_recipm1_alphas_cumprod": denoiser.recipm1,
            "posterior_mean_coef1": denoiser.c1, "posterior_mean_coef2": denoiser.c2,
            "sigma": denoiser.sigma}  # fmt: skip


def twinq_from_official(critic, module=qv):
    """Official agent.model.Critic (q1_model, q2_model: Linear/Mish x3, Linear) -> our TwinQ. Assumes
    TwinQ(obs_dim, act_dim).members[j] has the same Sequential layout."""
    ours = module.TwinQ(OBS_DIM, ACT_DIM)
    with torch.no_grad():
        for member, theirs in zip(ours.members, [critic.q1_model, critic.q2_model]):
            member.load_state_dict(theirs.state_dict())
    return ours


def our_chain(denoiser, obs, x, z):
    """Our reverse DDPM chain. Assumes ddpm_sample(actor, obs (B, obs), x (B, N, D), z (T, B, N, D) or None)."""
    return qv.ddpm_sample(denoiser, obs, x, z)


def dipo_ascent(qf, obs, actions, args):
    """Our DIPO action ascent. Assumes improve_actions(qf, obs, actions, steps, lr, max_norm = ratio * act_dim)."""
    return dp.improve_actions(qf, obs, actions, args.action_gradient_steps, args.action_lr, args.ratio * ACT_DIM)[0]


# ----------------------------------------------------------------------------------------------------------------
# Loading the official code
# ----------------------------------------------------------------------------------------------------------------


class replaced:
    """Context manager: obj.name = value inside, restored after."""

    def __init__(self, obj, name, value):
        self.obj, self.name, self.value = obj, name, value

    def __enter__(self):
        self.old = getattr(self.obj, self.name)
        setattr(self.obj, self.name, self.value)

    def __exit__(self, *exc):
        setattr(self.obj, self.name, self.old)


def checkout(var, what):
    root = os.environ.get(var)
    if not root:
        pytest.skip(f"{var} is not set: point it at a checkout of {what} (see benchmark/official/README.md)")
    if not Path(root).is_dir():
        pytest.skip(f"{var}={root} is not a directory")
    return str(Path(root).resolve())


def import_from(root, names):
    """Import dotted module names from a checkout. The official repositories reuse top-level package names (`agent`
    in QVPO and DIPO, `src`), so those are dropped from sys.modules afterwards; the returned modules keep working."""
    tops = {n.split(".")[0] for n in names}
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] in tops}
    sys.path.insert(0, root)
    try:
        return [importlib.import_module(n) for n in names]
    except ImportError as e:
        pytest.skip(f"cannot import the official modules from {root}: {e}")
    finally:
        sys.path.remove(root)
        for k in [k for k in sys.modules if k.split(".")[0] in tops]:
            del sys.modules[k]
        sys.modules.update(saved)


@pytest.fixture(scope="module")
def rfm_official():
    root = checkout("RFM_OFFICIAL", "azizanlab/ReverseFlowMatching at 7e6410a")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    for pkg in ("jax", "flax", "optax"):
        pytest.importorskip(pkg, reason=f"the official RFM code needs {pkg} (JAX 0.6.2, Flax 0.10.7, Optax 0.2.6)")
    agent_mod, critic_mod = import_from(root, ["src.agent.rfm", "src.agent.critic"])
    args = rf.Args()  # default flags
    critic_config = dict(state_dim=OBS_DIM, action_dim=ACT_DIM, hidden_size=256, hidden_layers=2, num_q=2,
                         discount=args.gamma, tau=args.tau, lr=args.q_lr, max_grad_norm=args.max_grad_norm)  # fmt: skip
    agent = agent_mod.RFM(
        sample_dim=ACT_DIM, state_dim=OBS_DIM, critic_config=critic_config, actor_hidden_size=256,
        actor_hidden_layers=2, actor_emb_size=128, actor_lr=args.policy_lr, actor_max_grad_norm=args.max_grad_norm,
        num_estimator_mc_samples=args.num_posterior_samples, num_integration_steps=args.flow_steps,
        batch_size=BATCH, cv_weight=0.0, cv_weight_autotune=True, cv_ridge=args.cv_ridge, cv_clip=args.cv_clip,
        rfm_on_policy=True, init_temperature=args.temperature, final_temperature=args.temperature,
        num_particles_training=args.num_particles, num_particles_data=args.num_particles,
        num_particles_eval=args.num_particles, sampler_method="euler", t_min=args.t_min, seed=3,
    )  # fmt: skip
    return SimpleNamespace(mod=agent_mod, critic=critic_mod, agent=agent, args=args)


@pytest.fixture(scope="module")
def qvpo_official():
    root = checkout("QVPO_OFFICIAL", "wadx2019/qvpo at 40a1974")
    diffusion, model, q_transform = import_from(root, ["agent.diffusion", "agent.model", "agent.q_transform"])
    return SimpleNamespace(diffusion=diffusion, model=model, q_transform=q_transform)


@pytest.fixture(scope="module")
def dipo_official():
    root = checkout("DIPO_OFFICIAL", "BellmanTimeHut/DIPO at c6d8d1b")
    diffusion, model, dipo, memory = import_from(
        root, ["agent.diffusion", "agent.model", "agent.DiPo", "agent.replay_memory"])
    return SimpleNamespace(diffusion=diffusion, model=model, dipo=dipo, memory=memory)


def report(name, ours, theirs):
    """Max abs and relative difference (printed; see -s), returned as rel."""
    ours, theirs = t32(ours).double(), t32(theirs).double()
    assert ours.shape == theirs.shape, (name, ours.shape, theirs.shape)
    diff = (ours - theirs).abs().max().item()
    rel = diff / max(theirs.abs().max().item(), 1e-30)
    print(f"\n[official] {name}: max abs {diff:.3g}, rel {rel:.3g}")
    return rel


def draws(seed):
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------------------------------------------------
# RFM (JAX/Flax) vs rfm_flow.py
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rfm_pair(rfm_official):
    """Our actor and critic holding the official ones' weights, and a batch of states."""
    o = rfm_official
    return SimpleNamespace(actor=rfm_actor_from_flax(o.agent.net_params),
                           qf=rfm_critic_from_flax(o.agent.critic.Q_online_params),
                           obs=draws(0).standard_normal((BATCH, OBS_DIM)).astype(np.float32))  # fmt: skip


@official
def test_rfm_networks(rfm_official, rfm_pair):
    """Actor velocity v(t, y, s, T) and both critic members and their min on the same inputs."""
    import jax
    import jax.numpy as jnp

    o, rng = rfm_official, draws(1)
    obs, y = rfm_pair.obs, rng.standard_normal((BATCH, ACT_DIM)).astype(np.float32)
    t = rng.uniform(0.01, 0.99, BATCH).astype(np.float32)
    temp = o.args.temperature
    theirs = o.agent.net.apply(o.agent.net_params, jnp.asarray(t), jnp.asarray(y), jnp.asarray(obs),
                               jnp.full((BATCH,), temp, dtype=jnp.float32))  # fmt: skip
    with torch.no_grad():
        ours = rfm_pair.actor(t32(obs), t32(y), t32(t)[:, None], temp)
    assert report("actor velocity", ours, theirs) < 1e-4

    a = np.tanh(y)
    q_params = o.agent.critic.Q_online_params
    q_module = o.agent.critic.Q_module
    inputs = jnp.concatenate([jnp.asarray(obs), jnp.asarray(a)], -1)
    members = [q_module.apply(jax.tree_util.tree_map(lambda x: x[j], q_params), inputs) for j in range(2)]
    q_min = o.critic.get_q_values(q_module, q_params, jnp.asarray(obs), jnp.asarray(a))
    with torch.no_grad():
        ours_q = rfm_pair.qf(t32(obs), t32(a))
        ours_min = rfm_pair.qf.min_q(t32(obs), t32(a))
    assert report("critic members", ours_q, np.stack(members)) < 1e-4
    assert report("critic min", ours_min, q_min) < 1e-4


def official_posterior(o, estimator, key, t, y_t, obs):
    """The official posterior (its own per-row keys) and the proposal noise y0 it drew, (B, K, D)."""
    import jax

    cfg = o.mod.PosteriorEstimationCfg(num_mc_samples=o.args.num_posterior_samples, cv_weight=0.0,
                                       cv_weight_autotune=estimator == "stein", t_min=o.args.t_min,
                                       ridge=o.args.cv_ridge, cv_clip=o.args.cv_clip)  # fmt: skip
    _, batch = o.mod.make_posterior_mean_fns_for_q(o.agent.critic.Q_module, cfg)
    y0_post, y1_post, stats = batch(key, o.agent.critic.Q_online_params, o.args.temperature, t, y_t, obs)
    # the official draw: one key per row, split once, the first half for y0 ~ N(0, I) of shape (K, D)
    keys = jax.random.split(key, t.shape[0])
    shape = (o.args.num_posterior_samples, y_t.shape[1])
    y0 = jax.vmap(lambda k: jax.random.normal(jax.random.split(k)[0], shape, dtype=y_t.dtype))(keys)
    return y0_post, y1_post, stats, y0


@official
@pytest.mark.parametrize("estimator", ["stein", "noise"])
def test_rfm_posterior_target(rfm_official, rfm_pair, estimator):
    """The posterior mean E[y1 | y_t] and the regression target (y1_hat - y_t) / (1 - t) from the same proposals; for
    `stein` also the plug-in lambda (the official code reports its mean over the action dims, per state)."""
    import jax
    import jax.numpy as jnp

    o, rng = rfm_official, draws(2)
    obs = rfm_pair.obs
    t = rng.uniform(o.args.t_min, 1 - o.args.t_min, BATCH).astype(np.float32)
    y_t = rng.standard_normal((BATCH, ACT_DIM)).astype(np.float32)
    y0_post, y1_post, stats, y0 = official_posterior(o, estimator, jax.random.PRNGKey(7), jnp.asarray(t),
                                                     jnp.asarray(y_t), jnp.asarray(obs))  # fmt: skip
    ess = np.asarray(stats[1])
    assert 1.5 < ess.mean() < 0.9 * o.args.num_posterior_samples, ess.mean()  # a non-degenerate target
    y1_hat, info = rfm_posterior(rfm_pair.qf, t32(obs), t32(y_t), t32(t)[:, None], t32(y0), estimator, o.args)
    target = (y1_hat - t32(y_t)) / (1 - t32(t)[:, None])
    assert report(f"{estimator}: posterior mean y1", y1_hat, y1_post) < 1e-4
    assert report(f"{estimator}: target velocity", target, np.asarray(y1_post) - np.asarray(y0_post)) < 1e-4
    assert report(f"{estimator}: ESS", info["ess"], ess) < 1e-4
    if estimator == "stein":
        lam = np.asarray(stats[0])
        assert np.abs(lam).max() > 0.05  # lambda is not trivially 0 here
        assert report("stein: plug-in lambda (mean over dims)", info["cv_weight"].mean(1), lam) < 1e-4


@official
def test_rfm_eval_action(rfm_official, rfm_pair):
    """The evaluation action (argmax-Q particle after the Euler ODE) from the same initial noise."""
    import jax
    import jax.numpy as jnp

    o = rfm_official
    n, key = o.args.num_particles, jax.random.PRNGKey(11)
    obs = rfm_pair.obs
    theirs = o.agent._sample_actions_flow_argmax_fn(o.agent.net_params, o.agent.critic.Q_online_params, key,
                                                    jnp.asarray(obs), o.args.temperature, num_particles=n,
                                                    method="euler")  # fmt: skip
    noise = np.asarray(jax.random.normal(key, (BATCH * n, ACT_DIM), dtype=jnp.float32)).reshape(BATCH, n, ACT_DIM)
    with torch.no_grad():
        ours = rfm_eval_action(rfm_pair.actor, rfm_pair.qf, t32(obs), t32(noise), o.args)
    assert report("evaluation action", ours, theirs) < 1e-4


@official
def test_rfm_boltzmann_resampling(rfm_official, rfm_pair):
    """Behaviour/TD resampling: one particle per state ~ softmax_n(Q_n / T). The official draw (jax categorical) and
    ours
    (Gumbel-max) use different random streams, so they are compared statistically: for each state the rank of the
    picked particle's Q, against the ranks' expected counts from the softmax probabilities (chi-square, both sides)."""
    import jax
    import jax.numpy as jnp
    from scipy import stats

    o, rows, n = rfm_official, 1500, rfm_official.args.num_particles
    obs = np.repeat(rfm_pair.obs[:15], rows // 15, 0)
    key = jax.random.PRNGKey(5)
    y_sel, _ = o.agent._sample_latent_actions_flow_fn(o.agent.net_params, o.agent.critic.Q_online_params, key,
                                                      jnp.asarray(obs), o.args.temperature, num_particles=n,
                                                      method="euler")  # fmt: skip
    key_init, _ = jax.random.split(key)
    noise = np.asarray(jax.random.normal(key_init, (rows * n, ACT_DIM), dtype=jnp.float32)).reshape(rows, n, ACT_DIM)
    with torch.no_grad():
        y, q = rfm_particles(rfm_pair.actor, rfm_pair.qf, t32(obs), t32(noise), o.args)
        torch.manual_seed(0)
        ours_sel = rf.boltzmann_pick(y, q, o.args.temperature)
    pick_theirs = (y - t32(y_sel)[:, None]).abs().amax(-1).argmin(1)
    pick_ours = (y - ours_sel[:, None]).abs().amax(-1).argmin(1)
    assert (y - t32(y_sel)[:, None]).abs().amax(-1).min(1).values.max() < 1e-4  # the official pick is one of ours

    p = torch.softmax(q.double() / o.args.temperature, 1)
    order = q.argsort(1, descending=True)
    p_ranked = p.gather(1, order)  # p of the best, second best, ...
    assert p_ranked[:, 0].mean() < 0.8  # not a near-argmax: the temperature matters here
    expected = p_ranked.sum(0).numpy()
    cut = int(np.argmax(np.cumsum(expected[::-1])[::-1] < 10)) or n  # pool the tail ranks into one bin of >= 10
    bins = np.append(expected[:cut - 1], expected[cut - 1:].sum())
    for name, pick in [("official", pick_theirs), ("ours", pick_ours)]:
        rank = (order == pick[:, None]).float().argmax(1).numpy()
        counts = np.bincount(np.minimum(rank, cut - 1), minlength=cut)
        pval = stats.chisquare(counts, bins).pvalue
        print(f"\n[official] Boltzmann resampling, {name}: chi-square p = {pval:.3g} over {cut} rank bins")
        assert pval > 1e-3, (name, counts, bins)


UPDATES = 2  # from the second Adam step on, the step depends on the gradient's scale, so the clip shows


@pytest.fixture
def rfm_update_pair(rfm_official, rfm_pair):
    """UPDATES of our updates on one batch with large rewards (so that the critic clip at max_grad_norm binds) and
    fixed resampled particles."""
    rng = draws(3)
    b = SimpleNamespace(
        obs=rfm_pair.obs, actions=np.tanh(rng.standard_normal((BATCH, ACT_DIM))).astype(np.float32),
        rewards=(30 * rng.standard_normal(BATCH)).astype(np.float32),
        next_obs=rng.standard_normal((BATCH, OBS_DIM)).astype(np.float32),
        dones=(rng.uniform(size=BATCH) < 0.2).astype(np.float32), y1=rng.standard_normal((BATCH, ACT_DIM)),
        next_y=rng.standard_normal((BATCH, ACT_DIM)))  # fmt: skip
    actor = rfm_actor_from_flax(rfm_official.agent.net_params)
    qf = rfm_critic_from_flax(rfm_official.agent.critic.Q_online_params)
    qf_target = rfm_critic_from_flax(rfm_official.agent.critic.Q_target_params)
    args = rfm_official.args
    actor_opt = torch.optim.Adam(actor.parameters(), lr=args.policy_lr)
    q_opt = torch.optim.Adam(qf.parameters(), lr=args.q_lr)
    batch = tuple(t32(x) for x in [b.obs, b.actions, b.rewards[:, None], b.next_obs, b.dones[:, None]])
    torch.manual_seed(0)
    steps = [rfm_update(batch, actor, qf, qf_target, actor_opt, q_opt, args, t32(b.y1), t32(b.next_y))
             for _ in range(UPDATES)]  # fmt: skip
    return SimpleNamespace(b=b, actor=actor, qf=qf, qf_target=qf_target, steps=steps)


def flat(params):
    return torch.cat([p.detach().flatten() for p in params])


def assert_steps_match(ours, theirs, before, step):
    """New weights agree to 1e-4 of the largest step, plus the float32 rounding of each weight (2 ulp: at |w| ~ 0.5
    one ulp is 6e-8, 1e-4 of a 6e-4 step)."""
    tol = 1e-4 * step + 2 * torch.finfo(torch.float32).eps * torch.maximum(before.abs(), theirs.abs())
    worst = ((ours - theirs).abs() / tol).max().item()
    print(f"\n[official]   worst |difference| / tolerance: {worst:.3g}")
    assert worst <= 1.0


@official
def test_rfm_critic_update(rfm_official, rfm_update_pair):
    """Critic steps: TD target with the target critic at tanh(next y), each member's own MSE and its own grad-norm
    clip (the official update is vmapped over members), Adam; the target critic's soft update after each."""
    import jax
    import jax.numpy as jnp
    import optax

    o, u = rfm_official, rfm_update_pair
    b, a = u.b, o.agent
    q_opt = optax.adam(o.args.q_lr)
    online, target, opt_state = a.critic.Q_online_params, a.critic.Q_target_params, None
    opt_state = jax.vmap(q_opt.init)(online)
    for k in range(UPDATES):
        loss, online, opt_state, grad_norm = o.critic.update_q(
            a.critic.Q_module, online, target, jnp.asarray(b.obs), jnp.asarray(b.actions), jnp.asarray(b.rewards),
            jnp.asarray(1 - b.dones), jnp.asarray(b.next_obs), jnp.tanh(jnp.asarray(b.next_y, dtype=jnp.float32)),
            q_opt, opt_state, o.args.gamma, o.args.max_grad_norm)  # fmt: skip
        target = jax.tree_util.tree_map(lambda p, t: o.args.tau * p + (1 - o.args.tau) * t, online, target)
        assert abs(float(grad_norm) - o.args.max_grad_norm) < 1e-3  # both members' gradients were clipped
        assert report(f"critic loss, update {k + 1}", u.steps[k][0]["losses/qf_loss"].detach(), loss) < 1e-5
    before = flat(rfm_critic_from_flax(a.critic.Q_online_params).parameters())
    ours, theirs = flat(u.qf.parameters()), flat(rfm_critic_from_flax(online).parameters())
    report(f"critic weights' change after {UPDATES} updates", ours - before, theirs - before)
    assert_steps_match(ours, theirs, before, UPDATES * o.args.q_lr)
    ours_t, theirs_t = flat(u.qf_target.parameters()), flat(rfm_critic_from_flax(target).parameters())
    assert report("target critic", ours_t, theirs_t) < 1e-5


@official
def test_rfm_actor_update(rfm_official, rfm_update_pair):
    """Actor steps on the same (t, y_t, target): MSE of the velocity, global grad-norm clip (it binds here), Adam. The
    targets are those our update computed (the estimator is compared in test_rfm_posterior_target). Adam divides by
    sqrt(v) + 1e-8, so weights whose gradient is ~1e-8 (a few hidden units here) move by an ill-conditioned amount
    on both sides; the change is compared where the official one is at least 0.9 learning rates per step."""
    import jax.numpy as jnp
    import optax

    o, u = rfm_official, rfm_update_pair
    opt = optax.adam(o.args.policy_lr)
    params, opt_state = o.agent.net_params, opt.init(o.agent.net_params)
    for k, (info, seen) in enumerate(u.steps):
        t, y_t = seen["t"].squeeze(1).numpy(), seen["y_t"].numpy()
        target = ((seen["y1_hat"] - seen["y_t"]) / (1 - seen["t"])).numpy()
        loss, params, opt_state, grad_norm = o.mod.update_actor_flow_matching(
            o.agent.net, params, jnp.asarray(t), jnp.asarray(y_t), jnp.asarray(u.b.obs),
            jnp.full(t.shape, o.args.temperature, dtype=jnp.float32), jnp.asarray(target), opt, opt_state,
            o.args.max_grad_norm)  # fmt: skip
        assert abs(float(grad_norm) - o.args.max_grad_norm) < 1e-3  # clipped
        assert report(f"actor loss, update {k + 1}", info["losses/actor_loss"].detach(), loss) < 1e-5
    before = flat(flax_actor_params(o.agent.net_params))
    ours, theirs = flat(rfm_actor_params(u.actor)) - before, flat(flax_actor_params(params)) - before
    kept = theirs.abs() > 0.9 * UPDATES * o.args.policy_lr
    print(f"\n[official] actor: {kept.float().mean().item():.4f} of the weights moved >= 0.9 lr per step")
    assert kept.float().mean() > 0.5
    report(f"actor weights' change after {UPDATES} updates", ours[kept], theirs[kept])
    assert_steps_match((ours + before)[kept], (theirs + before)[kept], before[kept], UPDATES * o.args.policy_lr)
    assert (ours - theirs).abs().max() <= UPDATES * o.args.policy_lr  # elsewhere: bounded by the step size


# ----------------------------------------------------------------------------------------------------------------
# QVPO and DIPO (official PyTorch) vs qvpo_baseline.py / dipo_baseline.py
# ----------------------------------------------------------------------------------------------------------------


def official_diffusion(mod, steps, noise_ratio=1.0):
    torch.manual_seed(0)
    return mod.Diffusion(OBS_DIM, ACT_DIM, noise_ratio=noise_ratio, beta_schedule="cosine", n_timesteps=steps)


@official
@pytest.mark.parametrize("which,steps", [("qvpo", 20), ("dipo", 100)])
def test_diffusion_schedule(request, which, steps):
    """The cosine schedule's coefficients (ours in float64 then cast; the official casts the betas to float32 first)."""
    off = request.getfixturevalue(f"{which}_official")
    theirs = official_diffusion(off.diffusion, steps)
    ours = schedule_of((qv if which == "qvpo" else dp).Denoiser(OBS_DIM, ACT_DIM, steps))
    theirs_sigma = (0.5 * theirs.posterior_log_variance_clipped).exp()
    for name, value in ours.items():
        ref = theirs_sigma if name == "sigma" else getattr(theirs, name)
        # relative per coefficient, as they span 1e-10 .. 1e2 (c2_0 is 0 on both sides; sigma_0 is exp(0.5 log 1e-20))
        rel = ((value.double() - ref.double()).abs() / ref.double().abs().clamp(min=1e-30)).max().item()
        print(f"\n[official] {which} T={steps} schedule {name}: max rel {rel:.3g}")
        assert rel < 1e-4, name


@official
@pytest.mark.parametrize("which,steps", [("qvpo", 20), ("dipo", 100)])
def test_diffusion_denoiser_and_chain(request, which, steps):
    """The denoiser eps_theta(x, i, s) at every step, and the full reverse chain from the same x_T, with the same
    per-step noise and with none. The float32 rounding of the coefficients (above) accumulates over the T steps."""
    off = request.getfixturevalue(f"{which}_official")
    theirs = official_diffusion(off.diffusion, steps)
    ours = diffusion_from_official(theirs.model, steps)
    rng = draws(4)
    obs = t32(rng.standard_normal((BATCH, OBS_DIM)))
    x = t32(rng.standard_normal((BATCH, ACT_DIM)))
    i = torch.as_tensor(rng.integers(0, steps, BATCH))
    with torch.no_grad():
        assert report(f"{which} denoiser", ours(x, i, obs), theirs.model(x, i, obs)) < 1e-5
        for noise_ratio in (1.0, 0.0):
            theirs.noise_ratio = noise_ratio
            torch.manual_seed(1)
            out_theirs = theirs.p_sample_loop(obs, (BATCH, ACT_DIM)).clamp(-1.0, 1.0)
            torch.manual_seed(1)  # the same stream: x_T, then one (B, D) draw per step i = T-1 .. 0
            x_T = torch.randn(BATCH, ACT_DIM)
            z = torch.stack([torch.randn(BATCH, ACT_DIM) for _ in range(steps)][::-1])  # z[i] drawn at step i
            out_ours = our_chain(ours, obs, x_T[:, None], z[:, :, None] if noise_ratio else None)[:, 0]
            rel = report(f"{which} T={steps} chain, noise {noise_ratio}", out_ours, out_theirs)
            assert rel < 1e-4


@official
def test_qvpo_advantage_weights_and_entropy_rows(qvpo_official):
    """Best-of-N under min-Q and qadv = max(q_best - mean_n q, 0) from the official sample_n and q_transform.qadv; then
    the weighted eps-loss of the policy rows (best rows weight w, uniform rows weight entropy_alpha w) under the
    official Diffusion.loss on the same rows and draws. The official code tiles the uniform rows state-major over 10
    copies of the batch, ours repeats each state; the rows are the same multiset, and the loss is their mean."""
    off, steps, n = qvpo_official, 20, 16
    theirs = official_diffusion(off.diffusion, steps)
    ours = diffusion_from_official(theirs.model, steps)
    torch.manual_seed(0)
    critic = off.model.Critic(OBS_DIM, ACT_DIM)
    qf = twinq_from_official(critic)
    obs = t32(draws(5).standard_normal((BATCH, OBS_DIM)))
    with torch.no_grad():
        torch.manual_seed(2)
        _, best_theirs, (q_best, v), _ = theirs.sample_n(obs, times=n, chosen=1, q_func=critic)
        w_theirs = off.q_transform.qadv(q_best.clone(), v=v, chosen=1, batch_size=BATCH)
        torch.manual_seed(2)  # official layout: sample k of state b is row k * B + b
        x_T = torch.randn(n, BATCH, ACT_DIM).transpose(0, 1)
        z = torch.stack([torch.randn(n, BATCH, ACT_DIM).transpose(0, 1) for _ in range(steps)][::-1])
        best, q = qv.best_of_k(ours, qf, obs, n, sample=lambda actor, o, x_, z_: our_chain(actor, o, x_T, z))
        w = qv.qadv_weight(q)
    assert report("qvpo best-of-N action", best, best_theirs) < 1e-4
    assert report("qvpo qadv weight", w, w_theirs.squeeze(1)) < 1e-4
    assert (w > 0).float().mean() > 0.9

    alpha, reps = 0.02, 10
    torch.manual_seed(3)
    rows = qv.policy_rows(obs, best, w, reps, alpha)
    assert len(rows[0]) == BATCH * (1 + reps)
    assert torch.equal(rows[1][:BATCH], best) and torch.equal(rows[2][:BATCH], w)
    extra_obs, extra_w = rows[0][BATCH:].view(BATCH, reps, -1), rows[2][BATCH:].view(BATCH, reps)
    assert torch.equal(extra_obs, obs[:, None].expand(-1, reps, -1)) and torch.allclose(extra_w, alpha * w[:, None])
    assert rows[1][BATCH:].abs().max() <= 1 and rows[1][BATCH:].std() > 0.5  # U(-1, 1) actions
    with torch.no_grad():
        torch.manual_seed(4)
        loss_theirs = theirs.loss(rows[1], rows[0], weights=rows[2][:, None])
        torch.manual_seed(4)  # the same draws: i ~ U{0..T-1} per row, then eps
        loss_ours = qv.weighted_eps_loss(ours, *rows)
    assert report("qvpo weighted eps-loss with the entropy rows", loss_ours, loss_theirs) < 1e-5


@official
def test_dipo_action_ascent_and_write_back(dipo_official):
    """DIPO's action gradient: 20 steps of a fresh Adam on -min Q (batch gradient-norm clip at ratio * act_dim, clamp
    to [-1, 1]); the official run and ours from the same memory rows give the same actions bit for bit. The official
    write-back (np.copyto onto a fancy-indexed copy) leaves the diffusion memory unchanged; so does our update without
    --write-back, and with it the improved actions are stored."""
    off = dipo_official
    args = SimpleNamespace(policy_type="Diffusion", noise_ratio=1.0, beta_schedule="cosine", n_timesteps=100,
                           diffusion_lr=3e-4, critic_lr=3e-4, action_gradient_steps=20, ratio=0.1, ac_grad_norm=2.0,
                           tau=0.005, update_actor_target_every=1, action_lr=0.03)  # fmt: skip
    space = SimpleNamespace(shape=(ACT_DIM,), high=np.ones(ACT_DIM), low=-np.ones(ACT_DIM))
    rng = draws(6)
    size = 500
    memory = off.memory.DiffusionMemory(OBS_DIM, ACT_DIM, size, "cpu")
    for s, a in zip(rng.standard_normal((size, OBS_DIM)), rng.uniform(-1, 1, (size, ACT_DIM))):
        memory.append(s, a)
    stored = memory.best_actions.copy()
    torch.manual_seed(0)
    agent = off.dipo.DiPo(args, OBS_DIM, space, None, memory, "cpu")
    np.random.seed(8)
    idx = np.random.randint(0, size, size=BATCH)  # the official sample's draw, replayed
    np.random.seed(8)
    obs_t, improved_theirs = agent.action_gradient(BATCH, None)
    assert np.array_equal(memory.best_actions, stored)  # official: nothing written back

    qf = twinq_from_official(agent.critic, dp)
    improved = dipo_ascent(qf, t32(memory.states[idx]), t32(stored[idx]), args)
    moved = (improved - t32(stored[idx])).abs().max().item()
    print(f"\n[official] dipo action ascent: max |ours - official| "
          f"{(improved - improved_theirs).abs().max().item():.3g}, actions moved up to {moved:.3g}")
    assert moved > 0.1
    assert torch.equal(improved, improved_theirs)

    # ours: the memory is left as it is unless --write-back
    ours_mem = dp.DiffusionMemory(size, OBS_DIM, ACT_DIM, "cpu")
    ours_mem.add(memory.states, memory.states, stored, np.zeros(size), np.zeros(size))
    for write_back in (False, True):
        mem = dp.DiffusionMemory(size, OBS_DIM, ACT_DIM, "cpu")
        mem.load_state_dict(ours_mem.state_dict())
        actor = dp.Denoiser(OBS_DIM, ACT_DIM, 5)
        dargs = SimpleNamespace(gamma=0.99, max_grad_norm=2.0, batch_size=BATCH, action_grad_ratio=0.1,
                                action_gradient_steps=2, action_lr=0.03, write_back=write_back, tau=0.005,
                                update_actor_target_every=1)  # fmt: skip
        batch = dp.Batch(*(t32(x) for x in [memory.states[:BATCH], stored[:BATCH], np.zeros(BATCH),
                                            memory.states[:BATCH], np.zeros(BATCH)]))  # fmt: skip
        agent = SimpleNamespace(actor=actor, actor_target=dp.Denoiser(OBS_DIM, ACT_DIM, 5), qf=qf,
                                qf_target=dp.TwinQ(OBS_DIM, ACT_DIM), actor_optimizer=torch.optim.Adam(actor.parameters()),
                                q_optimizer=torch.optim.Adam(qf.parameters()))  # fmt: skip
        before = mem.data.clone()
        dp.update(agent, batch, mem, 0, dargs)
        assert torch.equal(mem.data, before) != write_back


# ----------------------------------------------------------------------------------------------------------------
# benchmark/official/run_official.py: the official log, converted for plot.py (no official code needed)
# ----------------------------------------------------------------------------------------------------------------


def test_run_official_converts_metrics_for_plot(tmp_path):
    """Official run folders (metrics.jsonl, config.yaml) become run folders that plot.py groups as one configuration
    of rfm_official-jax on the official runs' env, with the returns at the official steps and a config.json; runs
    that differ only in where things are (here the log folder) are the same configuration."""
    returns = {0: 61.5, 1000: 120.25, 2000: 240.75}
    for seed in (2, 3):
        off = tmp_path / f"official_run_{seed}"
        off.mkdir()
        lines = [json.dumps({"step": k, "episode_length": 1000.0, "episode_reward": v + seed}) + "\n"
                 for k, v in returns.items()]  # fmt: skip
        off.joinpath("metrics.jsonl").write_text("".join(lines))
        off.joinpath("config.yaml").write_text(f"seed: {seed}\nalgo: rfm\nenv:\n  name: finger-spin\n")
        flags = ["--convert-only", off, "--runs-dir", tmp_path / "runs", "--log-dir", tmp_path / f"logs{seed}"]
        proc = run_script("benchmark/official/run_official.py", flags, tmp_path, RFM_OFFICIAL="")
        assert proc.returncode == 0, proc.stderr[-2000:]
    (group,) = plot.load_runs(tmp_path / "runs", "eval/episodic_return")
    assert (group.env, group.label, sorted(group.curves)) == ("dm_control/finger-spin-v0", "rfm_official-jax", [2, 3])
    steps, values = group.curves[2]
    assert steps.tolist() == list(returns) and np.allclose(values, [v + 2 for v in returns.values()])
    assert "--log-dir" not in plot.changed_flags(group) and "--runs-dir" not in plot.changed_flags(group)
    config = json.loads(next((tmp_path / "runs").glob("*__2__*/config.json")).read_text())
    assert set(config) == {"script", "launcher", "args", "official", "resumable", "commit", "dirty"}
    assert config["official"]["overrides"]["env.name"] == "finger-spin" and config["args"]["seed"] == 2


@pytest.mark.parametrize("flags", [["--env-id", "Hopper-v5", "--checkout", "."], ["--checkout", "/nonexistent"]])
def test_run_official_bad_input(tmp_path, flags):
    proc = run_script("benchmark/official/run_official.py", flags, tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr[-2000:]
