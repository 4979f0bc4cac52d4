"""The process that trains one run of a grid on the devices its grid gave it.

A grid whose runs go side by side (`--devices_per_run`, `grid.Placement`) starts one of these per
run with only that run's devices visible, hands it the run on standard input (pickled: the run,
its workdir, the after-run work, the grid process's `sys.path` and `train.build`) and reads one
JSON line back on standard output ({"status": "trained" | "finished" | "busy" | "interrupted" |
"failed", ...}). Everything the run itself prints, Python's and XLA's, goes to standard error,
which the grid points at the run's `train.log`. Not a command of its own.
"""

import json
import os
import pickle
import sys
import traceback


def main():
  payload = pickle.loads(sys.stdin.buffer.read())
  for path in payload["sys_path"]:  # the modules the grid sees (a plugged-in model's, say)
    if path not in sys.path:
      sys.path.append(path)
  report = os.fdopen(os.dup(1), "w")
  os.dup2(2, 1)  # the run's own output, Python's and XLA's, into its log
  status, info = 0, {}
  try:
    # pylint: disable=g-import-not-at-top
    from absl import logging as absl_logging
    from dhmd_jax import train as train_lib
    from dhmd_jax.experiments import grid
    absl_logging.set_verbosity(absl_logging.WARNING)  # as dhmd_jax.main: orbax logs every save
    job = pickle.loads(payload["job"])
    if job["build"] is not None:
      train_lib.build = job["build"]
    _, info = grid.claim(job["kind"], job["run"], job["run_dir"], job["after_run"],
                         wait=job["wait"])
  except KeyboardInterrupt:
    status, info = 130, {"status": "interrupted", "error": "interrupted"}
  except Exception as error:  # pylint: disable=broad-except
    if type(error).__name__ == "Interrupted":  # the trainer stopped at a safe point
      status, info = 130, {"status": "interrupted", "error": str(error)}
    else:
      known = type(error).__module__.startswith("dhmd_jax")
      if not known:  # a bug: its traceback to the log
        traceback.print_exc()
      line = " ".join(part.strip() for part in str(error).splitlines() if part.strip())
      status, info = 1, {"status": "failed", "error": line or type(error).__name__}
  sys.stdout.flush()
  report.write(json.dumps(info) + "\n")
  report.close()
  return status


if __name__ == "__main__":
  sys.exit(main())
