"""Mime (Karimireddy et al., 2021), "Breaking the centralized barrier for
cross-device federated learning" (arXiv 2008.03606), as FedJAX's `mime.mime`.

A base optimizer B (SGD with momentum, Adam, ...: the configured *client*
optimizer) is mimicked: its state s lives on the server and is frozen
during local training; a control variate c corrects client drift. One round,
with x the server model and the sampled clients' data D = union of D_i:

    c = (1/|D|) sum_{z in D} grad f(x; z)            # prepass: full-batch gradient at x
    for each sampled client i (in parallel):
        y_i <- x
        for each local batch b (key k shared by both gradients):
            g = grad f(y_i; b) - grad f(x; b) + c    # client_step
            y_i <- y_i + B.update(g, s, y_i)         # s frozen: B's new state is dropped
        Delta_i = y_i - x
    x <- x + eta_s * sum_i n_i Delta_i / sum_i n_i   # server_update (eta_s = server_learning_rate)
    s <- B.state_after(c, s)                         # the server's B state sees only c

With one local step per client on its whole data, y_i - x = B.update(c, s)
for every client, so Mime with eta_s = 1 is centralized B on the round's
data (tests check this for SGD with and without momentum).

As in FedJAX, the server step is plain SGD on the mean delta with
`server_learning_rate`; the configured server optimizer is not used, and
`ServerState.opt_state` holds B's state. Deviations: the prepass gradient
runs the model in evaluation mode (no dropout key; FedJAX passes one), and
it covers the examples each client trains on in its first epoch (the
pipeline's `max_examples` / `max_steps` caps apply) rather than its whole
dataset. Losses are means over scored targets, so c is the token-weighted
mean gradient for sequence models.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from fedstream.algorithms.base import Algorithm, ClientState, Contribution, Params, RoundTotal, ServerState
from fedstream.models import TrainMetrics


def safe_mean(total: Params, count: jax.Array) -> Params:
    """total / count, or zeros when count is 0."""
    return jax.tree.map(lambda t: jnp.where(count > 0, t / jnp.maximum(count, 1e-12), 0.0).astype(t.dtype), total)


def prepass_sums(prepass: Any) -> dict[str, Any]:
    """A client's prepass gradient sum and example count, summed over the round for the server's c."""
    return {"grad_sum": prepass["grad_sum"], "count": prepass["count"]}


@dataclasses.dataclass(frozen=True)
class Mime(Algorithm):
    """Mime: frozen base-optimizer state on clients plus the SVRG-style control variate c.

    Options:
      server_learning_rate: eta_s, the server's plain SGD step on the mean client delta (1 = apply it as is).
    """

    server_learning_rate: float = 1.0

    uses_prepass = True
    control_variate = True  # MimeLite: False

    @property
    def base_optimizer(self) -> optax.GradientTransformation:
        """The optimizer being mimicked: the configured client optimizer."""
        return self.client_optimizer

    def init(self, rng: jax.Array) -> ServerState:
        """Fresh params x and base-optimizer state s (in `opt_state`)."""
        params = self.model.init(rng)
        return ServerState(params, self.base_optimizer.init(params), jnp.zeros((), jnp.int32))

    def broadcast(self, state: ServerState) -> dict[str, Any]:
        """x and the frozen base-optimizer state s."""
        return {"params": state.params, "base_state": state.opt_state}

    def total_loss(self, params: Params, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """Summed loss over the batch's scored targets (evaluation mode) and their count."""
        logits = self.model.apply(params, batch[self.model.input_key])
        scores = self.model.example_scores(logits, batch[self.model.label_key])
        weights = batch["mask"].astype(jnp.float32)
        return jnp.sum(scores["loss"] * weights), jnp.sum(scores["loss_count"] * weights)

    def prepass_step(self, broadcast: Any, batch: Mapping[str, jax.Array]) -> dict[str, Any]:
        """sum_z grad f(x; z) over the batch's examples, and their count."""
        grads, count = jax.grad(self.total_loss, has_aux=True)(broadcast["params"], batch)
        return {"grad_sum": grads, "count": count}

    def after_prepass(self, broadcast: Any, total: Any) -> Any:
        """Adds c = the mean gradient at x over all sampled clients' examples."""
        if not self.control_variate:
            return broadcast
        return {**broadcast, "control": safe_mean(total["grad_sum"], total["count"])}

    def client_init(self, broadcast: Any, stored: Any = None, prepass: Any = None) -> ClientState:
        """y_i <- x, with the server's (frozen) base-optimizer state."""
        return ClientState(broadcast["params"], broadcast["base_state"])

    def client_gradient(self, params: Params, batch: Mapping[str, jax.Array], rng: jax.Array,
                        broadcast: Any) -> tuple[Params, jax.Array]:
        """Mime: grad f(y; b) - grad f(x; b) + c; MimeLite: grad f(y; b). Also the logits at y."""
        (_, logits), grads = jax.value_and_grad(self.client_loss, has_aux=True)(params, batch, rng, broadcast)
        if self.control_variate:
            at_server = jax.grad(lambda p: self.client_loss(p, batch, rng, broadcast)[0])(broadcast["params"])
            grads = jax.tree.map(lambda g, gx, c: g - gx + c, grads, at_server, broadcast["control"])
        return grads, logits

    def client_step(self, state: ClientState, batch: Mapping[str, jax.Array], rng: jax.Array,
                    broadcast: Any = None) -> tuple[ClientState, TrainMetrics]:
        """y <- y + B.update(g, s, y) with s frozen."""
        grads, logits = self.client_gradient(state.params, batch, rng, broadcast)
        updates, _ = self.base_optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return ClientState(params, state.opt_state), self.model.metrics(logits, batch[self.model.label_key],
                                                                        batch["mask"])

    def client_contribution(self, client: ClientState, broadcast: Any, weight: jax.Array, stored: Any = None,
                            prepass: Any = None, rng: jax.Array | None = None) -> tuple[Contribution, Any]:
        """Delta_i (weighted by the runner: n_i Delta_i), and the client's prepass sums (their total gives c to
        the server)."""
        delta = self.client_delta(client, broadcast["params"])
        return Contribution(weighted=delta, summed=prepass_sums(prepass)), stored

    def server_update(self, state: ServerState, total: RoundTotal, rng: jax.Array | None = None) -> ServerState:
        """x <- x + eta_s * mean Delta; s <- B's state after the gradient c."""
        mean_delta = jax.tree.map(lambda d: d / total.weight, total.weighted)
        params = jax.tree.map(lambda p, d: p + self.server_learning_rate * d, state.params, mean_delta)
        server_grad = safe_mean(total.summed["grad_sum"], total.summed["count"])
        _, opt_state = self.base_optimizer.update(server_grad, state.opt_state, state.params)
        return state.replace(params=params, opt_state=opt_state, round=state.round + 1)


def _register() -> None:
    from fedstream.algorithms import register_algorithm

    register_algorithm("mime", Mime, "Mime (Karimireddy et al. 2021): frozen server state of the client optimizer, "
                                     "control variate from a full-batch server gradient (server_learning_rate)")


_register()
