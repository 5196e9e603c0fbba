"""Probes of every attention head for the behaviour: ITI's localization heuristic (paper section 2).

For every (layer, head), a logistic-regression probe reads the head's output at the last token of the probe examples
(`locedit.locate.activations`) and predicts whether the answer was correct. All layers x heads probes are fitted at
once, in torch, on whatever device is there: the same objective as scikit-learn's default `LogisticRegression` (L2
penalty, C = 1, unpenalised intercept, raw features, as ITI fits it) minimised by batched Newton steps (scikit-learn
fits one probe at a time on the CPU; 1,024 heads of a 7B model are one batched solve here).

A probe result directory holds `probe.json` (written last: its presence marks a finished result; accuracies by
layer and head, the ranking, the data and model it was made for), `probe.safetensors` (accuracies, probe weights,
and per head the mass-mean direction u and the standard deviation sigma of the activations along it: ITI's edit is
sigma * u), `heatmap.png`, and the cached activations. probe.json records probe.safetensors' size and SHA-256: a
result whose tensors were cut short, removed or overwritten is found as it is read (`DamagedResultError`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..core.errors import DamagedResultError, DataError, ProbeResultError
from ..core.files import atomic_path, file_digest, safetensors_problem, write_json_atomic
from ..heads import format_heads, rank_heads
from ..models.layout import AttentionLayout
from .heatmap import save_score_heatmap

PROBE_JSON = "probe.json"
PROBE_TENSORS = "probe.safetensors"
HEATMAP = "heatmap.png"
# Bump when the probe's fit or statistics change, so an old result is recomputed rather than reused.
PROBE_FORMAT = 1
PROBE_C = 1.0  # scikit-learn's default inverse regularisation strength, as ITI uses it


# ---------------------------------------------------------------------------------------------------------------------
# Fitting: all probes at once
# ---------------------------------------------------------------------------------------------------------------------


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _head_chunks(num_heads: int, num_examples: int, dim: int, chunk_heads: int | None) -> list[slice]:
    if chunk_heads is None:
        # About 1 GiB of float32 features per chunk (the Newton step holds a second, weighted copy).
        chunk_heads = max(1, (1 << 28) // max(1, num_examples * dim))
    return [slice(start, min(start + chunk_heads, num_heads)) for start in range(0, num_heads, chunk_heads)]


def _objective(z: torch.Tensor, w: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
    """C * sum of log-losses + ||w||^2 / 2 per probe (scikit-learn's objective), summed in float64."""
    losses = torch.nn.functional.softplus(z) - y * z
    return c * losses.sum(-1, dtype=torch.float64) + 0.5 * w.double().pow(2).sum(-1)


def _newton(x: torch.Tensor, y: torch.Tensor, c: float, max_iter: int, tol: float) -> torch.Tensor:
    """Minimise the objective for k probes at once; returns theta (k, d + 1), the last entry the intercept.

    x: (k, n, d + 1) float32 with a last column of ones (the intercept); y: (n,) float32 in {0, 1}. Newton's method
    with a backtracking line search per probe; a probe stops when its Newton decrement says it is within `tol`
    (relative) of its optimum, or when steps no longer improve it (float32 resolution). Converged probes leave the
    work set, so the tail of slow probes costs only what they need.
    """
    k, n, d1 = x.shape
    theta, z = x.new_zeros(k, d1), x.new_zeros(k, n)
    f = _objective(z, theta[:, :-1], y, c)
    penalty = torch.ones(d1, dtype=torch.float64, device=x.device)
    penalty[-1] = 0.0  # the intercept is not penalised
    active = torch.ones(k, dtype=torch.bool, device=x.device)
    rows = torch.arange(k, device=x.device)  # the probes x holds
    weighted = torch.empty_like(x)  # reused: allocating a copy of x every step costs more than the copy itself
    for _ in range(max_iter):
        live = active[rows]
        if not bool(live.any()):
            break
        if int(live.sum()) < 0.8 * rows.numel():  # a copy of x costs far less than the Hessians it saves
            rows, x, weighted = rows[live], x[live], weighted[: int(live.sum())]
            live = live[live]
        zr, thr, fr = z[rows], theta[rows], f[rows]
        p = torch.sigmoid(zr)
        s = p * (1 - p)
        grad = c * torch.bmm((p - y)[:, None], x)[:, 0].double() + penalty * thr.double()
        torch.mul(x, s[..., None], out=weighted)
        hess = c * torch.bmm(weighted.mT, x).double() + torch.diag_embed(penalty)
        step = torch.linalg.solve(hess, grad)
        decrement = (grad * step).sum(-1)  # the squared Newton decrement: f - f* is about half of it
        step = step.float()
        dz = torch.bmm(x, step[..., None])[..., 0]
        # Backtracking per probe; trial points need no pass over x (z moves along dz).
        t = torch.ones(rows.numel(), dtype=torch.float64, device=x.device)
        new_z, new_theta, new_f = zr.clone(), thr.clone(), fr.clone()
        pending = torch.arange(rows.numel(), device=x.device)
        for _ in range(40):
            tp = t[pending]
            trial_z = zr[pending] - tp.float()[:, None] * dz[pending]
            trial_theta = thr[pending] - tp.float()[:, None] * step[pending]
            trial_f = _objective(trial_z, trial_theta[:, :-1], y, c)
            ok = trial_f <= fr[pending] - 1e-4 * tp * decrement[pending]
            accept = pending[ok]
            new_z[accept], new_theta[accept], new_f[accept] = trial_z[ok], trial_theta[ok], trial_f[ok]
            pending = pending[~ok]
            if pending.numel() == 0:
                break
            t[pending] /= 2
        stuck = torch.zeros(rows.numel(), dtype=torch.bool, device=x.device)
        stuck[pending] = True
        update = rows[live]
        z[update], theta[update], f[update] = new_z[live], new_theta[live], new_f[live]
        # Converged, or stuck at float32 resolution (no step, or steps that no longer lower the objective).
        scale = 1 + fr.abs()
        done = (decrement / 2 <= tol * scale) | stuck | (fr - new_f <= 1e-12 * scale)
        active[rows[live & done]] = False
    return theta


def fit_logistic_probes(
    features: torch.Tensor,
    labels: torch.Tensor,
    c: float = PROBE_C,
    max_iter: int = 100,
    tol: float = 1e-8,
    device: str | torch.device | None = None,
    chunk_heads: int | None = None,
    standardize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit one L2-regularised logistic regression per head, all at once.

    Args:
        features: (examples, heads, dim) activations, any float dtype (e.g. a (N, L, H, D) tensor viewed as
            (N, L*H, D)).
        labels: (examples,) 0/1 labels.
        c: inverse regularisation strength; the objective is c * sum(log-loss) + ||w||^2 / 2 with an unpenalised
            intercept, scikit-learn's `LogisticRegression(C=c)`.
        device: where to fit (default: CUDA when available). Heads are fitted in chunks that fit in memory.
        standardize: fit on z-scored features (scikit-learn's StandardScaler then LogisticRegression); the returned
            weights and bias act on the raw features all the same.

    Returns:
        weight (heads, dim) and bias (heads,), float32 on the CPU.
    """
    device = torch.device(device) if device is not None else default_device()
    n, num_heads, dim = features.shape
    y = labels.to(device=device, dtype=torch.float32)
    weights, biases = [], []
    for part in _head_chunks(num_heads, n, dim, chunk_heads):
        # (heads, examples, dim + 1) with a column of ones for the intercept: one matmul serves both.
        x = torch.ones(part.stop - part.start, n, dim + 1, device=device)
        x[..., :dim] = features[:, part].to(device=device, dtype=torch.float32).transpose(0, 1)
        if standardize:
            mean = x[..., :dim].mean(1, keepdim=True)
            std = x[..., :dim].std(1, unbiased=False, keepdim=True)
            std = torch.where(std > 0, std, torch.ones_like(std))  # constant features stay 0, as StandardScaler
            x[..., :dim] = (x[..., :dim] - mean) / std
        theta = _newton(x, y, c, max_iter, tol)
        del x
        weight, bias = theta[:, :dim], theta[:, dim]
        if standardize:  # w . (x - mean) / std + b  =  (w / std) . x + (b - (w / std) . mean)
            weight = weight / std[:, 0]
            bias = bias - (weight * mean[:, 0]).sum(-1)
        weights.append(weight.cpu())
        biases.append(bias.cpu())
    return torch.cat(weights), torch.cat(biases)


def probe_accuracy(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    """Per head, the fraction of examples whose label the probe predicts (decision value > 0 means label 1)."""
    n, num_heads, dim = features.shape
    correct = []
    for part in _head_chunks(num_heads, n, dim, None):
        z = torch.einsum("nhd,hd->nh", features[:, part].float(), weight[part]) + bias[part]
        correct.append(((z > 0).long() == labels.long()[:, None]).float().mean(0))
    return torch.cat(correct)


def mass_mean_directions(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head, ITI's mass-mean direction u (mean of label-1 minus mean of label-0 activations, normalised) and
    sigma, the standard deviation of all the activations projected on u. Returns u (heads, dim), sigma (heads,)."""
    n, num_heads, dim = features.shape
    positive = labels.bool()
    directions, sigmas = [], []
    for part in _head_chunks(num_heads, n, dim, None):
        x = features[:, part].float()
        shift = x[positive].mean(0) - x[~positive].mean(0)
        u = shift / shift.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # a head with no shift gets u = 0
        directions.append(u)
        sigmas.append(torch.einsum("nhd,hd->nh", x, u).std(0, unbiased=False))
    return torch.cat(directions), torch.cat(sigmas)


# ---------------------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class ProbeResult:
    """Probes of every head of one model: (layers, heads) accuracies, probe weights and ITI's statistics."""

    val_accuracy: torch.Tensor  # (layers, heads): accuracy on the held-out training questions; ranks the heads
    train_accuracy: torch.Tensor  # (layers, heads)
    direction: torch.Tensor  # (layers, heads, head_dim): unit mass-mean directions u
    sigma: torch.Tensor  # (layers, heads): std of the activations along u
    weight: torch.Tensor  # (layers, heads, head_dim): probe weights
    bias: torch.Tensor  # (layers, heads)
    info: dict = field(default_factory=dict)  # what the result was made from (model, data, keys)
    path: str | None = None

    @property
    def num_layers(self) -> int:
        return int(self.val_accuracy.shape[0])

    @property
    def num_heads(self) -> int:
        return int(self.val_accuracy.shape[1])

    @property
    def head_dim(self) -> int:
        return int(self.direction.shape[-1])

    @property
    def shape(self) -> str:
        return f"{self.num_layers} layers x {self.num_heads} heads"

    def ranking(self) -> list[tuple[int, int]]:
        """Every head, highest validation accuracy first (ties: lower layer, then lower head)."""
        return rank_heads(self.val_accuracy.tolist())

    def top_heads(self, k: int) -> list[tuple[int, int]]:
        return self.ranking()[:k]

    def theta(self, layer: int, head: int) -> torch.Tensor:
        """ITI's intervention vector sigma * u of one head (eq. 2.5-2.6 use alpha times it)."""
        return self.sigma[layer, head] * self.direction[layer, head]

    def check_fits(self, layout: AttentionLayout, head_dim: int | None = None) -> None:
        """Raise ProbeResultError if the result was made for a model of another shape."""
        where = self.path or "the probe result"
        made_for = f"{self.shape}" + (f", {self.info['model_type']}" if self.info.get("model_type") else "")
        if (self.num_layers, self.num_heads) != (layout.num_layers, layout.num_heads):
            raise ProbeResultError(
                f"probe result '{where}' was made for a model of {made_for}, but this model "
                f"({layout.model_type}) has {layout.shape}"
            )
        if self.info.get("model_type") not in (None, layout.model_type):
            raise ProbeResultError(
                f"probe result '{where}' was made for a '{self.info['model_type']}' model, "
                f"but this model is '{layout.model_type}'"
            )
        if head_dim is not None and head_dim != self.head_dim:
            raise ProbeResultError(
                f"probe result '{where}' has head_dim {self.head_dim}, but this model's heads have {head_dim}"
            )

    def save(self, directory: str) -> None:
        """Write the result; probe.json goes last, so a directory that has it holds a complete result."""
        os.makedirs(directory, exist_ok=True)
        json_path = os.path.join(directory, PROBE_JSON)
        if os.path.exists(json_path):
            os.remove(json_path)  # the directory no longer looks finished while it is rewritten
        tensors = {
            "val_accuracy": self.val_accuracy,
            "train_accuracy": self.train_accuracy,
            "direction": self.direction,
            "sigma": self.sigma,
            "weight": self.weight,
            "bias": self.bias,
        }
        tensors_path = os.path.join(directory, PROBE_TENSORS)
        with atomic_path(tensors_path) as tmp:
            save_file({name: t.float().contiguous() for name, t in tensors.items()}, tmp)
        save_heatmap(self, os.path.join(directory, HEATMAP))
        ranking = self.ranking()
        payload = {
            **self.info,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "head_dim": self.head_dim,
            "ranking": [
                {"head": format_heads([h]), "layer": h[0], "index": h[1], "val_accuracy": self.val_acc(h)}
                for h in ranking[:64]
            ],
            "val_accuracy": [[round(float(v), 6) for v in row] for row in self.val_accuracy],
            "train_accuracy": [[round(float(v), 6) for v in row] for row in self.train_accuracy],
            "files": {"tensors": PROBE_TENSORS, "heatmap": HEATMAP},
            # What the tensors were when written: a file cut short or overwritten since is found as it is read.
            "tensors_bytes": os.path.getsize(tensors_path),
            "tensors_sha256": file_digest(tensors_path),
        }
        write_json_atomic(json_path, payload)
        self.path = directory

    def val_acc(self, head: tuple[int, int]) -> float:
        return round(float(self.val_accuracy[head[0], head[1]]), 6)

    @classmethod
    def load(cls, path: str) -> ProbeResult:
        """Read a probe result directory (or its probe.json); every problem is one ProbeResultError line."""
        directory = os.path.dirname(path) if os.path.basename(path) == PROBE_JSON else path
        if not os.path.exists(directory):
            raise ProbeResultError(f"probe result '{path}' does not exist; run `locedit probe` to make one")
        json_path = os.path.join(directory, PROBE_JSON)
        if not os.path.isfile(json_path):
            raise ProbeResultError(
                f"'{path}' is not a finished probe result (no {PROBE_JSON}); run `locedit probe` to make one"
            )
        try:
            with open(json_path) as f:
                info = json.load(f)
            if not isinstance(info, dict):
                raise ValueError(f"{PROBE_JSON} is not a JSON object")
            tensors_path = os.path.join(directory, PROBE_TENSORS)
            _check_tensors(tensors_path, info)
            tensors = load_file(tensors_path)
            result = cls(
                val_accuracy=tensors["val_accuracy"],
                train_accuracy=tensors["train_accuracy"],
                direction=tensors["direction"],
                sigma=tensors["sigma"],
                weight=tensors["weight"],
                bias=tensors["bias"],
                info={k: v for k, v in info.items() if k not in ("val_accuracy", "train_accuracy", "ranking")},
                path=directory,
            )
            layers, heads = result.val_accuracy.shape
            dim = result.direction.shape[-1]
            if (layers, heads) != (info.get("num_layers"), info.get("num_heads")) or result.direction.shape != (
                layers,
                heads,
                dim,
            ):
                raise ValueError(f"{PROBE_TENSORS} does not match {PROBE_JSON}")
        except (OSError, ValueError, KeyError, SafetensorError, json.JSONDecodeError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise DamagedResultError(
                f"probe result '{path}' is unreadable: {reason}; make it again with `locedit probe` (or remove "
                f"'{directory}')",
                reason,
            ) from None
        return result


def _check_tensors(path: str, info: dict) -> None:
    """probe.safetensors as probe.json recorded it: its size (always), then its SHA-256 (the file is read next
    anyway). A result from before these records is checked by its safetensors header only."""
    if not os.path.isfile(path):
        raise ValueError(f"{PROBE_TENSORS} is missing")
    size, recorded = os.path.getsize(path), info.get("tensors_bytes")
    if recorded is not None and size != recorded:
        raise ValueError(f"{PROBE_TENSORS} is {size} bytes, not {recorded}")
    problem = safetensors_problem(path)
    if problem is not None:
        raise ValueError(f"{PROBE_TENSORS}: {problem}")
    if info.get("tensors_sha256") not in (None, file_digest(path)):
        raise ValueError(f"{PROBE_TENSORS} does not match its checksum in {PROBE_JSON}: overwritten")


def load_probe_result(path: str, layout: AttentionLayout | None = None) -> ProbeResult:
    """A saved probe result, checked against the layout of the model it will be used with."""
    result = ProbeResult.load(path)
    if layout is not None:
        result.check_fits(layout)
    return result


def save_heatmap(result: ProbeResult, path: str, marked: int = 16) -> None:
    """Validation accuracy by layer (rows) and head (columns); the `marked` best heads get a dot."""
    save_score_heatmap(result.val_accuracy, path, "probe validation accuracy", "accuracy", marked)


def compute_probe_result(
    activations: torch.Tensor,
    labels: torch.Tensor,
    is_val: torch.Tensor,
    info: dict | None = None,
    device: str | torch.device | None = None,
    standardize: bool = False,
) -> ProbeResult:
    """Probes and ITI statistics from (examples, layers, heads, head_dim) activations.

    Probes train on the examples with `is_val` False and are scored on those with it True; the mass-mean directions
    and sigmas use all the given examples (all come from training questions).
    """
    n, num_layers, num_heads, dim = activations.shape
    flat = activations.reshape(n, num_layers * num_heads, dim)
    labels = labels.long()
    train, val = ~is_val, is_val
    if len(set(labels[train].tolist())) < 2:
        raise DataError("the probes' training part has examples of only one label; both are needed")
    weight, bias = fit_logistic_probes(flat[train], labels[train], device=device, standardize=standardize)
    train_accuracy = probe_accuracy(flat[train], labels[train], weight, bias)
    val_accuracy = probe_accuracy(flat[val], labels[val], weight, bias) if bool(val.any()) else train_accuracy
    direction, sigma = mass_mean_directions(flat, labels)
    shape = (num_layers, num_heads)
    return ProbeResult(
        val_accuracy=val_accuracy.reshape(shape),
        train_accuracy=train_accuracy.reshape(shape),
        direction=direction.reshape(*shape, dim),
        sigma=sigma.reshape(shape),
        weight=weight.reshape(*shape, dim),
        bias=bias.reshape(shape),
        info=dict(info or {}),
    )
