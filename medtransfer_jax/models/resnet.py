"""ResNet family (18/34/50/101/152) in Flax Linen, matching two source architectures.

Why one module with a `layout` switch: the studies fine-tune Keras ResNet50 (ImageNet
and RadImageNet weights); many users also hold torchvision weights. The two differ in
small but output-changing ways, so converted weights only reproduce the source model
if the architecture is reproduced exactly:

=================  ====================================  ===============================
                   ``keras_v1``                          ``torchvision_v15``
=================  ====================================  ===============================
stride 2 on        first 1x1 conv of a stage's block 1   the 3x3 conv
conv bias          yes                                   no
BatchNorm eps      1.001e-5 (momentum 0.99)              1e-5 (torch m=0.1 -> flax 0.9)
stem padding       ZeroPadding2D(3) + VALID 7x7/2,       explicit (3,3) on the 7x7/2,
                   ZeroPadding2D(1) + VALID maxpool      (1,1) on the maxpool
=================  ====================================  ===============================

Parameters are flat and use the **Keras layer names** for both layouts
(``conv1_conv``, ``conv1_bn``, ``conv3_block1_0_conv`` (shortcut),
``conv3_block1_2_bn``, ..., head ``predictions``), so conversion is a name map and
per-layer analyses (filters, weight change) print names researchers already know.

Named activations: every stage/block output is *sown* into the ``activations``
collection under the Keras name (``conv1_relu``, ``conv2_block3_out``, ...,
``avg_pool``). Sowing is a no-op unless ``activations`` is mutable, so training pays
nothing; :func:`extract_activations` returns the requested ones.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

LAYOUTS = ("keras_v1", "torchvision_v15")

# depth -> (block kind, blocks per stage)
DEPTHS: Dict[int, Tuple[str, Tuple[int, ...]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}

# Per-layout constants. Momentum is in flax/Keras convention:
# running = m * running + (1 - m) * batch. torch's m=0.1 is flax's 0.9.
def _torch_linear_bias(fan_in: int):
    """torch.nn.Linear's default bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / max(fan_in, 1) ** 0.5
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype,
                                                                    -bound, bound)


# Initialisers follow each layout's framework, so a random init (the studies' random
# baseline) and every new head start as the papers' did: Keras' Conv2D and Dense default to
# glorot_uniform kernels and zero biases; torchvision's ResNet draws its convolutions
# kaiming_normal(fan_out) and keeps torch.nn.Linear's default (kaiming_uniform(a=sqrt(5)),
# i.e. U(+-1/sqrt(fan_in)), and the same bound for the bias).
#: ResNet.head: the classifier's output (see the class).
HEADS = ("softmax", "sigmoid")

_LAYOUT_CONSTANTS = {
    "keras_v1": dict(use_bias=True, bn_epsilon=1.001e-5, bn_momentum=0.99,
                     conv_init=nn.initializers.glorot_uniform(),
                     head_init=nn.initializers.glorot_uniform(),
                     head_bias_init=lambda fan_in: nn.initializers.zeros),
    "torchvision_v15": dict(use_bias=False, bn_epsilon=1e-5, bn_momentum=0.9,
                            conv_init=nn.initializers.variance_scaling(2.0, "fan_out",
                                                                       "normal"),
                            head_init=nn.initializers.variance_scaling(1 / 3, "fan_in",
                                                                       "uniform"),
                            head_bias_init=_torch_linear_bias),
}


def stage_output_names(depth: int = 50) -> Tuple[str, ...]:
    """Keras names of the five stage outputs (the Revisiting study's CCA layers)."""
    _, blocks = DEPTHS[depth]
    return ("conv1_relu",) + tuple(
        f"conv{s + 2}_block{n}_out" for s, n in enumerate(blocks))


def block_output_names(depth: int = 50) -> Tuple[str, ...]:
    """Keras names of every sown activation, input to output order."""
    _, blocks = DEPTHS[depth]
    names = ["conv1_relu", "pool1_pool"]
    for s, n in enumerate(blocks):
        names += [f"conv{s + 2}_block{b + 1}_out" for b in range(n)]
    return tuple(names + ["avg_pool"])


class ResNet(nn.Module):
    """ResNet v1 / v1.5 classifier or feature extractor.

    Attributes:
      depth: 18, 34, 50, 101 or 152.
      layout: ``keras_v1`` or ``torchvision_v15`` (see module docstring).
      num_classes: size of the ``predictions`` head; ``None`` or 0 gives no head and
        the model returns the pooled features (like Keras ``include_top=False``).
      width: channels of the stem (64 in the real model; tests use 8/16).
      dropout_rate: dropout before the head (the studies used 0.5).
      dtype: compute dtype (``jnp.bfloat16`` for mixed precision); parameters and
        BatchNorm statistics stay float32.
      bn_momentum: override the layout's BatchNorm momentum (flax convention).
      head: ``softmax`` (``num_classes`` logits) or ``sigmoid``: one logit z, returned as
        the logits [0, z] of a 2-class task, so that the softmax is [1 - sigmoid(z),
        sigmoid(z)] and its cross-entropy is Keras' binary cross-entropy (Revisiting's
        Feb-2023 ``Dense(1, activation='sigmoid')`` head).
    """

    depth: int = 50
    layout: str = "keras_v1"
    num_classes: Optional[int] = 1000
    width: int = 64
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    bn_momentum: Optional[float] = None
    head: str = "softmax"

    def _check(self):
        if self.depth not in DEPTHS:
            raise ValueError(
                f"ResNet depth={self.depth} is not supported; choose one of {sorted(DEPTHS)}.")
        if self.layout not in LAYOUTS:
            raise ValueError(
                f"ResNet layout={self.layout!r} is not supported; choose one of {LAYOUTS}.")
        if self.head not in HEADS or (self.head == "sigmoid" and self.num_classes
                                      and self.num_classes != 2):
            raise ValueError(f"ResNet head={self.head!r} with {self.num_classes} classes: "
                             f"choose one of {HEADS}; sigmoid needs a 2-class task.")

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False,
                 batch_norm_train: Optional[bool] = None) -> jax.Array:
        """Forward pass.

        Args:
          x: images, float (B, H, W, 3), already normalised for the source checkpoint.
          train: enables dropout and (by default) batch statistics in BatchNorm.
          batch_norm_train: override for BatchNorm alone. ``False`` with ``train=True``
            is the studies' frozen-base phase: BatchNorm in inference mode while the
            head trains with dropout.

        Returns:
          logits (B, num_classes), or pooled features (B, C) when there is no head.
        """
        self._check()
        consts = _LAYOUT_CONSTANTS[self.layout]
        bn_train = train if batch_norm_train is None else batch_norm_train
        momentum = self.bn_momentum if self.bn_momentum is not None else consts["bn_momentum"]
        conv = functools.partial(nn.Conv, use_bias=consts["use_bias"], dtype=self.dtype,
                                 param_dtype=jnp.float32, kernel_init=consts["conv_init"])
        norm = functools.partial(nn.BatchNorm, use_running_average=not bn_train,
                                 momentum=momentum, epsilon=consts["bn_epsilon"],
                                 dtype=self.dtype, param_dtype=jnp.float32)
        keras = self.layout == "keras_v1"
        kind, blocks = DEPTHS[self.depth]

        x = jnp.asarray(x, self.dtype)
        # Stem. Keras: ZeroPadding2D(3) then VALID; torch: padding=3. Both are (3, 3).
        x = conv(self.width, (7, 7), (2, 2), padding=((3, 3), (3, 3)), name="conv1_conv")(x)
        x = norm(name="conv1_bn")(x)
        x = nn.relu(x)
        self.sow("activations", "conv1_relu", x)
        # Zero padding (Keras) and -inf padding (torch) agree after a ReLU.
        x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        self.sow("activations", "pool1_pool", x)

        for s, n_blocks in enumerate(blocks):
            filters = self.width * 2 ** s
            for b in range(n_blocks):
                stride = 2 if (s > 0 and b == 0) else 1
                prefix = f"conv{s + 2}_block{b + 1}"
                if kind == "bottleneck":
                    x = _bottleneck(x, filters, stride, prefix, conv, norm, keras,
                                    project=(b == 0))
                else:
                    x = _basic(x, filters, stride, prefix, conv, norm,
                               project=(b == 0 and (stride != 1 or x.shape[-1] != filters)))
                self.sow("activations", f"{prefix}_out", x)

        x = jnp.mean(x, axis=(1, 2))
        self.sow("activations", "avg_pool", x)
        if not self.num_classes:
            return x
        x = nn.Dropout(self.dropout_rate, deterministic=not train, name="head_dropout")(x)
        units = 1 if self.head == "sigmoid" else self.num_classes
        x = nn.Dense(units, dtype=self.dtype, param_dtype=jnp.float32,
                     kernel_init=consts["head_init"],
                     bias_init=consts["head_bias_init"](x.shape[-1]), name="predictions")(x)
        x = jnp.asarray(x, jnp.float32)
        if self.head == "sigmoid":
            x = jnp.concatenate([jnp.zeros_like(x), x], axis=-1)   # softmax = [1 - s, s]
        return x


def _bottleneck(x, filters, stride, prefix, conv, norm, keras, project):
    """Bottleneck block; stride on the 1x1 (Keras v1) or on the 3x3 (torchvision v1.5)."""
    s1, s3 = ((stride, stride), (1, 1)) if keras else ((1, 1), (stride, stride))
    shortcut = x
    if project:
        shortcut = conv(4 * filters, (1, 1), (stride, stride), padding="VALID",
                        name=f"{prefix}_0_conv")(x)
        shortcut = norm(name=f"{prefix}_0_bn")(shortcut)
    y = conv(filters, (1, 1), s1, padding="VALID", name=f"{prefix}_1_conv")(x)
    y = nn.relu(norm(name=f"{prefix}_1_bn")(y))
    y = conv(filters, (3, 3), s3, padding=((1, 1), (1, 1)), name=f"{prefix}_2_conv")(y)
    y = nn.relu(norm(name=f"{prefix}_2_bn")(y))
    y = conv(4 * filters, (1, 1), (1, 1), padding="VALID", name=f"{prefix}_3_conv")(y)
    y = norm(name=f"{prefix}_3_bn")(y)
    return nn.relu(shortcut + y)


def _basic(x, filters, stride, prefix, conv, norm, project):
    """Basic block (ResNet18/34): two 3x3 convs, stride on the first."""
    shortcut = x
    if project:
        shortcut = conv(filters, (1, 1), (stride, stride), padding="VALID",
                        name=f"{prefix}_0_conv")(x)
        shortcut = norm(name=f"{prefix}_0_bn")(shortcut)
    y = conv(filters, (3, 3), (stride, stride), padding=((1, 1), (1, 1)),
             name=f"{prefix}_1_conv")(x)
    y = nn.relu(norm(name=f"{prefix}_1_bn")(y))
    y = conv(filters, (3, 3), (1, 1), padding=((1, 1), (1, 1)), name=f"{prefix}_2_conv")(y)
    y = norm(name=f"{prefix}_2_bn")(y)
    return nn.relu(shortcut + y)


def init_variables(model: ResNet, rng: jax.Array, image_size: int = 224) -> Dict[str, Any]:
    """Initialises ``{'params', 'batch_stats'}`` for (1, image_size, image_size, 3) inputs.

    Call it outside ``jit``/``eval_shape`` (its program carries its own compiler options,
    which JAX takes only at the top level); for shapes alone use ``jax.eval_shape`` on
    ``model.init``."""
    x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    return _jitted_init(model)(rng, x)


#: XLA options of the init program. It runs once per run, so its compile is pure start-up
#: cost: unoptimised, a ResNet18's compiles in 0.9 s instead of 3.3 s on 2 CPU cores (and
#: a ResNet50's in 2.4 s instead of 5.9 s at width 8), for the same weights up to float32
#: rounding of the initialisers' erfinv (tests/test_train_startup.py).
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


@functools.lru_cache(maxsize=8)
def _jitted_init(model: ResNet):
    """One jitted init per architecture (modules compare by their fields): the runs of a
    study re-use it instead of re-tracing a ResNet50's init per run."""
    def init(rng, x):  # drop the sown activations inside jit: XLA then skips the forward
        variables = model.init(rng, x, train=False)
        return {k: v for k, v in variables.items() if k != "activations"}

    return jax.jit(init, compiler_options=INIT_COMPILER_OPTIONS)


def random_variables(model: ResNet, seed: int) -> Dict[str, Any]:
    """He-normal NumPy weights (BN scale/var in [0.5, 1.5]) from the parameter shapes.

    Uses ``jax.eval_shape``, so nothing is compiled: ``model.init`` of a ResNet50 takes
    tens of seconds to compile on a small CPU. For benchmarks and tests that need
    distinct random networks, not for training (use :func:`init_variables`).
    """
    import numpy as np

    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                               jnp.zeros((1, 32, 32, 3))))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return rng.normal(0, np.sqrt(2.0 / fan_in), leaf.shape).astype(np.float32)
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        return rng.normal(0, 0.1, leaf.shape).astype(np.float32)  # biases, BN mean

    return {k: jax.tree_util.tree_map_with_path(fill, shapes[k])
            for k in ("params", "batch_stats")}


def extract_activations(model: ResNet, variables: Mapping[str, Any], x: jax.Array,
                        layers: Iterable[str]) -> Dict[str, jax.Array]:
    """Runs ``model`` in inference mode and returns the named activations.

    Args:
      layers: Keras-style names, e.g. :func:`stage_output_names`. Unknown names raise
        a ValueError that lists the valid ones.

    Returns:
      ``{name: array}``: conv maps are (B, h, w, C); ``avg_pool`` is (B, C); ``logits``
      (if asked for) is (B, num_classes).
    """
    layers = list(layers)
    valid = set(block_output_names(model.depth)) | {"logits"}
    unknown = [l for l in layers if l not in valid]
    if unknown:
        raise ValueError(f"Unknown layer name(s) {unknown} for ResNet{model.depth}; "
                         f"valid names: {sorted(valid)}")
    variables = {k: v for k, v in variables.items() if k != "activations"}
    logits, state = model.apply(variables, x, train=False, mutable=["activations"])
    acts = {k: v[0] for k, v in state["activations"].items()}
    acts["logits"] = logits
    return {l: acts[l] for l in layers}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What is needed to rebuild a model: stored in a checkpoint's metadata JSON."""

    depth: int = 50
    layout: str = "keras_v1"
    num_classes: Optional[int] = None
    width: int = 64
    head: str = "softmax"

    def build(self, **overrides) -> ResNet:
        kw = dict(depth=self.depth, layout=self.layout, num_classes=self.num_classes,
                  width=self.width, head=self.head)
        kw.update(overrides)
        return ResNet(**kw)
