"""Tiny environments with known optima, registered on import (use as `tests.toy_envs:<Id>`)."""

import gymnasium as gym
import numpy as np


class ContextBandit(gym.Env):
    """One-step episodes. Context s ~ U[-1, 1]^2; reward 1 - ||a - a*(s)||^2 / 4 with a*(s) = center + 0.5 * s.

    The action box is deliberately not [-1, 1] (low -1, high 3 per dimension) so rescaling is exercised. The
    optimal return is 1 for every context; a uniform-random policy gets about 0.17. `render_mode="rgb_array"` draws
    the context as a 64x64 image (for --capture-video tests).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}
    center = np.array([1.5, 0.5])

    def __init__(self, render_mode=None):
        self.render_mode = render_mode
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 3.0, (2,), np.float32)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.s = self.np_random.uniform(-1, 1, 2).astype(np.float32)
        return self.s.copy(), {}

    def step(self, action):
        best = self.center + 0.5 * self.s
        reward = 1.0 - float(np.sum((np.asarray(action, dtype=np.float64) - best) ** 2)) / 4.0
        return self.s.copy(), reward, True, False, {}

    def render(self):
        frame = np.zeros((64, 64, 3), np.uint8)
        frame[..., :2] = ((self.s + 1) * 127.5).astype(np.uint8)
        return frame


class ConstantStateEnv(gym.Env):
    """Observation always 0, one action in [-1, 1]; subclasses define step."""

    def __init__(self):
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(1, np.float32), {}


class TwoModeBandit(ConstantStateEnv):
    """One-step episodes, constant observation 0, one action in [-1, 1]; reward 1 - 4 min((a - 0.5)^2, (a + 0.5)^2).

    Two equal optima at a = -0.5 and a = 0.5 (return 1) separated by a = 0 (return 0): a Boltzmann policy puts half
    its mass near each, a policy that collapsed onto one optimum scores as well but covers one mode only.
    """

    def step(self, action):
        a = float(np.asarray(action).reshape(-1)[0])
        return np.zeros(1, np.float32), 1.0 - 4.0 * min((a - 0.5) ** 2, (a + 0.5) ** 2), True, False, {}


class NoisyContextBandit(ContextBandit):
    """ContextBandit whose step draws from the env's np_random (reward noise N(0, 0.1^2)): a run resumed from a
    checkpoint continues on the same random stream only if the env's state after that draw was saved."""

    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        return obs, reward + 0.1 * float(self.np_random.normal()), terminated, truncated, info


class TruncatedBandit(ContextBandit):
    """ContextBandit whose one-step episodes end by time limit (truncated) instead of termination."""

    def step(self, action):
        obs, reward, _, _, info = super().step(action)
        return obs, reward, False, True, info


class OneStepTimeout(ConstantStateEnv):
    """Constant state, reward 1, every step *truncated* (never terminated): Q = 1 if timeouts are terminal, else
    1 / (1 - gamma)."""

    def step(self, action):
        return np.zeros(1, np.float32), 1.0, False, True, {}


class Unbounded(ContextBandit):
    """Same, with an infinite action box: scripts must refuse it."""

    def __init__(self):
        super().__init__()
        self.action_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)


gym.register("ContextBandit-v0", entry_point=ContextBandit)
gym.register("NoisyContextBandit-v0", entry_point=NoisyContextBandit)
gym.register("TwoModeBandit-v0", entry_point=TwoModeBandit)
gym.register("TruncatedBandit-v0", entry_point=TruncatedBandit)
gym.register("OneStepTimeout-v0", entry_point=OneStepTimeout)
gym.register("Unbounded-v0", entry_point=Unbounded)
