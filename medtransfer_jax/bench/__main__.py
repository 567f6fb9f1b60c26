"""`python -m medtransfer_jax.bench <what> [flags]`: benchmarks that print a table.

  train        ResNet train step (img/s, step time, compile, MFU) vs torchvision, same run
  pipeline     grain input pipeline img/s per output size and worker count (JPEG/PNG + augment)
  device_input the train step fed from a device-resident split vs an in-memory batch
  similarity   CCA/SVCCA/PWCCA/CKA on device vs a float64 NumPy svcca-style reference
  network      two-model ResNet50 stage-wise CCA end to end on N images
  scaling      how step time and CCA time grow (batch, image size, N, neurons)
  network_scale  GPU record (#15.4): kernels at 2048 x 20k vs NumPy, the paper protocol on
               two ResNet50s end to end, a 17 x 17 block map on 10k images (+ bf16 effect)
  grid         the Revisiting grid: each target's protocol through the real loop, projected
  decode       a new process's data start (integrity check + decode), decode store off/empty/filled

Run with --helpfull for the flags of each. Bad flags: one line ``bench: error: ...``,
exit status 2. stdout is the report (title, machine, table); progress rows go to stderr
as they are measured. Logs at WARNING unless --verbosity is given (the grid's inner
training runs would log each config).
"""
from medtransfer_jax import cli as harness
from medtransfer_jax.bench import cli

if __name__ == "__main__":
    harness.run(cli.main, "bench", quiet=True, resumable=False)
