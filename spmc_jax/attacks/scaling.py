"""`scaling`: model replacement / boosting (Bagdasaryan et al., "How To Backdoor
Federated Learning", AISTATS 2020).

Each malicious client scales its update so that it survives averaging:

    w_mal = g + boost * (w - g).

Default boost = n / m (n clients, m attackers): under uniform FedAvg the attackers'
contribution (1/n) * sum_j boost * u_j becomes their mean update, so the new global model
is g + mean malicious update plus the (small, partly cancelling) benign contributions,
i.e. the attackers' model replaces the global one (the paper's gamma = n / eta with server
rate eta = 1, shared by the m attackers). Compose it after a data attack: `base+scaling`.
"""

from __future__ import annotations

from spmc_jax.attacks import register
from spmc_jax.attacks.base import AttackEnv, AttackSpec, ModelAttack, keep_benign, model_attack


def scaling(env: AttackEnv, *, boost: float = 0.0) -> ModelAttack:
    """Boost malicious updates by `boost`.

    Args:
      env: attack environment (`n_clients`, `num_malicious` set the default).
      boost: scale factor (> 0); 0 means n / m (n when m = 0, where it is unused).
    """
    if boost < 0:
        raise ValueError(f"scaling boost={boost} must be >= 0 (0: n/m); use sign_flip to negate")
    gamma = boost if boost > 0 else env.n_clients / max(env.num_malicious, 1)

    def apply(W, g, malicious, key):
        del key
        return keep_benign((g + gamma * (W - g)).astype(W.dtype), W, malicious)

    return model_attack(env, apply)


register(
    AttackSpec(
        "scaling",
        "model",
        scaling,
        "Model replacement: w = g + boost*(w - g), boost = n/m by default",
        paper="Bagdasaryan et al., How To Backdoor Federated Learning, AISTATS 2020",
    )
)
