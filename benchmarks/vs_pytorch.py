"""Train-step images/s of the headline ResNet in hwrjax (JAX) and in PyTorch eager, side by side.

  pip install -e ".[bench]"        # torch==2.13.0 (a CPU build on this machine's disk)
  python benchmarks/vs_pytorch.py
  python benchmarks/vs_pytorch.py --config=resnet --batch_size=128 --repeats=7 --steps=10

Both sides train the same network on the same batch shape: the model of configs/<config>.py
(stem conv, stages of basic residual blocks with BatchNorm and projection shortcuts, global
average pooling, dense), softmax cross-entropy, SGD with Nesterov momentum and L2 weight
decay on the kernels. JAX runs hwrjax's jit-compiled `train_step` on a batch already on the
device (buffers donated); PyTorch runs forward, backward and `optimizer.step()` eagerly
with all CPU threads. The two are timed in alternation (one JAX run, one PyTorch run, ...)
so machine noise hits both alike; the figures are medians over --repeats runs of --steps
steps, and the ratio is of the medians.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time

import jax
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hwrjax import models  # noqa: E402
from hwrjax.core import losses, optim, rng, train_state  # noqa: E402
from hwrjax.core import steps as steps_lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "resnet", "Recipe under configs/ whose ResNet is measured.")
flags.DEFINE_integer("batch_size", 0, "Batch size (0 = the recipe's).")
flags.DEFINE_integer("steps", 10, "Steps per timed run.")
flags.DEFINE_integer("repeats", 7, "Timed runs per side; medians are reported.")
flags.DEFINE_string("output", "", "Optional JSON file for the figures.")


def _torch_resnet(torch, model_config, num_classes: int = 10):
    """The same architecture as hwrjax.models.ResNet (basic blocks), written in torch.nn."""
    nn = torch.nn
    if model_config.block != "basic":
        raise SystemExit("vs_pytorch: only block='basic' has a PyTorch twin here")

    class Block(nn.Module):
        def __init__(self, cin: int, width: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(width, momentum=0.1, eps=1e-5)
            self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(width, momentum=0.1, eps=1e-5)
            nn.init.zeros_(self.bn2.weight)
            self.shortcut = nn.Identity()
            if cin != width or stride != 1:
                self.shortcut = nn.Sequential(nn.Conv2d(cin, width, 1, stride, bias=False),
                                              nn.BatchNorm2d(width, momentum=0.1, eps=1e-5))

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return torch.relu(y + self.shortcut(x))

    class CropBorder(nn.Module):  # hwrjax.models.crop_border on NCHW
        def __init__(self, border: int):
            super().__init__()
            self.border = border

        def forward(self, x):
            b = self.border
            return x[:, :, b:x.shape[2] - b, b:x.shape[3] - b]

    # hwrjax.models.space_to_depth puts pixel (i, j) of each 2x2 block in channel 2*i + j (one input
    # channel), which is the order of torch's PixelUnshuffle.
    s2d = bool(model_config.get("space_to_depth", False))
    layers = [CropBorder(model_config.get("crop_border", 0))] + ([nn.PixelUnshuffle(2)] if s2d else []) + [
              nn.Conv2d(4 if s2d else 1, model_config.stem_width, 3, 1, 1, bias=False),
              nn.BatchNorm2d(model_config.stem_width), nn.ReLU()]
    cin = model_config.stem_width
    for i, (size, width) in enumerate(zip(model_config.stage_sizes, model_config.stage_widths)):
        for j in range(size):
            layers.append(Block(cin, width, 2 if i > 0 and j == 0 else 1))
            cin = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def _params(tree) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def main(argv: list[str]) -> None:
    del argv
    try:
        import torch
    except ImportError:
        sys.exit('vs_pytorch: PyTorch is not installed; run: pip install -e ".[bench]"')
    config = importlib.import_module(f"configs.{FLAGS.config}").get_config()
    if config.model.name != "resnet":
        sys.exit(f"vs_pytorch: configs/{FLAGS.config}.py is a {config.model.name}; pass a ResNet recipe")
    b = FLAGS.batch_size or config.batch_size
    data = np.random.default_rng(0)
    images = data.random((b, 28, 28, 1), np.float32)
    labels = data.integers(0, 10, b).astype(np.int32)

    # JAX: hwrjax's pure train step, jit-compiled with the state donated.
    model = models.create_model(config.model, 10, dtype=config.dtype)
    tx = optim.make_optimizer(config, optim.make_schedule(config, 100, config.num_epochs))
    keys = rng.RunKeys.from_seed(0)
    state = train_state.create_train_state(model, tx, keys.init)
    loss_fn = losses.get_loss(config.loss)
    step = jax.jit(lambda s, bt, k: steps_lib.train_step(s, bt, k, loss_fn=loss_fn), donate_argnums=(0,))
    batch = jax.device_put({"image": images, "label": labels})
    t0 = time.perf_counter()
    state, metrics = step(state, batch, keys.dropout)
    jax.block_until_ready(metrics)
    jax_compile_s = time.perf_counter() - t0
    jax_params = _params(state.params)

    # PyTorch eager, NCHW, every CPU thread.
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    net = _torch_resnet(torch, config.model)
    decay = [p for p in net.parameters() if p.ndim > 1]
    other = [p for p in net.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": config.optimizer.weight_decay},
                           {"params": other, "weight_decay": 0.0}],
                          lr=config.optimizer.learning_rate, momentum=config.optimizer.momentum,
                          nesterov=bool(config.optimizer.nesterov))
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    y = torch.from_numpy(labels.astype(np.int64))
    torch_params = sum(p.numel() for p in net.parameters())
    if torch_params != jax_params:
        sys.exit(f"vs_pytorch: the two networks differ ({jax_params} vs {torch_params} parameters)")
    net.train()

    def torch_step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        return loss

    for _ in range(2):
        torch_step()

    jax_rates, torch_rates = [], []
    for _ in range(FLAGS.repeats):
        t0 = time.perf_counter()
        for _ in range(FLAGS.steps):
            state, metrics = step(state, batch, keys.dropout)
        jax.block_until_ready(metrics)
        jax_rates.append(FLAGS.steps * b / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        for _ in range(FLAGS.steps):
            loss = torch_step()
        loss.detach().item()
        torch_rates.append(FLAGS.steps * b / (time.perf_counter() - t0))

    result = {
        "config": FLAGS.config, "batch_size": b, "params": jax_params,
        "jax": jax.__version__, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax_compile_s": jax_compile_s,
        "jax_images_per_s": float(np.median(jax_rates)), "torch_images_per_s": float(np.median(torch_rates)),
        "jax_runs": jax_rates, "torch_runs": torch_rates,
    }
    result["jax_over_torch"] = result["jax_images_per_s"] / result["torch_images_per_s"]
    print(f"configs/{FLAGS.config}.py ResNet, {jax_params:,} params, batch {b}, medians of {FLAGS.repeats} x "
          f"{FLAGS.steps} steps, alternating")
    print(f"  hwrjax (jax {jax.__version__}, XLA_FLAGS={result['xla_flags']!r}): "
          f"{result['jax_images_per_s']:.0f} img/s  (compile {jax_compile_s:.1f} s)")
    print(f"  PyTorch {torch.__version__} eager ({result['torch_threads']} threads): "
          f"{result['torch_images_per_s']:.0f} img/s")
    print(f"  ratio hwrjax / PyTorch: {result['jax_over_torch']:.2f}")
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
