"""dhmd-jax: DHMD (Decoupled Hierarchical Distillation for Multimodal Emotion Recognition)
in JAX/Flax.

The library's modules log through the `dhmd_jax` logger (`logging.getLogger(__name__)`), never
`print`: what a run reports as it goes (data summary, resume, epoch lines, the report) at INFO,
to standard output; what went wrong but was handled (a damaged checkpoint set aside) at WARNING,
to standard error. Both lines read as they are, without a logging prefix. Silence the progress
with `logging.getLogger("dhmd_jax").setLevel(logging.WARNING)`; a handler of your own replaces
these two once you call `dhmd_jax.use_own_handlers()`.
"""

import logging
import sys

__version__ = "0.1.0"


class _CurrentStream(logging.StreamHandler):
  """A handler writing to whatever sys.stdout / sys.stderr is when a line is logged (so
  redirections, pytest's capture and notebooks see it), one line at a time, flushed."""

  def __init__(self, name, levels):
    super().__init__()
    self._name = name
    self.addFilter(lambda record: levels(record.levelno))
    self.setFormatter(logging.Formatter("%(message)s"))

  @property
  def stream(self):
    return getattr(sys, self._name)

  @stream.setter
  def stream(self, value):  # StreamHandler.__init__ sets it; the stream is looked up instead
    del value


_LOGGER = logging.getLogger(__name__)
_HANDLERS = (_CurrentStream("stdout", lambda level: level < logging.WARNING),
             _CurrentStream("stderr", lambda level: level >= logging.WARNING))
for _handler in _HANDLERS:
  _LOGGER.addHandler(_handler)
_LOGGER.setLevel(logging.INFO)
_LOGGER.propagate = False  # absl's root handler would print every line a second time


def use_own_handlers():
  """Hands the `dhmd_jax` logger to the application's logging set-up (propagate to root)."""
  for handler in _HANDLERS:
    _LOGGER.removeHandler(handler)
  _LOGGER.propagate = True
