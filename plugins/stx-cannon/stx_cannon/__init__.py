"""stx-cannon: the Cannon (Ness et al. 2015) as an optional baseline head named ``cannon``.

A third-party stx plugin (its own distribution, registered through the ``stx`` entry-point
group). The spectral model is the Cannon's: every feature pixel ``j`` of a star with labels
``l`` is ``f_j = theta_j . v(l) + noise``, with ``v(l) = [1, l, upper triangle of l l^T]``
(quadratic in the labels) and a per-pixel intrinsic scatter ``s_j`` added to the noise.

* **Training** (closed form, :meth:`CannonHead.fit`) is done by the PyPI package ``thecannon``
  0.7.3 (module ``TheCannon``, A. Ho's implementation): its label pivots and scales
  (``get_pivots_and_scales``), label vectors (``_get_lvec``) and its per-pixel regression with the
  scatter search (``_do_one_regression``), the code its ``CannonModel.train`` runs, called pixel
  by pixel without its ``Dataset`` (which would copy the label vectors once per pixel). It sees
  the training stars' features in flux units with their ivar (features of the ``raw``
  featurizer are continuum-normalised flux; missing pixels have ivar 0) and the labels in stx's
  standardised label space (after the log10 Teff transform).
* **Inference** (the module's ``forward``) is the Cannon's test step, vectorised in torch: per
  star, a fixed number of damped Gauss-Newton (Levenberg-Marquardt) steps from the zero label
  guess (the training pivots) on ``chi^2 = sum_j (f_j - theta_j . v(l))^2 / (sigma_j^2 + s_j^2)``;
  the mean is the minimum, the variance the diagonal of the inverse of ``J^T C^-1 J`` there, as
  ``scipy.optimize.curve_fit(absolute_sigma=True)`` in ``TheCannon.infer_labels`` gives it, here
  mapped back through the label scales (which thecannon forgets to do for its errors).

Config (``stx pretrain --head cannon --set key=value``):

* ``steps`` (default 30): Gauss-Newton steps per star;
* ``calibrate`` (default true): multiply each label's error by the robust scatter of the
  validation stars' normalised residuals (the inverse Hessian alone ignores model error);
* ``max_stars`` (default 20000): the training set is held in memory (N x D float64); larger
  is an error, subsample with ``--n-train``.

Noise: stx's head contract (``forward(x)`` on standardised features) carries no per-star ivar,
so for prediction each pixel's noise variance is the median noise variance of the training
stars at that pixel (``noise_var``); ``forward(x, ivar=...)`` uses a star's own ivar when a
caller has it. Training uses every star's own ivar.

torch, scipy, matplotlib and thecannon are imported inside functions only.
"""

from __future__ import annotations

from typing import Any

from stxcli.errors import UsageError
from stxcli.hookspecs import hookimpl

__version__ = "0.1.0"


def _as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    raise UsageError(f"{name}: expected true or false, got {value!r}")


class CannonHead:
    """The ``cannon`` head (closed form): thecannon's training, torch label inference."""

    name = "cannon"
    version = __version__
    description = "the Cannon (Ness+2015), quadratic spectral model trained by thecannon 0.7.3; baseline"
    closed_form = True

    def __init__(self, steps: int = 30, calibrate: Any = True, max_stars: int = 20000) -> None:
        self.steps = int(steps)
        if self.steps < 1:
            raise UsageError(f"steps must be >= 1, got {steps}")
        self.calibrate = _as_bool(calibrate, "calibrate")
        self.max_stars = int(max_stars)
        if self.max_stars < 1:
            raise UsageError(f"max_stars must be >= 1, got {max_stars}")

    def config(self) -> dict[str, Any]:
        return {"steps": self.steps, "calibrate": self.calibrate, "max_stars": self.max_stars}

    def build(self, in_dim: int, n_labels: int) -> Any:
        from ._model import CannonNet

        return CannonNet(in_dim, n_labels, steps=self.steps)

    def fit(self, module: Any, data: Any) -> dict[str, Any]:
        from ._model import fit_head

        return fit_head(module, data, calibrate=self.calibrate, max_stars=self.max_stars)

    def training_defaults(self) -> dict[str, Any]:
        return {}


@hookimpl
def register_heads(register: Any) -> None:
    register(CannonHead)
