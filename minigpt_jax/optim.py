"""The optimizer: AdamW from config, with an optional schedule, clipping and decay mask.

- The defaults are the PyTorch project's `torch.optim.AdamW(lr=config.lr,
  weight_decay=0.01)`: betas (0.9, 0.999), eps 1e-8, decay on every parameter,
  constant lr. With them the update equals `optax.adamw(...)` bit for bit.
- The learning rate and weight decay are values in the optimizer state
  (`optax.inject_hyperparams`), not constants of the compiled step: optimizers
  that differ only in them are equal (`Optimizer`), so a step jitted over one
  serves all, and states can be stacked and vmapped (`with_hyperparams`). The
  effective lr is `learning_rate * lr_scale`, where `lr_scale` is the
  schedule's shape, which does not depend on lr (hence `min_lr_ratio`).
- Schedule (nanoGPT's `get_lr`, built from optax schedules): linear warmup
  `lr * (step + 1) / (warmup_steps + 1)` for `warmup_steps` steps, then either
  constant `lr` or a cosine from `lr` down to `min_lr_ratio * lr` at step
  `total_steps`. Only the cosine needs the run's length, known at run time.
- Clipping by global norm comes before Adam; 0 turns it off (PyTorch's loop
  never clipped).
- `decay_params="matrices"` decays Dense kernels only: not biases, LayerNorm
  scales, or the token and positional embeddings (the GPT-2 / nanoGPT rule).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from minigpt_jax.config import Config, ConfigError

B1, B2, EPS = 0.9, 0.999, 1e-8  # torch.optim.AdamW's defaults

global_norm = optax.tree_utils.tree_norm  # sqrt of the sum of squares over all leaves


def lr_shape(config: Config, total_steps: int | None = None) -> optax.Schedule | float:
    """The schedule divided by lr: a float 1.0 when constant without warmup, else step -> scale."""
    w = config.warmup_steps
    if config.lr_schedule == "cosine":
        if total_steps is None:
            raise ConfigError("lr_schedule='cosine': make_optimizer needs the run's total_steps")
        if not w < total_steps:
            raise ConfigError(
                f"warmup_steps={w}: must be < the run's total steps ({total_steps}) with cosine")
        # init 1/(w+1) makes optax's linear warmup nanoGPT's (step + 1) / (w + 1)
        return optax.warmup_cosine_decay_schedule(
            init_value=1.0 / (w + 1), peak_value=1.0, warmup_steps=w,
            decay_steps=total_steps, end_value=config.min_lr_ratio)
    if w == 0:
        return 1.0
    return optax.warmup_constant_schedule(init_value=1.0 / (w + 1), peak_value=1.0, warmup_steps=w)


def schedule(config: Config, total_steps: int | None = None) -> optax.Schedule:
    """step -> learning rate, the one make_optimizer applies at that step."""
    shape = lr_shape(config, total_steps)
    if callable(shape):
        return lambda step: config.lr * shape(step)
    return lambda step: config.lr * shape


def decay_mask(params) -> dict:
    """True at Dense kernels (the matrices), False at biases, LayerNorm scales and embeddings."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: getattr(path[-1], "key", None) == "kernel" and leaf.ndim >= 2, params)


def _adamw(learning_rate, weight_decay, lr_scale, *, grad_clip: float, mask):
    """AdamW at lr learning_rate * lr_scale, after clipping when grad_clip > 0."""
    tx = optax.adamw(learning_rate * lr_scale, b1=B1, b2=B2, eps=EPS,
                     weight_decay=weight_decay, mask=mask)
    return optax.chain(optax.clip_by_global_norm(grad_clip), tx) if grad_clip > 0 else tx


class Optimizer(optax.GradientTransformationExtraArgs):
    """An optax transformation equal to any other with the same update program.

    The update reads lr and weight decay from the state, so optimizers that
    differ only in them are equal: a jitted step that holds one as a static
    field (flax's TrainState.tx) is traced and compiled once for all of them.
    """

    __slots__ = ()

    def __eq__(self, other) -> bool:
        return isinstance(other, Optimizer) and self.update is other.update

    def __ne__(self, other) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash(self.update)


@functools.cache
def _program(options: Config, total_steps: int | None) -> optax.GradientTransformation:
    """The transformation of one set of options; its lr and weight decay are set by init."""
    mask = decay_mask if options.decay_params == "matrices" else None
    # static: the mask is a callable that inject_hyperparams would take for a schedule
    return optax.inject_hyperparams(_adamw, static_args=("grad_clip", "mask"))(
        learning_rate=options.lr, weight_decay=options.weight_decay,
        lr_scale=lr_shape(options, total_steps), grad_clip=options.grad_clip, mask=mask)


def with_hyperparams(opt_state, learning_rate=None, weight_decay=None):
    """The state with another lr or weight decay (scalars, or stacked arrays for vmap)."""
    hp = dict(opt_state.hyperparams)
    for name, value in (("learning_rate", learning_rate), ("weight_decay", weight_decay)):
        if value is not None:
            hp[name] = jnp.asarray(value, hp[name].dtype)
    return opt_state._replace(hyperparams=hp)


def make_optimizer(config: Config, total_steps: int | None = None) -> Optimizer:
    """AdamW as the config says; total_steps (the run's length) is needed by the cosine schedule."""
    cosine = config.lr_schedule == "cosine"
    options = Config(lr_schedule=config.lr_schedule, warmup_steps=config.warmup_steps,
                     min_lr_ratio=config.min_lr_ratio if cosine else Config.min_lr_ratio,
                     grad_clip=config.grad_clip, decay_params=config.decay_params)
    program = _program(options, total_steps if cosine else None)

    def init(params):
        return with_hyperparams(program.init(params), config.lr, config.weight_decay)

    return Optimizer(init, program.update)


def current_lr(opt_state) -> jax.Array:
    """The lr of the last update (the first step's lr before any), read from the state."""
    hp = opt_state.hyperparams
    return hp["learning_rate"] * hp["lr_scale"]
